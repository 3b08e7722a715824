"""Paper recipe, Llama-2-13B CPT on a Cloud TPU slice (see README "Running on Cloud TPU").

  medjax train --config configs/llama2_13b_cpt.py --workdir gs://BUCKET/medjax/runs/llama2-13b-cpt \
      --config.init_from=... --config.data.train=...

Settings and their reasons: medjax/recipes.py.
"""

from medjax import recipes


def get_config(arg=None):
  return recipes.paper_cpt("13b")
