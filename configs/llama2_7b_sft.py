"""Paper recipe, Llama-2-7B SFT on a Cloud TPU slice (see README "Running on Cloud TPU").

  medjax train --config configs/llama2_7b_sft.py --workdir gs://BUCKET/medjax/runs/llama2-7b-sft \
      --config.init_from=... --config.data.train=...

Settings and their reasons: medjax/recipes.py.
"""

from medjax import recipes


def get_config(arg=None):
  return recipes.paper_sft("7b")
