"""`import-hf`: a Hugging Face Llama or Qwen2 directory -> medjax params or a medjax model
dir, read tensor by tensor so host memory never holds the whole model."""

from __future__ import annotations

import os
import shutil
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from medjax.checkpoints import convert, hf_config, modeldir
from medjax.data.tokenizer import copy_tokenizer, load_tokenizer
from medjax.errors import CheckpointError, ConfigError, MedjaxError
from medjax.model import params as params_lib
from medjax.model.config import LlamaConfig
from medjax.model.config import to_json

_DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16, "float16": np.float16}


def checked_tokenizer(hf_dir: str, cfg: LlamaConfig) -> str | None:
  """The dir's tokenizer file, refused when it has ids beyond the embedding rows.

  Raises:
    ConfigError: the tokenizer's vocabulary is larger than config.json's vocab_size.
    DataError: the tokenizer file is unreadable or of an unsupported kind.
  """
  tok = modeldir.tokenizer_path(hf_dir)
  if tok is None:
    return None
  n = load_tokenizer(tok).vocab_size
  if n > cfg.vocab_size:
    raise ConfigError(f"{tok}: vocabulary of {n} tokens does not fit config.json "
                      f"vocab_size={cfg.vocab_size} (the embedding rows)")
  return tok


def import_hf(hf_dir: str, out_dir: str | None = None, scan_layers: bool = True,
              shardings_fn: Callable | None = None, log=print):
  """Reads an HF dir tensor by tensor. Returns (cfg, params); saves if out_dir.

  shardings_fn(cfg) -> pytree of NamedSharding for `cfg` (the output layout, scanned or
  not) places each param on a mesh as it is read: each device gets only its slice, and host
  memory holds one HF tensor at a time plus this process's slices, never the whole model.
  """
  cfg = hf_config.load_hf_config(hf_dir, scan_layers=False)
  tok = checked_tokenizer(hf_dir, cfg) if out_dir else None
  shard_tree = shardings_fn(cfg.replace(scan_layers=scan_layers)) if shardings_fn else None
  if shard_tree is not None:
    params = _import_onto_mesh(cfg, hf_dir, scan_layers, params_lib.flatten(shard_tree))
  else:
    flat = dict(convert.iter_hf_params(cfg, hf_dir))
    params = params_lib.unflatten(flat)
    if scan_layers:
      params = params_lib.stack_layers(params, cfg.num_hidden_layers)
  cfg = cfg.replace(scan_layers=scan_layers)
  params_lib.check_shapes(params, cfg, hf_dir)
  if out_dir:
    modeldir.save(out_dir, cfg, params, tokenizer=tok)
    log(f"imported {hf_dir} -> {out_dir} ({cfg.num_params() / 1e6:.2f}M params, "
        f"{cfg.num_hidden_layers} layers, scan={scan_layers})")
  return cfg, params


def import_hf_streaming(hf_dir: str, out_dir: str, scan_layers: bool = True, log=print,
                        flush_bytes: int = 32 << 20) -> LlamaConfig:
  """`import_hf` to disk without ever holding the model: host memory peaks at about one
  HF tensor, whatever the model's depth.

  Each HF tensor is read (a plain file read, any shard order) and written as its own array
  with orbax partial saves, a few at a time: the params are stored per layer (`layers_{i}/`)
  even when `scan_layers` is set, and restoring stacks them on the devices
  (`modeldir.restore_params`), so no host buffer ever holds a whole stacked param (~75 GB
  for one 70B MLP weight in f32). Falls back to `import_hf` if this orbax has no partial
  saves.
  """
  try:
    import orbax.checkpoint.experimental.v1 as ocp_v1
    from orbax.checkpoint.experimental.v1 import partial
  except ImportError:
    return import_hf(hf_dir, out_dir, scan_layers, log=log)[0]
  # zstd would hold an extra compressed copy of each param while it is written (measured:
  # peak 852 -> 685 MiB on a 1 GB model); float weights barely compress anyway.
  try:
    with _no_compression(ocp_v1):
      return _import_streaming(partial, hf_dir, out_dir, scan_layers, log, flush_bytes)
  except MedjaxError:
    raise
  except Exception as e:  # an orbax whose experimental API moved: the plain path still works
    shutil.rmtree(os.path.abspath(out_dir) + ".tmp", ignore_errors=True)
    log(f"warning: streaming import unavailable with this orbax ({type(e).__name__}: "
        f"{str(e)[:200]}); importing in memory")
    return import_hf(hf_dir, out_dir, scan_layers, log=log)[0]


def _no_compression(ocp_v1):
  """An orbax v1 Context that writes arrays uncompressed: set field by field where this orbax
  allows it (newer releases warn that option objects passed to Context are deprecated)."""
  ctx = ocp_v1.Context()
  saving = getattr(getattr(ctx, "array", None), "saving", None)
  if saving is not None and hasattr(saving, "use_compression"):
    saving.use_compression = False
    return ctx
  saving = ocp_v1.options.ArrayOptions.Saving(use_compression=False)
  return ocp_v1.Context(array_options=ocp_v1.options.ArrayOptions(saving=saving))


def _import_streaming(partial, hf_dir, out_dir, scan_layers, log, flush_bytes) -> LlamaConfig:
  cfg = hf_config.load_hf_config(hf_dir, scan_layers=False)
  tok = checked_tokenizer(hf_dir, cfg)
  index = convert.index_hf_params(cfg, hf_dir)
  out_cfg = cfg.replace(scan_layers=scan_layers)
  from medjax.model import llama as model_lib
  # Stored per layer whatever scan_layers says: one HF tensor per array.
  want = params_lib.flatten(jax.eval_shape(
      lambda: model_lib.init_params(cfg, jax.random.PRNGKey(0))))
  out_dir = os.path.abspath(out_dir)
  tmp = out_dir + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  root = os.path.join(tmp, "partial")
  pending, size = {}, 0
  for path, spec in want.items():  # layers_{i}/x or a global param
    arr = np.ascontiguousarray(convert.read_hf_param(cfg, index[path]))
    if arr.shape != tuple(spec.shape):
      raise CheckpointError(f"{hf_dir}: parameter {path} has shape {arr.shape}, the model "
                            f"config needs {tuple(spec.shape)}")
    pending[path], size = arr, size + arr.nbytes
    del arr
    if size >= flush_bytes:  # big params go alone; small ones (norms) share a save
      _partial_save(partial, root, pending)
      pending, size = {}, 0
  if pending:
    _partial_save(partial, root, pending)
  del pending
  partial.finalize(root)
  # The finalized dir holds the pytree in one subdir; that subdir is a plain orbax pytree
  # checkpoint, which is what `params/` is.
  sub = [d for d in os.listdir(root) if os.path.exists(os.path.join(root, d, "_METADATA"))]
  if len(sub) != 1:
    raise CheckpointError(f"{root}: unexpected orbax partial-save layout {os.listdir(root)}")
  os.replace(os.path.join(root, sub[0]), os.path.join(tmp, modeldir.PARAMS))
  meta = os.path.join(root, "_CHECKPOINT_METADATA")  # as a one-shot orbax save leaves it
  if os.path.exists(meta):
    shutil.copyfile(meta, os.path.join(tmp, modeldir.PARAMS, "_CHECKPOINT_METADATA"))
  shutil.rmtree(root)
  with open(os.path.join(tmp, modeldir.MODEL_CONFIG), "w") as f:
    f.write(to_json(out_cfg))
  if tok:
    copy_tokenizer(tok, tmp)
  if os.path.exists(out_dir):
    shutil.rmtree(out_dir)
  os.replace(tmp, out_dir)
  log(f"imported {hf_dir} -> {out_dir} ({out_cfg.num_params() / 1e6:.2f}M params, "
      f"{cfg.num_hidden_layers} layers, scan={scan_layers})")
  return out_cfg


def _partial_save(partial, root: str, flat: dict) -> None:
  partial.save(root, params_lib.unflatten(flat))
  flat.clear()
  try:  # hand the freed buffers back to the OS, so the peak stays about one param
    import ctypes
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


def _import_onto_mesh(cfg: LlamaConfig, hf_dir: str, scan_layers: bool, shard_flat: dict):
  """Params as global arrays laid out by `shard_flat` ({path: NamedSharding}), filled one HF
  tensor at a time: a stacked [L, ...] param is assembled in its devices' slices layer by
  layer, so no host buffer ever holds a whole stacked param (75 GB for one 70B MLP)."""
  index = convert.index_hf_params(cfg, hf_dir)
  flat = {}
  for path, sh in shard_flat.items():
    layered = scan_layers and path.startswith("layers/")
    if not layered:
      w = convert.read_hf_param(cfg, index[path])
      flat[path] = jax.make_array_from_callback(w.shape, sh, lambda idx, w=w: w[idx])
      del w
      continue
    sub = path[len("layers/"):]
    n = cfg.num_hidden_layers
    first = convert.read_hf_param(cfg, index[f"layers_0/{sub}"])
    shape = (n, *first.shape)
    idx_map = sh.addressable_devices_indices_map(shape)
    bufs = {d: np.empty([len(range(n)[i[0]])] + [len(range(m)[j]) for m, j in
                                                  zip(first.shape, i[1:])], np.float32)
            for d, i in idx_map.items()}
    for layer in range(n):
      w = first if layer == 0 else convert.read_hf_param(cfg, index[f"layers_{layer}/{sub}"])
      for d, i in idx_map.items():
        rows = range(n)[i[0]]
        if layer in rows:
          bufs[d][rows.index(layer)] = w[tuple(i[1:])]
      del w
    del first
    flat[path] = jax.make_array_from_single_device_arrays(
        shape, sh, [jax.device_put(bufs[d], d) for d in idx_map])
    del bufs
  return params_lib.unflatten(flat)
