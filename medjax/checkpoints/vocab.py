"""Growing a checkpoint's vocabulary to match an extended tokenizer (Chinese-LLaMA style).

`medjax.data.extend.extend_tokenizer` only appends pieces, so every base id keeps its meaning.
The model then needs as many embedding rows (and, when untied, `lm_head` columns) as the new
tokenizer has pieces. New rows start at the mean of the old rows, as Chinese-LLaMA and HF's
`resize_token_embeddings(mean_resizing=True)` do: a new token then begins as an "average"
token instead of a random direction, which keeps the initial loss on domain text sane.

Appending rows leaves the logits of old tokens untouched for inputs made of old ids (their
rows and the rest of the network are unchanged); only new columns are added to the softmax.
"""

from __future__ import annotations

import jax.numpy as jnp

from medjax.checkpoints import modeldir, sources
from medjax.data.tokenizer import load_tokenizer
from medjax.errors import CheckpointError
from medjax.model.config import LlamaConfig


def resize_embeddings(params: dict, cfg: LlamaConfig, new_vocab: int) -> tuple[dict, LlamaConfig]:
  """Grows the vocabulary of `params` to `new_vocab` rows.

  Args:
    params: model params (either layer layout; LoRA adapters are left alone).
    cfg: their config.
    new_vocab: the new vocabulary size, at least `cfg.vocab_size`.

  Returns:
    (params, cfg) with `embedding` [new_vocab, D] and, if untied, `lm_head` [D, new_vocab];
    appended rows/columns equal the mean of the old ones.

  Raises:
    CheckpointError: `new_vocab` is smaller than the current vocabulary (shrinking would
      silently drop trained rows), or the params do not match `cfg`.
  """
  old = cfg.vocab_size
  if new_vocab < old:
    raise CheckpointError(f"cannot shrink the vocabulary from {old} to {new_vocab} rows "
                          "(that would drop trained embeddings)")
  emb = params["embedding"]  # [V,D]
  if emb.shape[0] != old:
    raise CheckpointError(f"embedding has {emb.shape[0]} rows, the config says {old}")
  if new_vocab == old:
    return params, cfg
  out = dict(params)
  extra = new_vocab - old
  mean_row = jnp.mean(emb, axis=0, keepdims=True)  # [1,D]
  out["embedding"] = jnp.concatenate([emb, jnp.repeat(mean_row, extra, axis=0)], axis=0)
  if not cfg.tie_word_embeddings:
    head = params["lm_head"]  # [D,V]
    mean_col = jnp.mean(head, axis=1, keepdims=True)  # [D,1]
    out["lm_head"] = jnp.concatenate([head, jnp.repeat(mean_col, extra, axis=1)], axis=1)
  return out, cfg.replace(vocab_size=new_vocab)


def _check_extends(base_tok: str, new_tok: str) -> None:
  """Refuses a tokenizer that renumbers base pieces: their embedding rows would be wrong."""
  base, new = load_tokenizer(base_tok), load_tokenizer(new_tok)
  # Only the shared range: a smaller tokenizer is refused by resize_embeddings, naming sizes.
  for i in range(min(base.vocab_size, new.vocab_size)):
    if base.id_to_piece(i) != new.id_to_piece(i):
      raise CheckpointError(
          f"{new_tok}: piece {i} is {new.id_to_piece(i)!r}, the checkpoint's tokenizer has "
          f"{base.id_to_piece(i)!r}; the new tokenizer must extend the old one (append only)")


def resize_checkpoint(src_model_dir: str, tokenizer_model: str, out_dir: str,
                      log=print) -> tuple[LlamaConfig, dict]:
  """Writes a model dir whose vocabulary matches `tokenizer_model`.

  Args:
    src_model_dir: a medjax model dir or training workdir (its newest checkpoint).
    tokenizer_model: the extended tokenizer (`tokenizer.model`, or a `tokenizer.json` with
      its side files); copied into `out_dir`.
    out_dir: the new model dir (replaced atomically if it exists).
    log: progress printer.

  Returns:
    (cfg, params) of the resized model.
  """
  src = sources.resolve_checkpoint(src_model_dir)
  cfg = modeldir.load_config(src)
  old_tok = modeldir.tokenizer_path(src)
  if old_tok:
    _check_extends(old_tok, tokenizer_model)
  params = sources.restore(src, cfg)
  new_vocab = load_tokenizer(tokenizer_model).vocab_size
  params, cfg = resize_embeddings(params, cfg, new_vocab)
  modeldir.save(out_dir, cfg, params, tokenizer=tokenizer_model)
  log(f"resized {src} -> {out_dir}: vocabulary {new_vocab} (new rows = mean of old rows)")
  return cfg, params
