"""Paper recipe, Llama-2-7B SFT on a Cloud TPU slice (see README "Running on Cloud TPU").

  medjax train --config configs/llama2_7b_sft.py:/gcs/BUCKET/medjax \
      --workdir /gcs/BUCKET/medjax/runs/llama2-7b-sft
  scripts/tpu_train.sh configs/llama2_7b_sft.py llama2-7b-sft   # the same, on every worker

The argument is the root folder (the bucket, mounted with gcsfuse) holding the imported model,
data and runs; fields can still be overridden with --config.FIELD=VALUE. Settings and their
reasons: medjax/training/recipes.py.
"""

from medjax.training import recipes


def get_config(arg=None):
  return recipes.paper_sft("7b", arg or recipes.DEFAULT_ROOT)
