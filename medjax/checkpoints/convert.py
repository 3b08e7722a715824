"""Hugging Face <-> medjax weights, as one reviewable table per family, used in both directions.

Each row: HF key regex -> medjax path template and a layout transform. medjax keeps HF's
split-halves RoPE and applies query scaling in the forward pass, so no permutation is needed.
Per-layer paths use `layers_{i}`; scanned params stack them under `layers` (see `stack_layers`).
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Callable, Iterator

import numpy as np

from medjax.checkpoints import safetensors_io
from medjax.model.config import LlamaConfig
from medjax.errors import CheckpointError

# (HF regex, medjax path, transform), one table per family (`LlamaConfig.model_type`).
# Transforms name how HF [out, in] maps to ours. Which of a table's tensors a checkpoint has
# follows the config's switches (`hf_keys`): biases, and lm_head only when untied.
_DECODER: list[tuple[str, str, str]] = [
    (r"model\.embed_tokens\.weight", "embedding", "copy"),
    (r"model\.norm\.weight", "final_norm/scale", "copy"),
    (r"lm_head\.weight", "lm_head", "T"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", "layers_{}/attn_norm/scale", "copy"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "layers_{}/mlp_norm/scale", "copy"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", "layers_{}/attn/q/w", "in_heads"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", "layers_{}/attn/k/w", "in_heads"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", "layers_{}/attn/v/w", "in_heads"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", "layers_{}/attn/o/w", "out_heads"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", "layers_{}/mlp/gate/w", "T"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", "layers_{}/mlp/up/w", "T"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", "layers_{}/mlp/down/w", "T"),
]
_QKV_BIASES: list[tuple[str, str, str]] = [
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.bias", "layers_{}/attn/q/b", "heads"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.bias", "layers_{}/attn/k/b", "heads"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.bias", "layers_{}/attn/v/b", "heads"),
]
TABLES: dict[str, list[tuple[str, str, str]]] = {
    # Llama 2 / 3.x; the biases only with attention_bias / mlp_bias (no Meta release has them).
    "llama": _DECODER + _QKV_BIASES + [
        (r"model\.layers\.(\d+)\.self_attn\.o_proj\.bias", "layers_{}/attn/o/b", "copy"),
        (r"model\.layers\.(\d+)\.mlp\.gate_proj\.bias", "layers_{}/mlp/gate/b", "copy"),
        (r"model\.layers\.(\d+)\.mlp\.up_proj\.bias", "layers_{}/mlp/up/b", "copy"),
        (r"model\.layers\.(\d+)\.mlp\.down_proj\.bias", "layers_{}/mlp/down/b", "copy"),
    ],
    # Qwen2 / Qwen2.5: Llama's names, plus q/k/v biases in every checkpoint.
    "qwen2": _DECODER + _QKV_BIASES,
}
# Buffers some exporters write; they are recomputed, not weights.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def hf_keys(cfg: LlamaConfig) -> list[str]:
  """All HF tensor names of a model with this config, in HF's order."""
  keys = ["model.embed_tokens.weight"]
  attn = [f"self_attn.{p}_proj.weight" for p in "qkvo"]
  if cfg.qkv_bias:
    attn += [f"self_attn.{p}_proj.bias" for p in "qkv"]
  if cfg.o_bias:
    attn.append("self_attn.o_proj.bias")
  mlp = [f"mlp.{p}_proj.{w}" for p in ("gate", "up", "down")
         for w in (("weight", "bias") if cfg.mlp_bias else ("weight",))]
  for i in range(cfg.num_hidden_layers):
    p = f"model.layers.{i}."
    keys += [p + s for s in attn + mlp + ["input_layernorm.weight",
                                          "post_attention_layernorm.weight"]]
  keys.append("model.norm.weight")
  if not cfg.tie_word_embeddings:
    keys.append("lm_head.weight")
  return keys


def lookup(hf_key: str, model_type: str = "llama") -> tuple[str, str] | None:
  """(medjax per-layer path, transform) of an HF tensor name in `model_type`'s table."""
  for pat, path, kind in TABLES[model_type]:
    m = re.fullmatch(pat, hf_key)
    if m:
      return path.format(*m.groups()), kind
  return None


def hf_shape(cfg: LlamaConfig, key: str) -> tuple[int, ...]:
  d, f, v, hd = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.hd
  nq, nk = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
  for suffix, shape in (("embed_tokens.weight", (v, d)), ("lm_head.weight", (v, d)),
                        ("q_proj.weight", (nq, d)), ("k_proj.weight", (nk, d)),
                        ("v_proj.weight", (nk, d)), ("o_proj.weight", (d, nq)),
                        ("gate_proj.weight", (f, d)), ("up_proj.weight", (f, d)),
                        ("down_proj.weight", (d, f)), ("norm.weight", (d,)),
                        ("layernorm.weight", (d,)), ("q_proj.bias", (nq,)),
                        ("k_proj.bias", (nk,)), ("v_proj.bias", (nk,)), ("o_proj.bias", (d,)),
                        ("gate_proj.bias", (f,)), ("up_proj.bias", (f,)),
                        ("down_proj.bias", (d,))):
    if key.endswith(suffix):
      return shape
  raise KeyError(key)


def to_medjax(cfg: LlamaConfig, kind: str, w: np.ndarray) -> np.ndarray:
  hd = cfg.hd
  if kind == "copy":
    return w
  if kind == "T":
    return w.T
  if kind == "in_heads":  # [heads*hd, D] -> [D, heads, hd]
    return w.T.reshape(w.shape[1], w.shape[0] // hd, hd)
  if kind == "out_heads":  # [D, N*hd] -> [N, hd, D]
    return w.T.reshape(w.shape[1] // hd, hd, w.shape[0])
  if kind == "heads":  # bias [heads*hd] -> [heads, hd]
    return w.reshape(w.shape[0] // hd, hd)
  raise ValueError(kind)


def to_hf(kind: str, w: np.ndarray) -> np.ndarray:
  if kind == "copy":
    return w
  if kind == "T":
    return w.T
  if kind == "in_heads":  # [D, heads, hd] -> [heads*hd, D]
    return w.reshape(w.shape[0], -1).T
  if kind == "out_heads":  # [N, hd, D] -> [D, N*hd]
    return w.reshape(-1, w.shape[-1]).T
  if kind == "heads":  # bias [heads, hd] -> [heads*hd]
    return w.reshape(-1)
  raise ValueError(kind)


# ----------------------------------------------------------------------------- files


def find_weight_files(hf_dir: str) -> list[str]:
  """The safetensors files of an HF dir (single or sharded); refuses pickles."""
  index = os.path.join(hf_dir, "model.safetensors.index.json")
  single = os.path.join(hf_dir, "model.safetensors")
  if os.path.exists(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
      raise CheckpointError(f"{index}: malformed index ({e})") from None
    files = sorted(set(weight_map.values()))
    missing = [x for x in files if not os.path.exists(os.path.join(hf_dir, x))]
    if missing:
      raise CheckpointError(f"{index}: lists missing shard file(s) {', '.join(missing)}")
    return [os.path.join(hf_dir, x) for x in files]
  if os.path.exists(single):
    return [single]
  pickles = sorted(glob.glob(os.path.join(hf_dir, "*.bin")) + glob.glob(os.path.join(hf_dir, "*.pt"))
                   + glob.glob(os.path.join(hf_dir, "*.pth")))
  if pickles:
    raise CheckpointError(
        f"{pickles[0]}: refusing to load a PyTorch pickle (unpickling can run arbitrary code). "
        "Convert it to safetensors first, in a trusted environment: "
        "`AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True)`")
  raise CheckpointError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json found")


def iter_hf_params(cfg: LlamaConfig, hf_dir: str, dtype=np.float32
                   ) -> Iterator[tuple[str, np.ndarray]]:
  """Streams (medjax per-layer path, array) from an HF dir, in file order. Names and shapes
  are checked from the shard headers (`index_hf_params`) before the first tensor is read."""
  for path, entry in index_hf_params(cfg, hf_dir).items():
    yield path, read_hf_param(cfg, entry, dtype)


def index_hf_params(cfg: LlamaConfig, hf_dir: str) -> dict[str, tuple[str, str, str, tuple]]:
  """Where each tensor lives, from the shard headers only: every name and shape is checked
  against `cfg`, and a missing tensor is an error.

  Returns:
    {medjax per-layer path: (HF key, transform, file, (header, data_start))}, for reading
    tensors in any order with `read_hf_param`.
  """
  expected = set(hf_keys(cfg))
  out = {}
  for path in find_weight_files(hf_dir):
    header, start = safetensors_io.read_header(path)
    for key, info in header.items():
      # Some exporters write the tied head too; it equals the embedding.
      if _IGNORED.match(key) or (cfg.tie_word_embeddings and key == "lm_head.weight"):
        continue
      hit = lookup(key, cfg.model_type)
      if hit is None or key not in expected:
        raise CheckpointError(f"{path}: unexpected tensor {key!r} for this config.json "
                              f"({cfg.num_hidden_layers} layers)")
      if tuple(info["shape"]) != hf_shape(cfg, key):
        raise CheckpointError(f"{path}: tensor {key!r} has shape {tuple(info['shape'])}, "
                              f"config.json implies {hf_shape(cfg, key)}")
      out[hit[0]] = (key, hit[1], path, (header, start))
  missing = sorted(expected - {v[0] for v in out.values()})
  if missing:
    raise CheckpointError(f"{hf_dir}: missing tensor(s) {', '.join(missing[:5])}"
                          + (" ..." if len(missing) > 5 else ""))
  return out


def read_hf_param(cfg: LlamaConfig, entry, dtype=np.float32) -> np.ndarray:
  """One `index_hf_params` entry, read and laid out as medjax stores it."""
  key, kind, path, (header, start) = entry
  w = safetensors_io.read_tensor(path, key, header, start)
  return to_medjax(cfg, kind, w.astype(dtype, copy=False))


def medjax_to_hf_items(cfg: LlamaConfig) -> list[tuple[str, str, str]]:
  """(HF key, medjax per-layer path, transform) for every HF tensor."""
  out = []
  for key in hf_keys(cfg):
    path, kind = lookup(key, cfg.model_type)
    out.append((key, path, kind))
  return out


def write_hf_weights(cfg: LlamaConfig, out_dir: str, get: Callable[[str], np.ndarray],
                     dtype, max_shard_bytes: int = 5 << 30) -> list[str]:
  """Streams weights into safetensors shards (+ index when more than one), HF style."""
  items = medjax_to_hf_items(cfg)
  itemsize = np.dtype(dtype).itemsize
  shards: list[list[tuple[str, str, str]]] = [[]]
  size = 0
  for it in items:
    nbytes = int(np.prod(hf_shape(cfg, it[0]))) * itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(it)
    size += nbytes
  names = (["model.safetensors"] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  weight_map, total = {}, 0
  for fname, shard in zip(names, shards):
    kinds = {k: (p, kind) for k, p, kind in shard}
    specs = [(k, hf_shape(cfg, k), np.dtype(dtype)) for k, _, _ in shard]

    def produce(key, kinds=kinds):
      p, kind = kinds[key]
      return to_hf(kind, np.asarray(get(p))).astype(dtype)

    safetensors_io.write_file(os.path.join(out_dir, fname), specs, produce)
    for k, shape, _ in specs:
      weight_map[k] = fname
      total += int(np.prod(shape)) * itemsize
  if len(names) > 1:
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return names
