"""Scoring token rows with a model: per-token log-probabilities in fixed-shape batches, and
perplexity over documents. Pure jitted functions of (cfg, params, arrays) at the core.

Batches are RIGHT padded (pad segment id 0, positions 0..L-1 as without padding) to a fixed
[batch_size, power-of-two length] shape: a row's scores do not depend on its batch-mates or
its padding, and each length bucket compiles once.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from medjax.errors import MedjaxError
from medjax.evaluation import generate as generate_lib
from medjax.model import llama as model_lib
from medjax.model.config import LlamaConfig
from medjax.parallel import placement as placement_lib


@functools.partial(jax.jit, static_argnames=("cfg",))
def token_logprobs(cfg: LlamaConfig, params, tokens, segment_ids, positions):
  """Log-probability of each token given the tokens before it in its segment.

  Args:
    cfg: model config (static).
    params: model params.
    tokens: [B,T] int32.
    segment_ids: [B,T] int32, 0 on padding.
    positions: [B,T] int32 RoPE positions.

  Returns:
    [B,T] float32; entry t is log p(tokens[t] | tokens[:t]), entry 0 is 0. Entries on
    padding or at a segment's first token are meaningless; mask them.
  """
  lp, _ = _score_batch(cfg, params, tokens, segment_ids, positions,
                       jnp.zeros(tokens.shape[:1], jnp.int32),
                       jnp.zeros((tokens.shape[0], 1), jnp.int32))
  return lp


def _score_batch(cfg, params, tokens, segment_ids, positions, last_idx, gather_ids):
  """Token log-probs [B,T], plus next-token log-probs [B,K] of `gather_ids` after last_idx."""
  logits = model_lib.forward(cfg, params, tokens, positions=positions,
                             segment_ids=segment_ids)  # [B,T,V] f32
  # logsumexp + gather instead of a full log_softmax: never a second [B,T,V] array.
  lse = jax.nn.logsumexp(logits, axis=-1)  # [B,T]
  tgt = jnp.take_along_axis(logits[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]  # [B,T-1]
  lp = jnp.pad(tgt - lse[:, :-1], ((0, 0), (1, 0)))  # [B,T]
  last = jnp.take_along_axis(logits, last_idx[:, None, None], axis=1)[:, 0]  # [B,V]
  last_lse = jnp.take_along_axis(lse, last_idx[:, None], axis=1)  # [B,1]
  nxt = jnp.take_along_axis(last, gather_ids, axis=-1) - last_lse  # [B,K]
  return lp, nxt


_score_batch_jit = jax.jit(_score_batch, static_argnames=("cfg",))


@functools.lru_cache(maxsize=None)
def jitted_scorer(placement):
  """`_score_batch` jitted for a mesh (rows split over its batch axes, results replicated)."""
  return placement.jit(_score_batch, static_argnames=("cfg",))


def _run_scores(cfg, params, arrays, placement):
  """(token log-probs, next log-probs) on the host for one padded batch."""
  if placement is None:
    # Explicit transfers only: callers may run this under jax.transfer_guard (tests do).
    lp, nxt = _score_batch_jit(cfg, params, *jax.device_put(arrays))
    return jax.device_get((lp, nxt))
  lp, nxt = jitted_scorer(placement)(cfg, params, *map(placement.rows, arrays))
  return placement_lib.fetch(lp), placement_lib.fetch(nxt)


def score_rows(cfg: LlamaConfig, params, rows: Sequence[Sequence[int]], batch_size: int,
               gather: Sequence[Sequence[int]] | None = None, progress: bool = False,
               desc: str = "scoring", placement=None):
  """Scores token rows in fixed-shape batches.

  Args:
    cfg, params: the model.
    rows: N non-empty token lists (BOS included by the caller).
    batch_size: rows per forward pass.
    gather: optional per-row token ids whose log-probability as the NEXT token after the
      row's last token is returned.
    progress: show a tqdm bar.
    desc: the bar's label.
    placement: a `parallel.placement.Placement` when params live on a mesh (rows are then
      split over its batch axes; in a multi-process job every process passes the same rows
      and gets the same results). None: one device.

  Returns:
    (token_lp, next_lp): N float64 arrays [len(row)] as in `token_logprobs`, and N arrays
    [len(gather[i])] (empty when gather is None).
  """
  if batch_size < 1:
    raise MedjaxError(f"batch_size={batch_size} must be >= 1")
  gather = gather or [[] for _ in rows]
  k = max([1] + [len(g) for g in gather])
  # Longest first, so rows of similar length share a bucket and padding stays small.
  order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
  token_lp: list = [None] * len(rows)
  next_lp: list = [None] * len(rows)
  for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress,
                    unit="batch"):
    idx = order[start: start + batch_size]
    t = generate_lib.bucket_length(len(rows[idx[0]]))
    tokens = np.zeros((batch_size, t), np.int32)
    seg = np.zeros((batch_size, t), np.int32)
    last = np.zeros((batch_size,), np.int32)
    ids = np.zeros((batch_size, k), np.int32)
    for j, i in enumerate(idx):
      n = len(rows[i])
      tokens[j, :n], seg[j, :n], last[j] = rows[i], 1, n - 1
      ids[j, : len(gather[i])] = gather[i]
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (batch_size, t))
    lp, nxt = _run_scores(cfg, params, (tokens, seg, pos, last, ids), placement)
    for j, i in enumerate(idx):
      token_lp[i] = lp[j, : len(rows[i])].astype(np.float64)
      next_lp[i] = nxt[j, : len(gather[i])].astype(np.float64)
  return token_lp, next_lp


def perplexity(cfg: LlamaConfig, params, tokenizer, texts: Sequence[str], batch_size: int = 8,
               max_len: int | None = None, progress: bool = False, placement=None) -> dict:
  """Mean next-token NLL and perplexity over documents.

  Each document is tokenised as BOS + text + EOS, as training does
  (`medjax.data.tokenize_documents`). A document longer than `max_len` is cut into windows
  of `max_len` tokens that overlap by one token, so every token after BOS is predicted
  exactly once (with at most max_len - 1 tokens of context).

  Args:
    cfg, params: the model.
    tokenizer: encode(text, bos, eos).
    texts: the documents.
    batch_size: windows per forward pass.
    max_len: window length (default: the model's max_position_embeddings).
    progress: show a tqdm bar.
    placement: as in `score_rows`.

  Returns:
    {documents, windows, tokens (predicted tokens), nll (mean, nats), perplexity, max_len}.
  """
  max_len = max_len or cfg.max_position_embeddings
  if max_len < 2:
    raise MedjaxError(f"max_len={max_len} must be >= 2")
  windows = []
  for text in texts:
    ids = tokenizer.encode(text, bos=True, eos=True)
    start = 0
    while True:
      windows.append(ids[start: start + max_len])
      if start + max_len >= len(ids):
        break
      start += max_len - 1
  if not windows:
    raise MedjaxError("perplexity: no documents")
  token_lp, _ = score_rows(cfg, params, windows, batch_size, progress=progress,
                           desc="perplexity", placement=placement)
  n = sum(len(w) - 1 for w in windows)
  nll = -sum(float(lp[1:].sum()) for lp in token_lp) / max(n, 1)
  return {"documents": len(texts), "windows": len(windows), "tokens": n, "nll": nll,
          "perplexity": math.exp(nll), "max_len": max_len}
