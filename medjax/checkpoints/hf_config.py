"""Hugging Face `config.json` <-> `LlamaConfig`: what medjax reads, writes and refuses.

Every field that changes the math and that medjax does not implement is refused with an
error naming the file and the field, never ignored.
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


def from_hf_dict(d: dict[str, Any], source: str = "config.json", **overrides) -> LlamaConfig:
  """Builds a config from an HF Llama `config.json` dict, refusing what we do not implement."""
  if d.get("model_type") != "llama":
    raise ConfigError(f"{source}: model_type={d.get('model_type')!r}; only 'llama' is supported")
  if d.get("auto_map"):
    raise ConfigError(f"{source}: auto_map (trust_remote_code custom code) is not supported; "
                      "medjax only loads the standard Llama architecture")
  rope = d.get("rope_scaling") or None
  params = d.get("rope_parameters") or {}
  rope_type = (rope or {}).get("rope_type", (rope or {}).get("type")) or params.get("rope_type")
  if rope_type not in (None, "default"):
    raise ConfigError(f"{source}: rope_scaling type {rope_type!r} is not supported "
                      "(only the default RoPE of Llama 2)")
  if d.get("hidden_act", "silu") != "silu":
    raise ConfigError(f"{source}: hidden_act={d['hidden_act']!r}; only 'silu' is supported")
  for flag in ("attention_bias", "mlp_bias"):
    if d.get(flag):
      raise ConfigError(f"{source}: {flag}=true is not supported (Llama 2 has no biases)")
  missing = [f for f in _ARCH_FIELDS[:5] if f not in d]
  if missing:
    raise ConfigError(f"{source}: missing field(s) {', '.join(missing)}")
  kw = {f: d[f] for f in _ARCH_FIELDS if d.get(f) is not None}
  kw["num_key_value_heads"] = d.get("num_key_value_heads") or d["num_attention_heads"]
  kw["rope_theta"] = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
  if isinstance(kw.get("eos_token_id"), list):
    kw["eos_token_id"] = kw["eos_token_id"][0]
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
  d = {f: getattr(cfg, f) for f in _ARCH_FIELDS}
  d.update(
      architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
      num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.hd, rope_theta=cfg.rope_theta,
      rope_scaling=None, attention_bias=False, mlp_bias=False, attention_dropout=0.0,
      initializer_range=0.02, pretraining_tp=1, use_cache=True, torch_dtype=torch_dtype,
  )
  return d


