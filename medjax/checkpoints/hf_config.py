"""Hugging Face `config.json` <-> `LlamaConfig`: what medjax reads, writes and refuses.

Two families: `model_type` "llama" (Llama 2, Llama 3.x) and "qwen2" (Qwen2, Qwen2.5). Every
field of theirs that changes the math is either implemented (biases, `head_dim`, tied head,
RoPE theta and "llama3" scaling) or refused with an error naming the file and the field
(sliding-window attention, other RoPE types, dropout, partial rotary, quantized weights),
never ignored.
"""

from __future__ import annotations

import json
import os
from typing import Any

from medjax.errors import ConfigError
from medjax.model.config import LlamaConfig

_ARCH_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "max_position_embeddings", "rms_norm_eps",
                "tie_word_embeddings", "bos_token_id", "eos_token_id")
SUPPORTED = {"llama": "Llama 2, Llama 3.x", "qwen2": "Qwen2, Qwen2.5"}
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_LLAMA3_FIELDS = ("factor", "low_freq_factor", "high_freq_factor",
                  "original_max_position_embeddings")


def _rope(d: dict[str, Any], source: str) -> dict[str, Any]:
  """LlamaConfig RoPE fields from `rope_scaling` (transformers 4) or `rope_parameters` (5)."""
  scaling = d.get("rope_scaling") or {}
  params = d.get("rope_parameters") or {}
  field = "rope_scaling" if scaling else "rope_parameters"
  spec = scaling or params
  rope_type = spec.get("rope_type", spec.get("type")) or "default"
  kw = {"rope_theta": float(params.get("rope_theta", d.get("rope_theta", 10000.0)))}
  if rope_type == "default":
    return kw
  if rope_type != "llama3":
    raise ConfigError(f"{source}: {field} type {rope_type!r} is not supported (only the "
                      "default RoPE and 'llama3' scaling)")
  missing = [f for f in _LLAMA3_FIELDS if spec.get(f) is None]
  if missing:
    raise ConfigError(f"{source}: {field} of rope_type 'llama3' lacks {', '.join(missing)}")
  return dict(kw, rope_type="llama3", rope_factor=float(spec["factor"]),
              rope_low_freq_factor=float(spec["low_freq_factor"]),
              rope_high_freq_factor=float(spec["high_freq_factor"]),
              rope_original_max_position_embeddings=int(spec["original_max_position_embeddings"]))


def _refuse(d: dict[str, Any], source: str) -> None:
  """Fields of these families whose math medjax does not implement."""
  if d.get("auto_map"):
    raise ConfigError(f"{source}: auto_map (trust_remote_code custom code) is not supported; "
                      "medjax only loads the standard Llama and Qwen2 architectures")
  if d.get("hidden_act", "silu") != "silu":
    raise ConfigError(f"{source}: hidden_act={d['hidden_act']!r}; only 'silu' is supported")
  if d.get("quantization_config"):
    raise ConfigError(f"{source}: quantization_config: quantized weights are not supported "
                      "(load the bf16/fp32 checkpoint)")
  for f in ("attention_dropout", "hidden_dropout"):
    if d.get(f):
      raise ConfigError(f"{source}: {f}={d[f]} is not supported (medjax trains without dropout)")
  prf = (d.get("rope_parameters") or {}).get("partial_rotary_factor",
                                              d.get("partial_rotary_factor", 1.0))
  if prf != 1.0:
    raise ConfigError(f"{source}: partial_rotary_factor={prf} is not supported (RoPE on the "
                      "whole head only)")
  if d.get("use_sliding_window"):
    raise ConfigError(f"{source}: use_sliding_window=true is not supported (sliding-window "
                      "attention; medjax attends to the whole causal context)")
  sliding = [t for t in d.get("layer_types") or [] if t != "full_attention"]
  if sliding:
    raise ConfigError(f"{source}: layer_types has {sliding[0]!r} layers; only full_attention "
                      "is supported")


def from_hf_dict(d: dict[str, Any], source: str = "config.json", **overrides) -> LlamaConfig:
  """Builds a config from an HF `config.json` dict, refusing what we do not implement.

  Args:
    d: the parsed config.json.
    source: its path, for error messages.
    **overrides: LlamaConfig fields to set on top (e.g. scan_layers).

  Returns:
    The LlamaConfig.

  Raises:
    ConfigError: an unsupported model_type or field, naming `source` and the field.
  """
  model_type = d.get("model_type")
  if model_type not in SUPPORTED:
    known = "; ".join(f"'{k}' ({v})" for k, v in SUPPORTED.items())
    raise ConfigError(f"{source}: model_type={model_type!r} is not supported (supported: "
                      f"{known})")
  _refuse(d, source)
  missing = [f for f in _ARCH_FIELDS[:5] if f not in d]
  if missing:
    raise ConfigError(f"{source}: missing field(s) {', '.join(missing)}")
  kw: dict[str, Any] = {f: d[f] for f in _ARCH_FIELDS if d.get(f) is not None}
  kw["model_type"] = model_type
  kw["num_key_value_heads"] = d.get("num_key_value_heads") or d["num_attention_heads"]
  kw.update(_rope(d, source))
  for f in ("bos_token_id", "eos_token_id"):
    if f in d and d[f] is None:
      kw[f] = None
    if isinstance(kw.get(f), list):
      kw[f] = kw[f][0]
  if model_type == "qwen2":  # Qwen2 always has q/k/v biases and none elsewhere
    kw["qkv_bias"] = True
  else:  # HF Llama's attention_bias is on q, k, v and o alike
    kw["qkv_bias"] = kw["o_bias"] = bool(d.get("attention_bias"))
    kw["mlp_bias"] = bool(d.get("mlp_bias"))
  hd = d.get("head_dim")
  if hd and hd != d["hidden_size"] // d["num_attention_heads"]:
    kw["head_dim"] = hd
  kw.update(overrides)
  return LlamaConfig(**kw)


def load_hf_config(hf_dir: str, **overrides) -> LlamaConfig:
  path = os.path.join(hf_dir, "config.json")
  if not os.path.exists(path):
    raise ConfigError(f"{hf_dir}: no config.json (is this a Hugging Face model directory?)")
  try:
    with open(path) as f:
      d = json.load(f)
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path}: not valid JSON ({e})") from None
  return from_hf_dict(d, source=path, **overrides)


def to_hf_dict(cfg: LlamaConfig, torch_dtype: str = "float32") -> dict[str, Any]:
  """The config.json of `cfg`'s family, which transformers loads as that family's class.

  Raises:
    ConfigError: `cfg`'s biases have no HF form in its family (e.g. an o_proj bias on Qwen2).
  """
  d = {f: getattr(cfg, f) for f in _ARCH_FIELDS}
  rope_scaling = None
  if cfg.rope_type == "llama3":
    rope_scaling = {"rope_type": "llama3", "factor": cfg.rope_factor,
                    "low_freq_factor": cfg.rope_low_freq_factor,
                    "high_freq_factor": cfg.rope_high_freq_factor,
                    "original_max_position_embeddings": cfg.rope_original_max_position_embeddings}
  d.update(
      architectures=[_ARCHITECTURES[cfg.model_type]], model_type=cfg.model_type,
      hidden_act="silu", num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.hd,
      rope_theta=cfg.rope_theta, rope_scaling=rope_scaling, attention_dropout=0.0,
      initializer_range=0.02, use_cache=True, torch_dtype=torch_dtype,
  )
  if cfg.model_type == "qwen2":
    if not cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias:
      raise ConfigError(f"model_type='qwen2' has q/k/v biases only (qkv_bias={cfg.qkv_bias}, "
                        f"o_bias={cfg.o_bias}, mlp_bias={cfg.mlp_bias}): no Qwen2 config "
                        "expresses this model")
    d.update(use_sliding_window=False, sliding_window=None,
             max_window_layers=cfg.num_hidden_layers)
  else:
    if cfg.qkv_bias != cfg.o_bias:
      raise ConfigError(f"model_type='llama' has attention_bias on q/k/v and o together "
                        f"(qkv_bias={cfg.qkv_bias}, o_bias={cfg.o_bias}): no Llama config "
                        "expresses this model")
    d.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias, pretraining_tp=1)
  return d
