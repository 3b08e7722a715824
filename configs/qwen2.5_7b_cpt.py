"""The paper's recipe on Qwen2.5-7B, CPT, on a Cloud TPU slice (README
"Running on Cloud TPU").

  medjax train --config configs/qwen2.5_7b_cpt.py:/gcs/BUCKET/medjax \
      --workdir /gcs/BUCKET/medjax/runs/qwen2.5-7b-cpt
  scripts/tpu_train.sh configs/qwen2.5_7b_cpt.py qwen2.5-7b-cpt   # the same, on every worker

The argument is the root folder (the bucket, mounted with gcsfuse) holding the imported
model (`medjax import-hf` output in ROOT/qwen2.5-7b), data and runs; fields can still be
overridden with --config.FIELD=VALUE. Settings and their reasons: medjax/training/recipes.py.
"""

from medjax.training import recipes


def get_config(arg=None):
  return recipes.cpt("qwen2.5-7b", arg or recipes.DEFAULT_ROOT)
