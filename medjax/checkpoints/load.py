"""`medjax.load` and finding a model's params in any directory medjax reads or writes.

A model lives in an HF dir (`config.json` + safetensors), a medjax model dir (`import-hf`
output) or a training workdir (its newest good checkpoint); these functions accept all three.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp

from medjax.checkpoints import hf_import, modeldir, sources
from medjax.model import params as params_lib
from medjax.model.config import LlamaConfig


@dataclasses.dataclass
class Loaded:
  """A loaded model: call it on int32 tokens [B,T] to get f32 logits [B,T,V]."""

  cfg: LlamaConfig
  params: dict
  tokenizer_path: str | None

  def __post_init__(self):
    from medjax.model import llama as model_lib
    self._fwd = jax.jit(lambda p, t, **kw: model_lib.forward(self.cfg, p, t, **kw))

  def __call__(self, tokens, **kw):
    return self._fwd(self.params, jnp.asarray(tokens, jnp.int32), **kw)


def load(path: str, **overrides) -> Loaded:
  """Loads an HF directory (config.json + safetensors) or a medjax checkpoint/workdir.

  `tokenizer_path` of the result is its tokenizer.model or tokenizer.json (or None).

  overrides: LlamaConfig fields such as dtype="bfloat16" or attention="dot_product".
  """
  if os.path.exists(os.path.join(path, "config.json")) and not modeldir.is_model_dir(path):
    cfg, params = hf_import.import_hf(path, scan_layers=overrides.pop("scan_layers", False))
    tok = hf_import.checked_tokenizer(path, cfg)
  else:
    src = sources.resolve_checkpoint(path)
    cfg = modeldir.load_config(src).replace(**overrides)
    params = sources.restore(src, cfg)
    tok = modeldir.tokenizer_path(src)
    overrides = {}
  cfg = cfg.replace(**overrides)
  params = params_lib.to_layout(jax.tree.map(jnp.asarray, params), cfg)
  return Loaded(cfg, params, tok)
