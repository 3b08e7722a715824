"""The paper's recipe (Guo & Hua, 2023) at Llama 2 scale, shared by configs/llama2_*.py.

What the paper fixes: a Llama 2 base, continued pretraining on ~1B tokens of Chinese medical
text, then SFT on the CMExam train split (54,497 questions), evaluated by CMExam accuracy.
The other settings are ours, with the reason next to each.

`root` is the folder holding the imported model, the data and the runs (layout in README
"Running on Cloud TPU"). It must be a local path: on a TPU VM, the GCS bucket mounted with
gcsfuse (scripts/tpu_train.sh mounts gs://BUCKET at /gcs/BUCKET), because the data readers,
run files and metrics use plain file I/O. configs/llama2_*.py take it as their argument:
`--config configs/llama2_7b_cpt.py:/gcs/BUCKET/medjax`.
"""

from __future__ import annotations

from medjax.training.config import base_config

DEFAULT_ROOT = "/gcs/YOUR_BUCKET/medjax"


def _common(c, size: str, bucket: str):
  c.model = f"llama2-{size}"  # unused when init_from is set; `medjax fit --config` reads it
  c.init_from = f"{bucket}/llama2-{size}"  # `medjax import-hf` output of the HF checkpoint
  c.data.tokenizer = ""  # the checkpoint's; pass an extended one after vocab extension
  c.model_overrides.dtype = "bfloat16"  # bf16 compute, f32 master weights and Adam state
  c.model_overrides.scan_layers = True  # one compiled layer: compile time flat in depth
  c.model_overrides.remat = "full"  # seq 4096: activations dominate memory otherwise
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1  # FSDP over every chip
  c.log_every = 10
  c.keep_checkpoints = 3
  c.eval.text = f"{bucket}/data/general_heldout.txt"  # forgetting check (general text)
  c.eval.text_limit = 200
  return c


def paper_cpt(size: str, bucket: str = DEFAULT_ROOT):
  c = _common(base_config(), size, bucket)
  c.task = "cpt"
  # Tokenized once (`medjax data build medical_text --tokenizer`, README "Running on Cloud
  # TPU"): each host reads its rows by random access, nothing is tokenized at start.
  c.data.train = f"tfds:{bucket}/data/built"  # from data/medical_text, ~1B tokens
  c.data.replay = f"tfds:{bucket}/data/built_general"  # from data/general_text
  c.data.replay_weight = 0.1  # 10% of the trained tokens, against forgetting (not in the paper)
  c.data.seq_len = 4096  # Llama 2's context length
  # ~1M tokens per step (256 x 4096), the usual CPT batch at this scale: 1B tokens ~ 950 steps.
  c.batch_size = 256
  c.total_steps = 1000
  c.optim.lr = 3e-5  # Llama 2's final pretraining LR: continues the schedule, little forgetting
  c.optim.warmup_steps = 50
  c.optim.final_lr_ratio = 0.1
  c.optim.weight_decay = 0.1  # Llama 2's
  c.checkpoint_every = 100
  c.eval_every = 100
  c.eval.cmexam = f"{bucket}/data/cmexam/val.csv"
  c.eval.cmexam_limit = 500
  return c


def paper_sft(size: str, bucket: str = DEFAULT_ROOT):
  c = _common(base_config(), size, bucket)
  c.task = "sft"
  c.init_from = f"{bucket}/runs/llama2-{size}-cpt"  # the CPT workdir
  # CMExam train split (54,497 questions) tokenized once, validation loss on its val split:
  # `medjax data build cmexam --seq-len 1024 --with-explanation` (rows packed at that length).
  c.data.train = f"tfds:{bucket}/data/built"
  c.data.with_explanation = True  # answer letters first, then the explanation
  c.data.seq_len = 1024  # prompt + answer + explanation: >99% fit with the Llama 2 tokenizer
  # 64 packed rows per step; ~3 epochs over CMExam train.
  c.batch_size = 64
  c.total_steps = 2000
  c.optim.lr = 2e-5  # common full-parameter SFT LR for 7B-70B Llama models
  c.optim.warmup_steps = 50
  c.optim.weight_decay = 0.0
  c.checkpoint_every = 200
  c.eval_every = 200
  c.eval.cmexam = f"{bucket}/data/cmexam/val.csv"
  c.eval.cmexam_limit = 1000
  return c
