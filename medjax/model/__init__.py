"""The Llama architecture: its config and presets, the Flax layers, attention kernels
(XLA, GPU, TPU), LoRA, and the layout of its params. No file formats, no training."""
