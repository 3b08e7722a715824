"""The paper's recipe on Llama-3.1-8B, CPT, on a Cloud TPU slice (README
"Running on Cloud TPU").

  medjax train --config configs/llama3.1_8b_cpt.py:/gcs/BUCKET/medjax \
      --workdir /gcs/BUCKET/medjax/runs/llama3.1-8b-cpt
  scripts/tpu_train.sh configs/llama3.1_8b_cpt.py llama3.1-8b-cpt   # the same, on every worker

The argument is the root folder (the bucket, mounted with gcsfuse) holding the imported
model (`medjax import-hf` output in ROOT/llama3.1-8b), data and runs; fields can still be
overridden with --config.FIELD=VALUE. Settings and their reasons: medjax/training/recipes.py.
"""

from medjax.training import recipes


def get_config(arg=None):
  return recipes.cpt("llama3.1-8b", arg or recipes.DEFAULT_ROOT)
