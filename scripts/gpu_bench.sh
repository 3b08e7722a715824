#!/usr/bin/env bash
# The GPU figures of `medjax bench`, in one go: attention implementations at Llama-2-7B's
# attention shape, then training at 7B width (as many layers as both sides fit) against
# transformers on the same GPU. Writes logs and RESULTS.md under OUT (default /tmp/gpu_bench).
#
#   scripts/gpu_bench.sh            # from the repo root, on a machine with one NVIDIA GPU
#
# Wheels in .whl/ (packages the machine lacks, e.g. ml-collections) are installed first.
# Env: BATCH (rows of 4096 tokens, default 1), LAYERS (default by GPU memory), SKIP_ATTENTION=1,
# GEMM=cublas to force cuBLAS GEMMs (MaxText's XLA flag; no change on an H200, measured).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_bench}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # torch shares the GPU
if [[ ${GEMM:-xla} == cublas ]]; then
  flag=--xla_gpu_enable_triton_gemm=false  # MaxText's GPU setting; XLA aborts on unknown flags
  if XLA_FLAGS="${XLA_FLAGS:-} $flag" python3 -c "import jax; jax.numpy.ones(2).block_until_ready()"
  then export XLA_FLAGS="${XLA_FLAGS:-} $flag"; fi
fi
echo "XLA_FLAGS=${XLA_FLAGS:-}"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv
python3 -c "import jax, flax, optax, torch, transformers as t
print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__,
      'torch', torch.__version__, 'transformers', t.__version__, jax.devices())"
mem=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
# Each side holds f32 weights + grads + AdamW (16 B/param, ~3.2 GB per 7B-width layer) and
# its activations at 4096 tokens: 8 layers fit both on a 141 GB H200 (measured), 4 should on
# an 80 GB H100 (estimated, not tried).
layers=${LAYERS:-$([[ ${mem:-0} -gt 100000 ]] && echo 8 || echo 4)}
res=(--results "$OUT/RESULTS.md")
if [[ -z ${SKIP_ATTENTION:-} ]]; then
  timeout "${ATTN_TIMEOUT:-170}" python3 -m medjax.cli bench attention --reps 10 "${res[@]}" \
    2>&1 | tee "$OUT/attention.log"
fi
timeout "${TRAIN_TIMEOUT:-330}" python3 -m medjax.cli bench train --shape 7b \
  --layers "$layers" --batch "${BATCH:-1}" --compare-hf --steps "${STEPS:-12}" --block 3 \
  "${res[@]}" --note "${NOTE:-}" 2>&1 | tee -a "$OUT/train.log"
