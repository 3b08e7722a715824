"""The Llama family in Flax Linen, computing what HF's `LlamaForCausalLM` and
`Qwen2ForCausalLM` compute (one model; `LlamaConfig` switches biases and RoPE scaling).

Einsum letters: B batch, T query length, S key length, D embed, N query heads, K kv heads,
G query heads per kv head, H head dim, F mlp, V vocab, R LoRA rank. Each weight is named by its
dims (`q_dnh`) and carries one logical axis name per dim; `parallel.sharding` maps those names
to mesh axes, so the model never mentions the mesh.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from medjax.model import attention
from medjax.model import attention_gpu
from medjax.model import attention_tpu
from medjax.parallel import sharding as sharding_lib
from medjax.model.config import LlamaConfig
from medjax.parallel.sharding import constrain

Array = jax.Array
_init = nn.initializers.normal(stddev=0.02)
_MASK_VALUE = attention.MASK_VALUE


def _param(mod: nn.Module, name: str, shape, axes, init=_init):
  return mod.param(name, nn.with_logical_partitioning(init, axes), shape,
                   jnp.dtype(mod.cfg.param_dtype))


class RMSNorm(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = _param(self, "scale", (x.shape[-1],), ("norm",), nn.initializers.ones)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.rms_norm_eps)
    dt = jnp.dtype(self.cfg.dtype)
    return y.astype(dt) * scale.astype(dt)


def rope_frequencies(cfg: LlamaConfig) -> Array:
  """RoPE's inverse frequencies [H/2] (f32), as transformers' rope init functions give them.

  "llama3" (Llama 3.1) keeps high frequencies, divides low ones (wavelength beyond
  original_max_position_embeddings / low_freq_factor) by `rope_factor`, and blends in between.
  """
  h = cfg.hd
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  if cfg.rope_type == "default":
    return inv_freq
  factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
  old_len = cfg.rope_original_max_position_embeddings
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
  return jnp.where(medium, smoothed, scaled)


def rope(x: Array, positions: Array, inv_freq: Array) -> Array:
  """HF rotate-half RoPE. x: [B,T,N,H], positions: [B,T], inv_freq: [H/2]."""
  ang = positions.astype(jnp.float32)[..., None] * inv_freq  # [B,T,H/2]
  ang = jnp.concatenate([ang, ang], axis=-1)[:, :, None, :]  # [B,T,1,H]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * jnp.cos(ang) + rotated * jnp.sin(ang)).astype(x.dtype)


def _loop_variant_one(x: Array, dtype) -> Array:
  """A 1.0 computed from this layer's activations.

  XLA:TPU rewrites cast(slice(stacked weights, layer)) as slice(cast(stacked weights)) and
  hoists the cast out of the scanned layer loop: a compute-dtype copy of every layer's
  weights then lives through the whole step (3 GiB/chip for 7B on 4 chips; it strips
  optimization barriers). Scaling by this exact 1.0 ties the cast to the loop.
  """
  v = jax.lax.stop_gradient(x.reshape(-1)[0]).astype(jnp.float32)
  return (jnp.nan_to_num(v, posinf=0.0, neginf=0.0) * 0 + 1).astype(dtype)


def matmul(eqn: str, x: Array, w: Array, n_in: int, w_transposed: bool = False) -> Array:
  """einsum(eqn, x, w) contracting x's last n_in dims with w's first n_in (its last n_in
  when w_transposed).

  On CPU this runs as one 2-D matmul of [rows, in] x [in, out]: with the rows left as B,T
  the weight gradient contracts two dims and XLA:CPU transposes an activation-sized operand
  for it (3 copies per MLP; a 4-layer MLP stack went 775 -> 609 ms fwd+bwd when flattened).
  Elsewhere the einsum stays as written, for the sharding propagation it is tuned for.
  """
  if sharding_lib.target_platform() != "cpu":
    return jnp.einsum(eqn, x, w)
  lead = x.shape[: x.ndim - n_in]
  k = math.prod(x.shape[x.ndim - n_in:])
  x2 = x.reshape(-1, k)
  y = x2 @ (w.reshape(-1, k).T if w_transposed else w.reshape(k, -1))
  return y.reshape(*lead, *(w.shape[:-n_in] if w_transposed else w.shape[n_in:]))


class Proj(nn.Module):
  """One einsum projection, plus a LoRA delta when this target is adapted."""

  cfg: LlamaConfig
  eqn: str  # e.g. "BTD,DNH->BTNH"
  shape: tuple[int, ...]
  axes: tuple[str, ...]
  n_in: int  # how many leading weight dims contract with the input
  lora: bool = False
  bias: bool = False  # a bias over the output dims (Qwen2's q/k/v)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dt = jnp.dtype(self.cfg.dtype)
    w = _param(self, "w", self.shape, self.axes)
    if self.cfg.scan_layers and w.dtype != dt:
      w = w * _loop_variant_one(x, w.dtype)
    y = matmul(self.eqn, x, w.astype(dt), self.n_in)
    if self.bias:
      y = y + _param(self, "b", self.shape[self.n_in:], self.axes[self.n_in:],
                     nn.initializers.zeros).astype(dt)
    if self.lora:
      r = self.cfg.lora_rank
      in_shape, out_shape = self.shape[: self.n_in], self.shape[self.n_in:]
      a = _param(self, "lora_a", (*in_shape, r), (*self.axes[: self.n_in], None))
      b = _param(self, "lora_b", (r, *out_shape), (None, *self.axes[self.n_in:]),
                 nn.initializers.zeros)
      xs = self.eqn.split("->")[0].split(",")[0]
      win, wout = xs[-self.n_in:], self.eqn.split("->")[1][-len(out_shape):]
      lead = xs[: -self.n_in]
      h = jnp.einsum(f"{xs},{win}R->{lead}R", x, a.astype(dt))
      delta = jnp.einsum(f"{lead}R,R{wout}->{lead}{wout}", h, b.astype(dt))
      y = y + delta * jnp.asarray(self.cfg.lora_alpha / r, dt)
    return y


def attention_mask(q_slots: Array, k_slots: Array, q_seg: Array, k_seg: Array) -> Array:
  """Causal, same-segment mask [B,1,T,S] from slot indices [B,T]/[B,S] and segment ids."""
  causal = k_slots[:, None, :] <= q_slots[:, :, None]
  same = k_seg[:, None, :] == q_seg[:, :, None]
  return (causal & same)[:, None, :, :]


def einsum_attention(q: Array, k: Array, v: Array, mask: Array, scale: float) -> Array:
  """Reference attention. q [B,T,N,H], k/v [B,S,K,H], mask [B,1,T,S] -> [B,T,N,H].

  Heads-major (BKGTH) operands make each dot a plain batched matmul; f32 softmax.
  """
  b, t, n, h = q.shape
  kh = k.shape[2]
  qg = q.reshape(b, t, kh, n // kh, h).transpose(0, 2, 3, 1, 4)  # [B,K,G,T,H]
  kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B,K,S,H]
  logits = jnp.einsum("BKGTH,BKSH->BKGTS", qg, kt).astype(jnp.float32) * scale
  logits = jnp.where(mask[:, :, None], logits, _MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
  out = jnp.einsum("BKGTS,BKSH->BKGTH", probs, vt)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def reference_attention(q: Array, k: Array, v: Array, segment_ids: Array, scale: float) -> Array:
  """`einsum_attention` with the causal, same-segment mask of a full pass: the reference
  every fused implementation is checked against. segment_ids [B,T]."""
  slots = jnp.broadcast_to(jnp.arange(q.shape[1]), segment_ids.shape)
  return einsum_attention(q, k, v, attention_mask(slots, slots, segment_ids, segment_ids), scale)


def attend(c: LlamaConfig, q: Array, k: Array, v: Array, mask: Array, scale: float) -> Array:
  """The attention `c.attention` selects. q [B,T,N,H], k/v [B,S,K,H]; mask is the [B,T]
  segment ids of a full pass (the fused kernels mask causally themselves) or a [B,1,T,S]
  bool mask (decoding over a KV cache, or the dot_product mode)."""
  if mask.ndim == 2 and attention_tpu.wanted(c.attention, q.shape[1]):
    return attention_tpu.splash_attention(q, k, v, mask, scale,
                                          interpret=not attention_tpu.is_tpu_target())
  if mask.ndim == 2 and attention_gpu.wanted(c.attention, q.dtype, q.shape[-1]):
    return attention_gpu.cudnn_attention(q, k, v, mask, scale)
  if mask.ndim == 2:  # segment ids: a full pass, flash-style in XLA
    return attention.flash_attention(q, k, v, mask, scale)
  if c.attention == "dot_product":
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)
  return einsum_attention(q, k, v, mask, scale)


class Attention(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x, positions, mask, cache=None, cache_index=None):
    c = self.cfg
    n, k, h, d = c.num_attention_heads, c.num_key_value_heads, c.hd, c.hidden_size
    t = c.lora_targets if c.lora_rank else ()
    b = c.qkv_bias
    q = Proj(c, "BTD,DNH->BTNH", (d, n, h), ("embed", "heads", "head_dim"), 1, "q" in t, b,
             name="q")(x)
    kk = Proj(c, "BTD,DKH->BTKH", (d, k, h), ("embed", "kv_heads", "head_dim"), 1, "k" in t, b,
              name="k")(x)
    v = Proj(c, "BTD,DKH->BTKH", (d, k, h), ("embed", "kv_heads", "head_dim"), 1, "v" in t, b,
             name="v")(x)
    inv_freq = rope_frequencies(c)
    q = rope(q, positions, inv_freq)
    kk = rope(kk, positions, inv_freq)
    q = constrain(q, ("batch", "length", "act_heads", "head_dim"))
    new_cache = None
    if cache is not None:  # write this chunk at cache_index, attend over the whole cache
      # The cache is heads-major [B,K,S,H], the layout the attention einsums read, so a
      # decode step copies no cache (the transposes back and forth cancel in XLA).
      put = lambda c, x: jax.lax.dynamic_update_slice_in_dim(
          c, jnp.swapaxes(x, 1, 2).astype(c.dtype), cache_index, axis=2)
      new_cache = {"k": put(cache["k"], kk), "v": put(cache["v"], v)}
      kk, v = (jnp.swapaxes(new_cache[n], 1, 2).astype(q.dtype) for n in ("k", "v"))
    out = attend(c, q, kk, v, mask, h ** -0.5)
    out = Proj(c, "BTNH,NHD->BTD", (n, h, d), ("heads", "head_dim", "embed"), 2, "o" in t,
               c.o_bias, name="o")(out)
    return out, new_cache


class MLP(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    t = c.lora_targets if c.lora_rank else ()
    d, f = c.hidden_size, c.intermediate_size
    b = c.mlp_bias
    gate = Proj(c, "BTD,DF->BTF", (d, f), ("embed", "mlp"), 1, "gate" in t, b, name="gate")(x)
    up = Proj(c, "BTD,DF->BTF", (d, f), ("embed", "mlp"), 1, "up" in t, b, name="up")(x)
    h = constrain(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))
    return Proj(c, "BTF,FD->BTD", (f, d), ("mlp", "embed"), 1, "down" in t, b, name="down")(h)


class Block(nn.Module):
  """Pre-norm decoder layer. Signature fits `nn.scan`: (carry, per-layer cache) -> same.

  mask: [B,1,T,S] bool, or the [B,T] segment ids in full passes, where splash or
  `attention.flash_attention` apply causality themselves and never build the mask.
  """

  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x, positions, mask, cache_index, cache):
    x = checkpoint_name(x, "layer_input")  # what remat="offload" moves to host memory
    a, new_cache = Attention(self.cfg, name="attn")(
        RMSNorm(self.cfg, name="attn_norm")(x), positions, mask, cache, cache_index)
    x = x + a
    x = x + MLP(self.cfg, name="mlp")(RMSNorm(self.cfg, name="mlp_norm")(x))
    x = constrain(x, ("batch", "length", "act_embed"))
    return x, new_cache


def _block_cls(cfg: LlamaConfig):
  if cfg.remat == "none":
    return Block
  cp = jax.checkpoint_policies
  policy = {"full": None, "dots_saveable": cp.checkpoint_dots,
            "dots_no_batch": cp.checkpoint_dots_with_no_batch_dims,
            "offload": cp.save_and_offload_only_these_names(
                names_which_can_be_saved=[], names_which_can_be_offloaded=["layer_input"],
                offload_src="device", offload_dst="pinned_host")}[cfg.remat]
  # prevent_cse is only needed outside scan (scan already stops CSE across iterations).
  return nn.remat(Block, policy=policy, prevent_cse=not cfg.scan_layers)


class Llama(nn.Module):
  """`apply(params, tokens[B,T], positions, segment_ids, cache)` -> logits [B,T,V] (f32).

  segment_ids: ids per packed document (0 = padding); attention stays within a segment,
    a contiguous run of equal ids.
  cache: from `init_cache`; when given, returns (logits, new_cache) and the tokens are
  written at cache["index"].
  last_only: logits for the last slot only, [B,1,V]. A left-padded prefill needs no more;
    the vocab-wide head over every prompt slot was 40% of the prefill's FLOPs at 50m.
  """

  cfg: LlamaConfig

  @nn.compact
  def __call__(self, tokens: Array, positions: Array | None = None,
               segment_ids: Array | None = None, cache: dict[str, Any] | None = None,
               return_hidden: bool = False, last_only: bool = False):
    c = self.cfg
    b, t = tokens.shape
    dt = jnp.dtype(c.dtype)
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    q_slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if cache is None and c.attention != "dot_product":
      cache_index, mask = None, segment_ids  # splash/flash mask causally themselves
    elif cache is None:
      cache_index, mask = None, attention_mask(q_slots, q_slots, segment_ids, segment_ids)
    else:
      cache_index = cache["index"]
      k_seg = jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], segment_ids,
                                                  cache_index, axis=1)
      s = k_seg.shape[1]
      k_slots = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
      mask = attention_mask(q_slots + cache_index, k_slots, segment_ids, k_seg)

    emb = _param(self, "embedding", (c.vocab_size, c.hidden_size), ("vocab", "embed"))
    x = jnp.take(emb, tokens, axis=0).astype(dt)
    x = constrain(x, ("batch", "length", "act_embed"))

    layer_caches = None if cache is None else cache["layers"]
    block = _block_cls(c)
    if c.scan_layers:
      stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
                      length=c.num_hidden_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x, new_layers = stack(c, name="layers")(x, positions, mask, cache_index, layer_caches)
    else:
      new_layers = []
      for i in range(c.num_hidden_layers):
        lc = None if cache is None else layer_caches[i]
        x, nc = block(c, name=f"layers_{i}")(x, positions, mask, cache_index, lc)
        new_layers.append(nc)

    if last_only:
      x = x[:, -1:]
    x = RMSNorm(c, name="final_norm")(x)
    if return_hidden:
      return x
    if c.tie_word_embeddings:
      logits = matmul("BTD,VD->BTV", x, emb.astype(dt), 1, w_transposed=True)
    else:
      head = _param(self, "lm_head", (c.hidden_size, c.vocab_size), ("embed", "vocab"))
      logits = matmul("BTD,DV->BTV", x, head.astype(dt), 1)
    logits = constrain(logits.astype(jnp.float32), ("batch", "length", "act_vocab"))
    if cache is None:
      return logits
    return logits, {"layers": new_layers, "segment_ids": k_seg, "index": cache_index + t}


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype=None) -> dict[str, Any]:
  """Empty KV cache: k/v [B,K,S,H] per layer, segment ids [B,S] (0 = not written), index.

  Layers: stacked [L,B,K,S,H] arrays for `scan_layers` (the scan slices them), else a list
  of per-layer arrays, which a decode loop updates in place instead of slicing and
  re-stacking the whole cache every step.
  """
  dtype = jnp.dtype(dtype or cfg.dtype)
  shape = (batch, cfg.num_key_value_heads, max_len, cfg.hd)
  n = cfg.num_hidden_layers
  if cfg.scan_layers:
    layers = {"k": jnp.zeros((n, *shape), dtype), "v": jnp.zeros((n, *shape), dtype)}
  else:
    layers = [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(n)]
  return {
      "layers": layers,
      "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
      "index": jnp.zeros((), jnp.int32),
  }


def init_params(cfg: LlamaConfig, rng: Array, unbox: bool = True):
  """Random params (HF's init: normal(0.02), norms at 1). Boxed with axes unless unbox."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  variables = Llama(cfg).init(rng, tokens)
  params = variables["params"]
  return nn.meta.unbox(params) if unbox else params


def param_axes(cfg: LlamaConfig):
  """Pytree of logical axis-name tuples, matching the params tree."""
  boxed = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0), unbox=False))
  return jax.tree.map(lambda p: tuple(p.names), boxed,
                      is_leaf=lambda p: isinstance(p, nn.LogicallyPartitioned))


def forward(cfg: LlamaConfig, params, tokens, **kw):
  return Llama(cfg).apply({"params": params}, tokens, **kw)

