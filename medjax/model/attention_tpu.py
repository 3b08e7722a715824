"""Splash (flash) attention on TPU: the Pallas kernel that ships with jax.

The einsum path materialises [B,N,T,S] logits and probabilities per layer (three 1 GiB
buffers per 4096-token row for Llama 2 7B, in the forward and again in the remat backward);
splash attention streams blocks of K/V through VMEM and never holds them. Causality is a
static block mask, so the kernel also skips the upper-triangle blocks; packed documents are
kept apart with segment ids. The kernel is per device, so it runs under `shard_map` over the active mesh: rows are
split as the `batch` rule says and heads as `act_heads` says, which needs no communication.

Only the lowering needs libtpu, so `medjax fit` compiles this on a CPU-only machine.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from medjax.model import attention
from medjax.parallel import sharding

BLOCKS = (512, 256, 128)  # tile sizes to try, largest first (512 is MaxText's default)
MIN_LEN = 128  # the kernel's lane width: shorter or ragged lengths use the einsum path


def supported(q_len: int, kv_len: int) -> bool:
  """Whether the kernel takes these lengths (self-attention, multiples of 128)."""
  return q_len == kv_len and q_len % MIN_LEN == 0


def wanted(attention: str, length: int, on_tpu: bool | None = None) -> bool:
  """Whether the model uses the kernel for a full (uncached) pass of `length`.

  on_tpu: whether the target is TPU; None asks `is_tpu_target` (inside the traced step).
  """
  if attention not in ("splash", "auto") or not supported(length, length):
    return False
  return attention == "splash" or (is_tpu_target() if on_tpu is None else on_tpu)


def is_tpu_target() -> bool:
  """True when the code being traced will run on TPU (`sharding.target_platform`)."""
  return sharding.target_platform() == "tpu"


@functools.lru_cache(maxsize=16)
def _kernel(heads: int, length: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu import splash_attention as sa
  b = next(x for x in BLOCKS if length % x == 0)
  sizes = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                        block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  mask = sa.MultiHeadMask([sa.CausalMask((length, length))] * heads)
  # head_shards/q_seq_shards=1: the kernel is built for one device's slice of heads.
  return sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                            interpret=interpret)


def _local(q, k, v, seg, interpret):
  """One device: q [b,N,T,H], k/v [b,K,S,H], seg [b,T] -> [b,N,T,H]."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa
  kernel = _kernel(q.shape[1], q.shape[2], interpret)
  return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=sa.SegmentIds(s, s)))(
      q, k, v, seg)


def splash_attention(q, k, v, segment_ids, scale: float, interpret: bool = False):
  """Causal self-attention within segments, like the einsum path with its mask.

  Args:
    q: [B,T,N,H]; k, v: [B,T,K,H] with N a multiple of K (GQA).
    segment_ids: [B,T] int; tokens attend only within their segment (0 = padding is a
      segment of its own, so padded rows stay finite).
    scale: applied to q (the kernel does not scale).
    interpret: run the kernel in the Pallas interpreter (CPU tests).
  Returns:
    [B,T,N,H] in q's dtype.
  """
  # The kernel wants heads before length.
  q, k, v = (jnp.swapaxes(x, 1, 2) for x in ((q * scale).astype(q.dtype), k, v))
  seg = segment_ids.astype(jnp.int32)
  ctx = sharding.current()
  if ctx is None:
    out = _local(q, k, v, seg, interpret)
  else:
    mesh, rules = ctx
    row, qh, kh = attention.local_specs(mesh, rules, seg.shape[0], q.shape[1], k.shape[1])
    qs, ks = P(row, qh, None, None), P(row, kh, None, None)
    f = sharding.shard_map(functools.partial(_local, interpret=interpret), mesh,
                           in_specs=(qs, ks, ks, P(row, None)), out_specs=qs)
    out = f(q, k, v, seg)
  return jnp.swapaxes(out, 1, 2)
