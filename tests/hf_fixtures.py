"""Tiny random transformers checkpoints (Llama 2/3, Qwen2) and byte-level BPE tokenizers
built inside tests (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The real TinyStories-260K in HF format ships in the package (the demo's base), so tests
# that use it run in every clone, not only next to the development data.
TINYSTORIES = Path(__file__).resolve().parents[1] / "medjax" / "assets" / "tinystories-260k"


def make_hf_llama(out_dir, *, vocab=97, hidden=32, layers=2, heads=4, kv_heads=2, ffn=48,
                  tie=False, rope_theta=10000.0, max_shard_size=None, seed=0, family="llama",
                  **extra):
  """Saves a random LlamaForCausalLM (or Qwen2ForCausalLM, family="qwen2") as safetensors;
  returns the torch model. extra: config fields (head_dim, rope_scaling, attention_bias...).

  Norms and biases are drawn away from their init (1 and 0), so a layout mix-up of either
  shows in the logits.
  """
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(seed)
  config_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                           "qwen2": (transformers.Qwen2Config,
                                     transformers.Qwen2ForCausalLM)}[family]
  cfg = config_cls(
      vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
      num_attention_heads=heads, num_key_value_heads=kv_heads,
      max_position_embeddings=extra.pop("max_position_embeddings", 128),
      tie_word_embeddings=tie, rope_theta=rope_theta, rms_norm_eps=1e-5, **extra)
  m = model_cls(cfg).eval()
  with torch.no_grad():
    for name, p in m.named_parameters():
      if "norm" in name:
        p.copy_(1 + 0.1 * torch.randn_like(p))
      elif name.endswith(".bias"):
        p.copy_(0.5 * torch.randn_like(p))
  kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
  m.save_pretrained(str(out_dir), safe_serialization=True, **kw)
  os.makedirs(out_dir, exist_ok=True)
  return m


# The pre-tokenizer regexes of the real tokenizer.json files.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
               r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}"
                r"\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def make_bpe_tokenizer(out_dir, style="qwen2", vocab=600, n_texts=400):
  """Trains a byte-level BPE on the shipped medical text and saves it as Qwen2.5 or
  Llama 3 ship theirs: tokenizer.json (pipeline and special tokens of that family) and
  tokenizer_config.json. Returns the tokenizer.json path."""
  import json
  from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
  from tokenizers import processors, trainers
  from medjax.assets import asset_path
  from medjax.data import corpus
  texts = corpus.read_texts([asset_path("medical_text_sample.csv")])[:n_texts]
  tok = Tokenizer(models.BPE())
  split = QWEN2_SPLIT if style == "qwen2" else LLAMA3_SPLIT
  if style == "qwen2":
    tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(split), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  if style == "qwen2":  # specials after the merges, as Qwen's ids 151643+
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.add_special_tokens(specials)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    config = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None,
              "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": None,
              "add_prefix_space": False, "split_special_tokens": False, "errors": "replace",
              "clean_up_tokenization_spaces": False, "model_max_length": 32768}
  else:
    specials = ["<|begin_of_text|>", "<|end_of_text|>"]
    tok.add_special_tokens(specials)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                      pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
              "eos_token": "<|end_of_text|>", "clean_up_tokenization_spaces": True,
              "model_max_length": 131072}
  config["added_tokens_decoder"] = {
      str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False,
                                "rstrip": False, "single_word": False, "special": True}
      for t in specials}
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, "tokenizer.json")
  tok.save(path)
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  return path


def hf_logits(m, tokens, attention_mask=None):
  import torch
  with torch.no_grad():
    kw = {}
    if attention_mask is not None:
      kw["attention_mask"] = torch.tensor(attention_mask)
    return m(torch.tensor(tokens), **kw).logits.float().numpy()
