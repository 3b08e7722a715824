"""`medjax.load` and finding a model's params in any directory medjax reads or writes.

A model lives in an HF dir (`config.json` + safetensors), a medjax model dir (`import-hf`
output) or a training workdir (its newest good checkpoint); these functions accept all three.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from medjax.checkpoints import hf_import, modeldir, sources
from medjax.model import params as params_lib
from medjax.model.config import LlamaConfig
from medjax.parallel import sharding
from medjax.parallel.placement import Placement


@dataclasses.dataclass
class Loaded:
  """A loaded model: call it on int32 tokens [B,T] to get f32 logits [B,T,V].

  With a `placement` the params live on its mesh, laid out as training lays them out; a
  call splits the rows over the mesh's batch axes and returns the logits replicated (in a
  multi-process job every process passes the same tokens; `parallel.placement.fetch` reads
  the result on each).
  """

  cfg: LlamaConfig
  params: dict
  tokenizer_path: str | None
  placement: Placement | None = None

  def __post_init__(self):
    from medjax.model import llama as model_lib
    fwd = lambda p, t, **kw: model_lib.forward(self.cfg, p, t, **kw)
    self._fwd = jax.jit(fwd) if self.placement is None else self.placement.jit(fwd)

  def __call__(self, tokens, **kw):
    if self.placement is None:
      return self._fwd(self.params, jnp.asarray(tokens, jnp.int32), **kw)
    put = self.placement.rows
    return self._fwd(self.params, put(np.asarray(tokens, np.int32)),
                     **{k: put(np.asarray(v)) for k, v in kw.items()})


def load(path: str, mesh: Mesh | None = None, rules=None, **overrides) -> Loaded:
  """Loads an HF directory (config.json + safetensors) or a medjax checkpoint/workdir.

  `tokenizer_path` of the result is its tokenizer.model or tokenizer.json (or None).

  Args:
    path: the directory.
    mesh: a (data, fsdp, tensor) mesh (`parallel.sharding.make_mesh`): the params are read
      straight onto it, each process reading only its devices' slices, and laid out by the
      same logical rules as training. None: one device.
    rules: sharding rule overrides (`parallel.sharding.parse_rules`); None = the defaults.
    overrides: LlamaConfig fields such as dtype="bfloat16" or attention="dot_product".
  Returns:
    A `Loaded` model.
  """
  placement = None if mesh is None else Placement(mesh, sharding.parse_rules(rules))
  place = (lambda cfg: None) if mesh is None else (
      lambda cfg: params_lib.param_shardings(cfg, mesh, placement.rules))
  if modeldir.is_hf_dir(path):
    cfg, params = hf_import.import_hf(path, scan_layers=overrides.pop("scan_layers", False),
                                      shardings_fn=place)
    tok = hf_import.checked_tokenizer(path, cfg)
  else:
    src = sources.resolve_checkpoint(path)
    cfg = modeldir.load_config(src).replace(**overrides)
    params = sources.restore(src, cfg, place(cfg))
    tok = modeldir.tokenizer_path(src)
    overrides = {}
  cfg = cfg.replace(**overrides)
  params = params_lib.to_layout(jax.tree.map(jnp.asarray, params), cfg)
  return Loaded(cfg, params, tok, placement)
