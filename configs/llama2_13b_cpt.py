"""Paper recipe, Llama-2-13B CPT on a Cloud TPU slice (see README "Running on Cloud TPU").

  medjax train --config configs/llama2_13b_cpt.py:/gcs/BUCKET/medjax \
      --workdir /gcs/BUCKET/medjax/runs/llama2-13b-cpt
  scripts/tpu_train.sh configs/llama2_13b_cpt.py llama2-13b-cpt   # the same, on every worker

The argument is the root folder (the bucket, mounted with gcsfuse) holding the imported model,
data and runs; fields can still be overridden with --config.FIELD=VALUE. Settings and their
reasons: medjax/training/recipes.py.
"""

from medjax.training import recipes


def get_config(arg=None):
  return recipes.paper_cpt("13b", arg or recipes.DEFAULT_ROOT)
