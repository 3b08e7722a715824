"""cuDNN flash attention on GPU, through `jax.nn.dot_product_attention`.

cuDNN's fused kernel masks causally and by per-row lengths (padding) in the kernel, but has
no segment ids: a packed row's documents would see each other. So each call looks at the
segment ids at run time and takes one of three branches (`lax.switch` on a flag computed
from the ids on device):
  0. every row is one document filling the row: cuDNN, causal;
  1. every row is one document from slot 0, then padding (id 0): cuDNN, causal with the
     rows' lengths. Padding slots' outputs are zeros there (the reference lets padding attend
     to padding); no real token sees them, and losses mask them;
  2. anything else (packed documents): the Pallas Triton flash kernel that ships with jax
     (`pallas_attention`, segment ids in the kernel) on GPU for lengths that are a multiple
     of 128, else `attention.flash_attention` (XLA).
On an H200 at Llama-2-7B's attention shape (4096 tokens, 32 heads of 128, bf16), fwd+bwd:
cuDNN 1.4-1.8 ms, Pallas Triton 4.0-4.4 ms, XLA flash 5.1-5.6 ms (`medjax bench attention`,
two runs).
The cuDNN kernel needs bf16 or fp16 operands and a head dim of at most 128 (256 on Hopper).
Off GPU the same branches run jax's XLA implementation, so CPU tests check the dispatch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from medjax.model import attention
from medjax.parallel import sharding

HALF = (jnp.bfloat16, jnp.float16)


def is_gpu_target() -> bool:
  return sharding.target_platform() in ("gpu", "cuda", "rocm")


def wanted(mode: str, dtype, head_dim: int, on_gpu: bool | None = None) -> bool:
  """Whether a full (uncached) pass uses this path: `cudnn` always (it fails loudly on
  f32), `auto` when compiling for GPU with half-precision activations."""
  if mode == "cudnn":
    return True
  gpu = is_gpu_target() if on_gpu is None else on_gpu
  return mode == "auto" and gpu and jnp.dtype(dtype) in HALF and head_dim <= 128


def row_layout(segment_ids):
  """[B,T] ids -> (branch 0/1/2 as in the module docstring, [B] lengths of real tokens)."""
  t = segment_ids.shape[1]
  lengths = jnp.sum(segment_ids != 0, axis=1, dtype=jnp.int32)
  inside = jnp.arange(t)[None, :] < lengths[:, None]
  one_doc = jnp.all(jnp.where(inside, segment_ids == segment_ids[:, :1], segment_ids == 0))
  one_doc &= jnp.all(lengths > 0)
  full = one_doc & jnp.all(lengths == t)
  return jnp.where(full, 0, jnp.where(one_doc, 1, 2)), lengths


def cudnn_attention(q, k, v, segment_ids, scale: float, on_gpu: bool | None = None):
  """Causal self-attention within segments. q [B,T,N,H], k/v [B,T,K,H] (GQA: N a multiple
  of K), segment_ids [B,T] -> [B,T,N,H]; matches `flash_attention` on every real token."""
  gpu = is_gpu_target() if on_gpu is None else on_gpu
  if gpu and jnp.dtype(q.dtype) not in HALF:
    from medjax.errors import ConfigError
    raise ConfigError(f"attention='cudnn' needs dtype bfloat16 or float16 activations, got "
                      f"{jnp.dtype(q.dtype).name}; set dtype='bfloat16' or attention='einsum'")
  impl = "cudnn" if gpu else "xla"
  segment_ids = segment_ids.astype(jnp.int32)
  branch, lengths = row_layout(segment_ids)

  def causal(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                        implementation=impl)

  def padded(q, k, v):
    out = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                       query_seq_lengths=lengths,
                                       key_value_seq_lengths=lengths, implementation=impl)
    real = jnp.arange(q.shape[1])[None, :, None, None] < lengths[:, None, None, None]
    return jnp.where(real, out, jnp.zeros((), out.dtype))  # the same zeros on every backend

  def packed(q, k, v):
    if gpu and q.shape[1] % 128 == 0:
      return pallas_attention(q, k, v, segment_ids, scale)
    return attention.flash_attention(q, k, v, segment_ids, scale)

  return jax.lax.switch(branch, (causal, padded, packed), q, k, v)


def _pallas_local(q, k, v, segment_ids, scale, interpret):
  from jax.experimental.pallas.ops.gpu import attention as pa
  g = q.shape[2] // k.shape[2]
  if g > 1:  # the kernel wants as many kv heads as q heads; q head n reads kv head n // g
    k, v = (jnp.repeat(x, g, axis=2) for x in (k, v))
  return pa.mha(q, k, v, segment_ids, sm_scale=scale, causal=True, interpret=interpret)


def pallas_attention(q, k, v, segment_ids, scale: float, interpret: bool = False):
  """Causal attention among equal segment ids (as the einsum reference), with the Pallas
  Triton kernel (`jax.experimental.pallas.ops.gpu.attention.mha`, forward and backward).
  q [B,T,N,H], k/v [B,T,K,H], T a multiple of 128; `interpret` runs it on CPU (tests)."""
  local = functools.partial(_pallas_local, scale=scale, interpret=interpret)
  return attention.per_device(local, q, k, v, segment_ids.astype(jnp.int32))
