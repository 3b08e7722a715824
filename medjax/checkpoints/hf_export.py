"""`export-hf`: a medjax checkpoint -> a Hugging Face directory `transformers` loads as is."""

from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np

from medjax import inputs
from medjax.checkpoints import convert, hf_config, modeldir, sources, stream
from medjax.data import spm_json
from medjax.data.tokenizer import HF_FILE, HF_SIDE_FILES
from medjax.errors import CheckpointError, ConfigError
from medjax.model import lora
from medjax.model import params as params_lib
from medjax.model.config import LlamaConfig

_DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16, "float16": np.float16}


def _check_out_dir(out_dir: str, overwrite: bool) -> None:
  problem = inputs.path_problem(out_dir, inputs.NEW_DIR, overwrite)
  if problem:
    raise CheckpointError(f"{out_dir}: {problem}")


def export_hf(ckpt: str, out_dir: str, dtype: str = "float32", overwrite: bool = False,
              max_shard_bytes: int = 5 << 30, log=print) -> str:
  """Writes config, generation config, safetensors and tokenizer files for `transformers`.

  Tensors are streamed one at a time (one layer of a stacked param at a time) out of the
  model dir or the workdir's newest good checkpoint, whatever wrote it (one process or
  many), so host memory holds about one tensor, not the model. A LoRA model's adapters are
  merged into their base a tensor at a time; only a random-init base or a LoRA run's
  workdir as base is rebuilt whole first (`sources.lora_base_stream`).
  """
  if dtype not in _DTYPES:
    raise CheckpointError(f"--dtype {dtype!r}: expected one of {', '.join(_DTYPES)}")
  _check_out_dir(out_dir, overwrite)
  src = sources.resolve_checkpoint(ckpt)
  cfg = modeldir.load_config(src)
  try:  # before any weight is read
    hf_cfg = hf_config.to_hf_dict(cfg.replace(lora_rank=0), dtype)
  except ConfigError as e:
    raise CheckpointError(f"{src}: {e}") from None
  tmp = out_dir.rstrip("/") + ".tmp"
  np_dtype = _DTYPES[dtype]

  def start():
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)

  # A LoRA model is exported merged (PyTorch users get a plain Llama or Qwen2 model): the
  # adapters come from the checkpoint, the base from the same model dir or, for a workdir
  # (adapters only), from the run's init_from.
  scale = cfg.lora_alpha / cfg.lora_rank if cfg.lora_rank else 0.0
  adapters_only = cfg.lora_rank and not modeldir.is_model_dir(src)
  base = sources.lora_base_stream(src, cfg) if adapters_only else None
  if adapters_only and base is None:  # a base that cannot be streamed: rebuilt whole
    start()
    params, cfg = lora.merge(sources.restore(src, cfg), cfg)
    flat = params_lib.flatten(params_lib.unstack_layers(params) if cfg.scan_layers else params)
    # One tensor at a time goes device -> host -> file.
    convert.write_hf_weights(cfg, tmp, lambda p: modeldir.host(flat[p]), np_dtype,
                             max_shard_bytes)
  else:
    for params in stream.candidates(src):
      start()
      if cfg.lora_rank:
        params = stream.LoraMerged(base or params, params, scale)
        log(f"merging LoRA adapters into {getattr(base, 'where', src)}, a tensor at a time")
      try:
        convert.write_hf_weights(cfg.replace(lora_rank=0), tmp, params.get, np_dtype,
                                 max_shard_bytes)
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
    json.dump(hf_cfg, f, indent=2)
  with open(os.path.join(tmp, "generation_config.json"), "w") as f:
    json.dump({"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
               "do_sample": False}, f, indent=2)
  tok = modeldir.tokenizer_path(src)
  if tok:
    write_tokenizer_files(tok, tmp, cfg, log)
  else:
    log(f"warning: {src} has no tokenizer; exported weights only")
  if os.path.exists(out_dir):
    shutil.rmtree(out_dir)
  os.replace(tmp, out_dir)
  log(f"exported {src} -> {out_dir} ({dtype})")
  return out_dir


def write_tokenizer_files(tokenizer: str, out_dir: str, cfg: LlamaConfig, log=print) -> None:
  """The tokenizer files `AutoTokenizer.from_pretrained(out_dir)` loads.

  A tokenizer.json is copied unchanged with its side files (tokenizer_config.json, ...).
  A SentencePiece tokenizer.model is copied and joined by a tokenizer.json that encodes
  exactly as SentencePiece (`data.spm_json`), under the generic PreTrainedTokenizerFast
  class, which loads that file as is (transformers 5's LlamaTokenizer would rebuild it).
  """
  if tokenizer.endswith(".json"):
    shutil.copyfile(tokenizer, os.path.join(out_dir, HF_FILE))
    for name in HF_SIDE_FILES:
      side = os.path.join(os.path.dirname(tokenizer), name)
      if os.path.exists(side):
        shutil.copyfile(side, os.path.join(out_dir, name))
    return
  shutil.copyfile(tokenizer, os.path.join(out_dir, "tokenizer.model"))
  special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
  with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
    json.dump(special, f, indent=2)
  spec = spm_json.tokenizer_json(tokenizer)
  if spec is None:
    log(f"warning: {tokenizer} has no exact tokenizer.json form; transformers will convert "
        "tokenizer.model itself and may split whitespace differently")
  else:
    with open(os.path.join(out_dir, HF_FILE), "w", encoding="utf-8") as f:
      json.dump(spec, f, ensure_ascii=False)
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    kind = {"tokenizer_class": "PreTrainedTokenizerFast"} if spec else {
        "tokenizer_class": "LlamaTokenizer", "legacy": True}
    json.dump({**kind, "add_bos_token": True, "add_eos_token": False,
               "clean_up_tokenization_spaces": False,
               "model_max_length": cfg.max_position_embeddings, "pad_token": None, **special},
              f, indent=2)
