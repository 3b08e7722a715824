"""Import from / export to Hugging Face directories, and `medjax.load`."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from medjax import config as config_lib
from medjax import convert, lora, modeldir
from medjax.config import LlamaConfig
from medjax.errors import CheckpointError

_DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16, "float16": np.float16}


def import_hf(hf_dir: str, out_dir: str | None = None, scan_layers: bool = True,
              shardings_fn: Callable | None = None, log=print):
  """Reads an HF Llama dir tensor by tensor. Returns (cfg, params); saves if out_dir.

  shardings_fn(cfg) -> pytree of NamedSharding (per-layer layout) places each tensor on a
  mesh as it is read (`jax.make_array_from_callback`): each process keeps only its slices.
  """
  cfg = config_lib.load_hf_config(hf_dir, scan_layers=False)
  shard_flat = modeldir.flatten(shardings_fn(cfg)) if shardings_fn else None
  flat = {}
  for i, (path, w) in enumerate(convert.iter_hf_params(cfg, hf_dir)):
    if shard_flat is not None:
      w = np.ascontiguousarray(w)
      flat[path] = jax.make_array_from_callback(w.shape, shard_flat[path], lambda idx, w=w: w[idx])
    else:
      flat[path] = np.array(w)  # copy out of the memmap
  params = modeldir.unflatten(flat)
  if scan_layers:
    params = modeldir.stack_layers(params, cfg.num_hidden_layers)
  cfg = cfg.replace(scan_layers=scan_layers)
  modeldir.check_shapes(params, cfg, hf_dir)
  if out_dir:
    tok = os.path.join(hf_dir, "tokenizer.model")
    modeldir.save(out_dir, cfg, params, tokenizer=tok if os.path.exists(tok) else None)
    log(f"imported {hf_dir} -> {out_dir} ({cfg.num_params() / 1e6:.2f}M params, "
        f"{cfg.num_hidden_layers} layers, scan={scan_layers})")
  return cfg, params


def _check_out_dir(out_dir: str, overwrite: bool) -> None:
  if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
    raise CheckpointError(f"{out_dir}: directory is not empty (pass --overwrite to replace it)")


def export_hf(ckpt: str, out_dir: str, dtype: str = "float32", overwrite: bool = False,
              max_shard_bytes: int = 5 << 30, log=print) -> str:
  """Writes config, generation config, safetensors and tokenizer files for `transformers`."""
  if dtype not in _DTYPES:
    raise CheckpointError(f"--dtype {dtype!r}: expected one of {', '.join(_DTYPES)}")
  _check_out_dir(out_dir, overwrite)
  src = resolve_checkpoint(ckpt)
  cfg = modeldir.load_config(src)
  params = restore(src, cfg)
  params, cfg = lora.merge(params, cfg)  # PyTorch users get a plain LlamaForCausalLM
  flat = modeldir.flatten(modeldir.unstack_layers(params) if cfg.scan_layers else params)
  tmp = out_dir.rstrip("/") + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  np_dtype = _DTYPES[dtype]
  # One tensor at a time goes device -> host -> file.
  convert.write_hf_weights(cfg, tmp, lambda p: modeldir.host(flat[p]), np_dtype, max_shard_bytes)
  with open(os.path.join(tmp, "config.json"), "w") as f:
    json.dump(config_lib.to_hf_dict(cfg, dtype), f, indent=2)
  with open(os.path.join(tmp, "generation_config.json"), "w") as f:
    json.dump({"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
               "do_sample": False}, f, indent=2)
  tok = os.path.join(src, modeldir.TOKENIZER)
  if os.path.exists(tok):
    write_tokenizer_files(tok, tmp, cfg)
  else:
    log(f"warning: {src} has no tokenizer.model; exported weights only")
  if os.path.exists(out_dir):
    shutil.rmtree(out_dir)
  os.replace(tmp, out_dir)
  log(f"exported {src} -> {out_dir} ({dtype})")
  return out_dir


def write_tokenizer_files(tokenizer_model: str, out_dir: str, cfg: LlamaConfig) -> None:
  shutil.copyfile(tokenizer_model, os.path.join(out_dir, "tokenizer.model"))
  special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
  with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
    json.dump(special, f, indent=2)
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True,
               "add_eos_token": False, "legacy": True, "clean_up_tokenization_spaces": False,
               "model_max_length": cfg.max_position_embeddings, "pad_token": None, **special},
              f, indent=2)


def resolve_checkpoint(path: str) -> str:
  """A model dir, or the newest checkpoint's model dir inside a training workdir."""
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: no such checkpoint")
  if modeldir.is_model_dir(path):
    return path
  from medjax import checkpoint  # training workdirs
  found = checkpoint.latest_model_dir(path)
  if found is None:
    raise CheckpointError(f"{path}: neither a medjax checkpoint (model_config.json + params/) "
                          "nor a training workdir with checkpoints")
  return found


def restore(src: str, cfg: LlamaConfig, shardings=None) -> dict:
  """Params of a model dir or of a workdir's newest good checkpoint, in `cfg`'s layout."""
  if modeldir.is_model_dir(src):
    return modeldir.restore_params(src, cfg, shardings)
  from medjax import checkpoint
  return checkpoint.restore_workdir_params(src, cfg, shardings)


@dataclasses.dataclass
class Loaded:
  """A loaded model: call it on int32 tokens [B,T] to get f32 logits [B,T,V]."""

  cfg: LlamaConfig
  params: dict
  tokenizer_path: str | None

  def __post_init__(self):
    from medjax import model as model_lib
    self._fwd = jax.jit(lambda p, t, **kw: model_lib.forward(self.cfg, p, t, **kw))

  def __call__(self, tokens, **kw):
    return self._fwd(self.params, jnp.asarray(tokens, jnp.int32), **kw)


def load(path: str, **overrides) -> Loaded:
  """Loads an HF directory (config.json + safetensors) or a medjax checkpoint/workdir.

  overrides: LlamaConfig fields such as dtype="bfloat16" or attention="dot_product".
  """
  if os.path.exists(os.path.join(path, "config.json")) and not modeldir.is_model_dir(path):
    cfg, params = import_hf(path, scan_layers=overrides.pop("scan_layers", False))
    tok = os.path.join(path, "tokenizer.model")
  else:
    src = resolve_checkpoint(path)
    cfg = modeldir.load_config(src).replace(**overrides)
    params = restore(src, cfg)
    tok = os.path.join(src, modeldir.TOKENIZER)
    overrides = {}
  cfg = cfg.replace(**overrides)
  params = modeldir.to_layout(jax.tree.map(jnp.asarray, params), cfg)
  return Loaded(cfg, params, tok if os.path.exists(tok) else None)
