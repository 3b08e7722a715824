"""Tiny random transformers Llama checkpoints built inside tests (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The real TinyStories-260K in HF format ships in the package (the demo's base), so tests
# that use it run in every clone, not only next to the development data.
TINYSTORIES = Path(__file__).resolve().parents[1] / "medjax" / "assets" / "tinystories-260k"


def make_hf_llama(out_dir, *, vocab=97, hidden=32, layers=2, heads=4, kv_heads=2, ffn=48,
                  tie=False, rope_theta=10000.0, max_shard_size=None, seed=0):
  """Saves a random LlamaForCausalLM as safetensors; returns the torch model."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(
      vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
      tie_word_embeddings=tie, rope_theta=rope_theta, rms_norm_eps=1e-5)
  m = transformers.LlamaForCausalLM(cfg).eval()
  # Non-trivial norms so a norm/layout mix-up shows in the logits.
  with torch.no_grad():
    for name, p in m.named_parameters():
      if "norm" in name:
        p.copy_(1 + 0.1 * torch.randn_like(p))
  kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
  m.save_pretrained(str(out_dir), safe_serialization=True, **kw)
  os.makedirs(out_dir, exist_ok=True)
  return m


def hf_logits(m, tokens, attention_mask=None):
  import torch
  with torch.no_grad():
    kw = {}
    if attention_mask is not None:
      kw["attention_mask"] = torch.tensor(attention_mask)
    return m(torch.tensor(tokens), **kw).logits.float().numpy()
