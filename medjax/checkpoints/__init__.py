"""File formats at the boundaries: the Hugging Face conversion table, safetensors, medjax
model dirs, training checkpoints, and loading a model from any of them."""
