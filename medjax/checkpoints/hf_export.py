"""`export-hf`: a medjax checkpoint -> a Hugging Face directory `transformers` loads as is."""

from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np

from medjax.checkpoints import convert, hf_config, modeldir, sources, stream
from medjax.errors import CheckpointError
from medjax.model import lora
from medjax.model import params as params_lib
from medjax.model.config import LlamaConfig

_DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16, "float16": np.float16}


def _check_out_dir(out_dir: str, overwrite: bool) -> None:
  if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
    raise CheckpointError(f"{out_dir}: directory is not empty (pass --overwrite to replace it)")


def export_hf(ckpt: str, out_dir: str, dtype: str = "float32", overwrite: bool = False,
              max_shard_bytes: int = 5 << 30, log=print) -> str:
  """Writes config, generation config, safetensors and tokenizer files for `transformers`.

  Tensors are streamed one at a time (one layer of a stacked param at a time) out of the
  model dir or the workdir's newest good checkpoint, whatever wrote it (one process or
  many), so host memory holds about one tensor, not the model. A LoRA run's adapters are
  merged into their base first, which restores the model.
  """
  if dtype not in _DTYPES:
    raise CheckpointError(f"--dtype {dtype!r}: expected one of {', '.join(_DTYPES)}")
  _check_out_dir(out_dir, overwrite)
  src = sources.resolve_checkpoint(ckpt)
  cfg = modeldir.load_config(src)
  tmp = out_dir.rstrip("/") + ".tmp"
  np_dtype = _DTYPES[dtype]

  def start():
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)

  if cfg.lora_rank:
    start()
    params = sources.restore(src, cfg)
    params, cfg = lora.merge(params, cfg)  # PyTorch users get a plain LlamaForCausalLM
    flat = params_lib.flatten(params_lib.unstack_layers(params) if cfg.scan_layers else params)
    # One tensor at a time goes device -> host -> file.
    convert.write_hf_weights(cfg, tmp, lambda p: modeldir.host(flat[p]), np_dtype,
                             max_shard_bytes)
  else:
    for params in stream.candidates(src):
      start()
      try:
        convert.write_hf_weights(cfg, tmp, params.get, np_dtype, max_shard_bytes)
        params.finish()
        break
      except CheckpointError as e:  # a damaged step: the one before, as restore does
        if modeldir.is_model_dir(src):
          raise
        log(f"warning: {e}; trying the previous checkpoint")
    else:
      shutil.rmtree(tmp, ignore_errors=True)
      raise CheckpointError(f"{src}: no checkpoint could be read")
  with open(os.path.join(tmp, "config.json"), "w") as f:
    json.dump(hf_config.to_hf_dict(cfg, dtype), f, indent=2)
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
