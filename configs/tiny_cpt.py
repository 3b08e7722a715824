"""Continued pretraining of the shipped TinyStories-260K base on shipped medical text (CPU).

  medjax train --config configs/tiny_cpt.py --workdir /tmp/tiny_cpt
  medjax train --config configs/tiny_cpt.py:runlocal --workdir /tmp/t   # ~20 s smoke run

All fields and their defaults: `medjax.training.config.base_config()`.
"""

from medjax.training.config import base_config


def get_config(arg=None):
  if arg not in (None, "", "runlocal"):
    raise ValueError(f"configs/tiny_cpt.py: unknown argument {arg!r} (runlocal)")
  c = base_config()
  c.task = "cpt"
  c.init_from = "asset:tinystories-260k"  # the real stories260K Llama, shipped in the package
  c.data.train = "asset:medical_text_sample.csv"
  c.data.seq_len = 256
  c.batch_size = 16
  c.total_steps = 200
  c.optim.lr = 3e-3  # a 260K-param model tolerates (and needs) a large LR
  if arg == "runlocal":
    c.total_steps, c.log_every, c.checkpoint_every, c.eval_every = 20, 5, 10, 10
    c.batch_size, c.data.seq_len = 4, 128
  return c
