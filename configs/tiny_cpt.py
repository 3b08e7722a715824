"""Continued pretraining of the shipped TinyStories-260K base on shipped medical text (CPU).

  medjax train --config configs/tiny_cpt.py --workdir /tmp/tiny_cpt

With no `init_from`, the run imports the base model shipped in the package
(medjax/assets/tinystories-260k, the real stories260K Llama). `runlocal` shrinks it further:
  medjax train --config configs/tiny_cpt.py:runlocal --workdir /tmp/t
"""

import ml_collections


def get_config(arg: str | None = None):
  c = ml_collections.ConfigDict()
  c.task = "cpt"
  c.model = "tiny"  # preset, used when init_from is empty ("asset:" paths ship in the package)
  c.init_from = "asset:tinystories-260k"  # HF dir, import-hf dir, or a previous workdir
  c.model_overrides = ml_collections.ConfigDict(dict(
      dtype="float32", scan_layers=True, remat="none", attention="einsum",
      lora_rank=0, lora_alpha=16.0, lora_targets="q,k,v,o"))

  c.data = ml_collections.ConfigDict()
  c.data.train = "asset:medical_text_sample.csv"  # comma-separated files or folders
  c.data.columns = "title,ask,answer"  # CSV text columns ("" = all string columns)
  c.data.replay = "asset:tinystories_sample.txt"  # general text mixed in against forgetting
  c.data.replay_weight = 0.0  # fraction of rows from `replay`
  c.data.val_fraction = 0.05  # held out by a stable hash of each document
  c.data.seq_len = 256
  c.data.tokenizer = ""  # "" = the init checkpoint's tokenizer.model
  c.data.with_explanation = False  # SFT only

  c.batch_size = 16  # global, in sequences
  c.accum_steps = 1  # micro-batches per step (same update as one big batch)
  c.total_steps = 200
  c.log_every = 10
  c.checkpoint_every = 100
  c.keep_checkpoints = 2
  c.eval_every = 100  # validation loss (+ the evals below); 0 = off
  c.eval_batches = 4
  c.seed = 0
  c.nan_policy = "skip"  # skip | stop, for a non-finite loss or gradient
  c.frozen = ""  # comma-separated param path prefixes kept fixed, e.g. "embedding"

  c.optim = ml_collections.ConfigDict(dict(
      lr=3e-3, warmup_steps=20, final_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8,
      weight_decay=0.1, clip_norm=1.0))
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  c.rules = ""  # "" = medjax.sharding.DEFAULT_RULES; else "logical=axis+axis;..."

  c.eval = ml_collections.ConfigDict(dict(
      cmexam="", cmexam_limit=40, text="asset:tinystories_sample.txt", text_limit=20))

  if arg == "runlocal":
    c.total_steps, c.log_every, c.checkpoint_every, c.eval_every = 20, 5, 10, 10
    c.batch_size, c.data.seq_len = 4, 128
  return c
