"""Causal self-attention within segments for full (uncached) passes, in plain XLA.

Flash-style: queries go in blocks that only see the keys up to their own end (the masked
upper triangle is never computed), the forward keeps only the output and the per-row
log-sum-exp, and the backward recomputes each block's probabilities instead of storing them
(a custom VJP). On CPU the (row, kv-head) pairs are also walked in small chunks under
`lax.map`, so one chunk's [G, block, S] scores stay in cache through the exp, the sums and
the matmuls: every XLA op otherwise sweeps the whole batch, and at small head dims that
memory traffic, not the FLOPs, is the cost (measured, `medjax bench train --shape demo`).

`medjax.model.einsum_attention` is the reference this must match (for segments that are
contiguous runs of ids, see `flash_attention`); splash (`attention_tpu`) replaces it
on TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from medjax.parallel import sharding

# Finite, so a fully masked row gives a uniform softmax instead of NaN (as the reference).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
# CPU: bytes of f32 scores per chunk of (row, kv-head) pairs, a block of query rows by all
# keys. 512 KiB (an L2's worth) measured best at the demo (head dim 8) and 50m (64) shapes.
CPU_CHUNK_BYTES = 512 * 1024


def query_block(head_dim: int, on_cpu: bool) -> int:
  """Query rows per block: small on CPU (cache-resident scores), 128 elsewhere."""
  if not on_cpu:
    return 128
  return 32 if head_dim <= 16 else 64


def _rows(t: int, block: int) -> int:
  return min(max(block, -(-t // 16)), t)  # at most 16 blocks: long sequences compile quickly


def _blocks(t: int, block: int) -> list[tuple[int, int]]:
  rows = _rows(t, block)
  return [(i, min(i + rows, t)) for i in range(0, t, rows)]


def _mask(start, i0: int, i1: int):
  """[P,1,i1-i0,i1]: query slots i0..i1-1 see keys from their segment's first slot
  (`start`, [P,T]) to their own."""
  k = jnp.arange(i1)[None, None, :]
  return ((k <= jnp.arange(i0, i1)[None, :, None]) & (k >= start[:, i0:i1, None]))[:, None]


def segment_starts(segment_ids):
  """[B,T] -> the first slot of each token's segment (a run of equal ids)."""
  t = segment_ids.shape[1]
  new = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                         segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  return jax.lax.cummax(jnp.where(new, jnp.arange(t, dtype=jnp.int32), 0), axis=1)


def _scores(qb, k, start, i0, i1, scale):
  s = jnp.einsum("PGTH,PSH->PGTS", qb, k[:, :i1], preferred_element_type=jnp.float32)
  return jnp.where(_mask(start, i0, i1), s * scale, MASK_VALUE)


def _forward(q, k, v, start, scale, block):
  """q [P,G,T,H], k/v [P,T,H], start [P,T] (each token's segment's first slot)
  -> (out [P,G,T,H], lse [P,G,T] f32)."""
  outs, lses = [], []
  for i0, i1 in _blocks(q.shape[2], block):
    s = _scores(q[:, :, i0:i1], k, start, i0, i1, scale)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("PGTS,PSH->PGTH", p.astype(v.dtype), v[:, :i1],
                   preferred_element_type=jnp.float32) / l
    outs.append(o.astype(q.dtype))
    lses.append((m + jnp.log(l))[..., 0])
  return jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q, k, v, start, scale, block):
  return _forward(q, k, v, start, scale, block)[0]


def _flash_fwd(q, k, v, start, scale, block):
  out, lse = _forward(q, k, v, start, scale, block)
  return out, (q, k, v, start, out, lse)


def _flash_bwd(scale, block, res, dout):
  q, k, v, start, out, lse = res
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [P,G,T]
  t = k.shape[1]
  dqs = []
  # dK and dV are accumulated transposed, [P,H,S]: contracting (G,T) of the [P,G,T,S] score
  # blocks as they lie, instead of XLA copying each block to [P,S,G*T] first (the copies
  # took ~40% of this backward at head_dim 8 on CPU, measured).
  dkt = jnp.zeros((k.shape[0], k.shape[2], t), jnp.float32)
  dvt = jnp.zeros((v.shape[0], v.shape[2], t), jnp.float32)
  for i0, i1 in _blocks(q.shape[2], block):
    qb, db = q[:, :, i0:i1], dout[:, :, i0:i1]
    p = jnp.exp(_scores(qb, k, start, i0, i1, scale) - lse[..., i0:i1, None])
    dp = jnp.einsum("PGTH,PSH->PGTS", db, v[:, :i1], preferred_element_type=jnp.float32)
    ds = (p * (dp - delta[..., i0:i1, None]) * scale).astype(q.dtype)
    dqs.append(jnp.einsum("PGTS,PSH->PGTH", ds, k[:, :i1], preferred_element_type=jnp.float32))
    pad = ((0, 0), (0, 0), (0, t - i1))
    dkt = dkt + jnp.pad(jnp.einsum("PGTH,PGTS->PHS", qb, ds,
                                   preferred_element_type=jnp.float32), pad)
    dvt = dvt + jnp.pad(jnp.einsum("PGTH,PGTS->PHS", db, p.astype(db.dtype),
                                   preferred_element_type=jnp.float32), pad)
  dq = jnp.concatenate(dqs, axis=2)
  dk, dv = dkt.transpose(0, 2, 1), dvt.transpose(0, 2, 1)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _chunk(pairs: int, g: int, block: int, t: int) -> int:
  """The most (row, kv-head) pairs per chunk whose scores fit CPU_CHUNK_BYTES."""
  per_pair = g * block * t * 4
  return max([c for c in range(1, pairs + 1)
              if pairs % c == 0 and c * per_pair <= CPU_CHUNK_BYTES] or [1])


def _local(q, k, v, start, scale, on_cpu):
  """One device: q [b,T,N,H], k/v [b,T,K,H], start [b,T] -> [b,T,N,H]."""
  b, t, n, h = q.shape
  kh = k.shape[2]
  g, pairs = n // kh, b * kh
  block = query_block(h, on_cpu)
  qp = q.reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4).reshape(pairs, g, t, h)
  kp, vp = (x.transpose(0, 2, 1, 3).reshape(pairs, t, h) for x in (k, v))
  sp = jnp.broadcast_to(start[:, None], (b, kh, t)).reshape(pairs, t)
  c = _chunk(pairs, g, _rows(t, block), t) if on_cpu else pairs
  if c == pairs:
    out = _flash(qp, kp, vp, sp, scale, block)
  else:
    split = lambda x: x.reshape(pairs // c, c, *x.shape[1:])
    out = jax.lax.map(lambda a: _flash(*a, scale, block),
                      (split(qp), split(kp), split(vp), split(sp)))
  return out.reshape(b, kh, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def local_specs(mesh, rules, rows: int, q_heads: int, kv_heads: int):
  """PartitionSpecs (for rows, q heads, kv heads) that split without communication."""
  row = sharding.logical_to_spec(("batch",), rules, mesh, (rows,))[0]
  qh = sharding.logical_to_spec(("act_heads",), rules, mesh, (q_heads,))[0]
  kh = sharding.logical_to_spec(("act_heads",), rules, mesh, (kv_heads,))[0]
  if qh != kh:  # kv heads do not split like q heads: keep heads whole on each device
    qh = kh = None
  return row, qh, kh


def flash_attention(q, k, v, segment_ids, scale: float, on_cpu: bool | None = None):
  """Causal self-attention within segments; matches `einsum_attention` with its mask.

  Args:
    q: [B,T,N,H]; k, v: [B,T,K,H] with N a multiple of K (GQA).
    segment_ids: [B,T] int; a token sees only earlier tokens of its own segment, a run
      of equal ids (packed documents, padding). Masking from each segment's first slot
      instead of comparing ids per score is 1.5x faster on CPU; an id that recurs after
      another id starts a new segment here, while the einsum reference would join them.
    scale: the logit scale.
    on_cpu: whether the target is CPU (chunked walk); None asks the active mesh or backend.
  Returns:
    [B,T,N,H] in q's dtype.
  """
  if on_cpu is None:
    on_cpu = sharding.target_platform() == "cpu"
  start = segment_starts(segment_ids.astype(jnp.int32))
  return per_device(functools.partial(_local, scale=scale, on_cpu=on_cpu), q, k, v, start)


def per_device(local, q, k, v, rows):
  """local(q, k, v, rows) on each device's rows and heads of the active mesh (split as
  `local_specs` says, no communication); q [B,T,N,H], k/v [B,T,K,H], rows [B,T]."""
  ctx = sharding.current()
  if ctx is None or ctx[0].size == 1:
    return local(q, k, v, rows)
  mesh, rules = ctx
  row, qh, kh = local_specs(mesh, rules, q.shape[0], q.shape[2], k.shape[2])
  qs, ks = P(row, None, qh, None), P(row, None, kh, None)
  return sharding.shard_map(local, mesh, (qs, ks, ks, P(row, None)), qs)(q, k, v, rows)
