"""The paper's recipe (Guo & Hua, 2023), shared by configs/{llama2,qwen2.5,llama3.1}_*.py.

What the paper fixes: a Llama 2 base, continued pretraining on ~1B tokens of Chinese medical
text, then SFT on the CMExam train split (54,497 questions), evaluated by CMExam accuracy.
The same recipe runs on the bases chosen for Chinese medicine today, Qwen2.5-7B and
Llama-3.1-8B (`BASES`): only the base changes, so their results compare with Llama 2's.
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
# Presets with a recipe; `ROOT/BASE` holds the `medjax import-hf` output of each.
BASES = ("llama2-7b", "llama2-13b", "llama2-70b", "qwen2.5-7b", "llama3.1-8b")
# Whose tokenizer each base has: a tokenized build serves every base of one tokenizer.
TOKENIZER_OF = {"llama2-7b": "llama2", "llama2-13b": "llama2", "llama2-70b": "llama2",
                "qwen2.5-7b": "qwen2.5", "llama3.1-8b": "llama3"}


def built(bucket: str, base: str, folder: str = "built") -> str:
  """`tfds:ROOT/FOLDER/TOKENIZER`: the `medjax data build --tokenizer` output for `base`."""
  return f"tfds:{bucket}/data/{folder}/{TOKENIZER_OF[base]}"


def _common(c, base: str, bucket: str):
  c.model = base  # unused when init_from is set; `medjax fit --config` reads it
  c.init_from = f"{bucket}/{base}"  # `medjax import-hf` output of the HF checkpoint
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
  """The paper's CPT on Llama 2 (`size`: 7b, 13b, 70b)."""
  return cpt(f"llama2-{size}", bucket)


def paper_sft(size: str, bucket: str = DEFAULT_ROOT):
  """The paper's SFT on Llama 2 (`size`: 7b, 13b, 70b), from the CPT run."""
  return sft(f"llama2-{size}", bucket)


def cpt(base: str, bucket: str = DEFAULT_ROOT):
  """Continued pretraining of `base` (one of BASES) on the medical corpus."""
  c = _common(base_config(), base, bucket)
  c.task = "cpt"
  # Tokenized once per tokenizer (`medjax data build medical_text --tokenizer`, README
  # "Running on Cloud TPU"): each host reads its rows by random access, nothing is tokenized
  # at start. ~1B tokens of data/medical_text; replay from data/general_text.
  c.data.train = built(bucket, base)
  c.data.replay = built(bucket, base, "built_general")
  c.data.replay_weight = 0.1  # 10% of the trained tokens, against forgetting (not in the paper)
  # Llama 2's context length; Qwen2.5 and Llama 3.1 take longer rows, but the same length
  # keeps the recipes comparable (and Llama 3.1's RoPE scaling only acts beyond 8192).
  c.data.seq_len = 4096
  # ~1M tokens per step (256 x 4096), the usual CPT batch at this scale: 1B tokens ~ 950 steps.
  c.batch_size = 256
  c.total_steps = 1000
  # Llama 2's final pretraining LR: continues the schedule, little forgetting. Kept for the
  # newer bases too (a common CPT LR at 7-8B); tune it per base with --config.optim.lr.
  c.optim.lr = 3e-5
  c.optim.warmup_steps = 50
  c.optim.final_lr_ratio = 0.1
  c.optim.weight_decay = 0.1  # Llama 2's
  c.checkpoint_every = 100
  c.eval_every = 100
  c.eval.cmexam = f"{bucket}/data/cmexam/val.csv"
  c.eval.cmexam_limit = 500
  return c


def sft(base: str, bucket: str = DEFAULT_ROOT):
  """SFT of `base` on CMExam, from its CPT workdir."""
  c = _common(base_config(), base, bucket)
  c.task = "sft"
  c.init_from = f"{bucket}/runs/{base}-cpt"  # the CPT workdir
  # CMExam train split (54,497 questions) tokenized once, validation loss on its val split:
  # `medjax data build cmexam --seq-len 1024 --with-explanation` (rows packed at that length).
  c.data.train = built(bucket, base)
  c.data.with_explanation = True  # answer letters first, then the explanation
  c.data.seq_len = 1024  # prompt + answer + explanation: >99% fit with the Llama 2 tokenizer
  # 64 packed rows per step, ~3 epochs over CMExam train with the Llama 2 tokenizer: "fit"
  # packing at 1024 puts 1.86 questions in a row (measured on the 4,996 val questions), so
  # the 53.4K train questions are ~28,700 rows, 449 steps an epoch. Bases that tokenize
  # Chinese in fewer tokens pack more per row (more epochs): `medjax plan --epochs 3`.
  c.batch_size = 64
  c.total_steps = 1350
  c.optim.lr = 2e-5  # common full-parameter SFT LR for 7B-70B Llama models
  c.optim.warmup_steps = 50
  c.optim.weight_decay = 0.0
  c.checkpoint_every = 200
  c.eval_every = 200
  c.eval.cmexam = f"{bucket}/data/cmexam/val.csv"
  c.eval.cmexam_limit = 1000
  return c
