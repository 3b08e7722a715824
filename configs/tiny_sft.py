"""SFT of a tiny model on the shipped CMExam sample (CPU), e.g. on top of tiny_cpt:

  medjax train --config configs/tiny_sft.py --workdir /tmp/tiny_sft \
      --config.init_from=/tmp/tiny_cpt
  medjax train --config configs/tiny_sft.py:lora ...   # LoRA adapters only
  medjax train --config configs/tiny_sft.py:runlocal --workdir /tmp/s   # ~20 s smoke run

All fields and their defaults: `medjax.training.config.base_config()`.
"""

from medjax.training.config import base_config


def get_config(arg=None):
  if arg not in (None, "", "lora", "runlocal"):
    raise ValueError(f"configs/tiny_sft.py: unknown argument {arg!r} (lora, runlocal)")
  c = base_config()
  c.task = "sft"
  c.init_from = "asset:tinystories-260k"
  c.data.train = "asset:cmexam_sample.csv"  # CMExam CSV(s); 5% held out for validation
  c.data.seq_len = 512  # the 512-piece tokenizer spends ~3 tokens per Chinese character
  c.data.with_explanation = False
  c.batch_size = 16
  c.total_steps = 150
  c.optim.lr = 1e-3
  c.eval.cmexam = "asset:cmexam_sample.csv"
  c.eval.text = ""
  if arg == "lora":
    c.model_overrides.lora_rank = 8
    c.model_overrides.lora_targets = "q,k,v,o,gate,up,down"
    c.optim.lr = 3e-3
    c.optim.weight_decay = 0.0
  if arg == "runlocal":
    c.total_steps, c.log_every, c.checkpoint_every, c.eval_every = 20, 5, 10, 10
    c.batch_size, c.data.seq_len, c.eval.cmexam_limit = 4, 256, 10
  return c
