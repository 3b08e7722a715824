"""Model architecture config: a small frozen dataclass, presets, and its own JSON form.

The run config (ml_collections, `configs/*.py`) refers to a preset by name or to an HF
directory (read by `checkpoints.hf_config`); layers only ever see this dataclass.
"""

from __future__ import annotations

import dataclasses
import json

from medjax.errors import ConfigError


ATTENTION = ("einsum", "dot_product", "cudnn", "splash", "auto")
# The Hugging Face families this one model expresses with its switches (`model_type` says
# which class `export-hf` writes): Llama 2 / 3.x ("llama") and Qwen2 / Qwen2.5 ("qwen2").
MODEL_TYPES = ("llama", "qwen2")
# "default": RoPE with rope_theta; "llama3": Llama 3.1's frequency-dependent scaling.
ROPE_TYPES = ("default", "llama3")
# What a layer keeps for the backward pass (the rest is recomputed):
#   none: everything; full: only the layer's input;
#   dots_saveable: every matmul output (jax.checkpoint_policies.checkpoint_dots);
#   dots_no_batch: matmuls with weights, not attention's batched ones
#     (checkpoint_dots_with_no_batch_dims);
#   offload: as full, but the layer inputs wait in host memory (TPU; frees B*T*D*L*2
#     bytes of HBM, 1 GiB per 4096-token sequence for 7B, for host<->HBM copies).
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_no_batch", "offload")
DTYPES = ("float32", "bfloat16", "float16")  # compute dtypes
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # projections LoRA can adapt


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """A Llama-family decoder (field names follow HF's `LlamaConfig` where they exist).

  The defaults are Llama 2; Llama 3.x and Qwen2.5 differ only in the switches below
  (biases, RoPE scaling, head_dim, tied head) and in their shapes (`PRESETS`).
  """

  model_type: str = "llama"  # one of MODEL_TYPES: the HF class export-hf writes
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int = 32
  head_dim: int | None = None  # None: hidden_size // num_attention_heads
  max_position_embeddings: int = 4096
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  # RoPE scaling (HF `rope_scaling`); the factors are read only when rope_type="llama3".
  rope_type: str = "default"
  rope_factor: float = 8.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position_embeddings: int = 8192
  qkv_bias: bool = False  # biases on q/k/v (Qwen2; HF Llama's attention_bias)
  o_bias: bool = False  # bias on the attention output (HF Llama's attention_bias)
  mlp_bias: bool = False  # biases on gate/up/down (HF Llama's mlp_bias)
  tie_word_embeddings: bool = False
  bos_token_id: int | None = 1  # None: the checkpoint names none (Qwen2's configs may not)
  eos_token_id: int | None = 2
  # Implementation knobs (not part of the HF architecture).
  param_dtype: str = "float32"
  dtype: str = "float32"  # compute dtype, e.g. "bfloat16"
  scan_layers: bool = False
  remat: str = "none"  # one of REMAT_POLICIES
  # einsum (XLA: flash-style `model.attention` in full passes, the reference einsum with
  # a KV cache) | dot_product (jax.nn.dot_product_attention with a dense mask, XLA's) |
  # cudnn (cuDNN flash on GPU for rows of one document, model.attention_gpu) |
  # splash (Pallas TPU kernel, model.attention_tpu) | auto (splash when compiling for TPU,
  # cudnn for GPU with bf16/fp16 activations, else einsum). cudnn/splash/auto use einsum
  # for KV-cache decoding; splash also for lengths that are not a multiple of 128.
  attention: str = "einsum"
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = ("q", "k", "v", "o")

  def __post_init__(self):
    if self.model_type not in MODEL_TYPES:
      raise ConfigError(f"model_type={self.model_type!r}: expected one of {', '.join(MODEL_TYPES)}")
    if self.rope_type not in ROPE_TYPES:
      raise ConfigError(f"rope_type={self.rope_type!r}: expected one of {', '.join(ROPE_TYPES)}")
    if self.rope_type == "llama3" and not (
        self.rope_factor > 0 and self.rope_high_freq_factor > self.rope_low_freq_factor > 0
        and self.rope_original_max_position_embeddings > 0):
      raise ConfigError(f"llama3 RoPE scaling needs factor > 0 and high_freq_factor > "
                        f"low_freq_factor > 0 (got factor={self.rope_factor}, low_freq_factor="
                        f"{self.rope_low_freq_factor}, high_freq_factor="
                        f"{self.rope_high_freq_factor})")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ConfigError(
          f"num_attention_heads={self.num_attention_heads} must be a multiple of "
          f"num_key_value_heads={self.num_key_value_heads}"
      )
    if self.head_dim is None and self.hidden_size % self.num_attention_heads:
      raise ConfigError(
          f"hidden_size={self.hidden_size} is not divisible by "
          f"num_attention_heads={self.num_attention_heads}; set head_dim"
      )
    if self.remat not in REMAT_POLICIES:
      raise ConfigError(f"remat={self.remat!r}: expected one of {', '.join(REMAT_POLICIES)}")
    if self.attention not in ATTENTION:
      raise ConfigError(f"attention={self.attention!r}: expected one of {', '.join(ATTENTION)}")
    bad = set(self.lora_targets) - set(LORA_TARGETS)
    if bad:
      raise ConfigError(f"lora_targets: unknown projections {sorted(bad)}")

  @property
  def hd(self) -> int:
    return self.head_dim or self.hidden_size // self.num_attention_heads

  def replace(self, **kw) -> "LlamaConfig":
    return dataclasses.replace(self, **kw)

  def num_params(self, include_embedding: bool = True) -> int:
    d, f, h, k, hd = (self.hidden_size, self.intermediate_size, self.num_attention_heads,
                      self.num_key_value_heads, self.hd)
    per_layer = d * hd * (h + 2 * k) + h * hd * d + 3 * d * f + 2 * d
    per_layer += ((h + 2 * k) * hd if self.qkv_bias else 0) + (d if self.o_bias else 0)
    per_layer += (2 * f + d) if self.mlp_bias else 0
    n = self.num_hidden_layers * per_layer + d
    if include_embedding:
      n += self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
    elif not self.tie_word_embeddings:
      n += self.vocab_size * d  # the output head is a real matmul
    return n

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token: 6 * matmul params + attention (PaLM appendix B)."""
    n = self.num_params(include_embedding=False)
    if self.tie_word_embeddings:
      n += self.vocab_size * self.hidden_size
    attn = 12 * self.num_hidden_layers * self.num_attention_heads * self.hd * seq_len / 2
    return 6.0 * n + attn


_LLAMA3 = dict(vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
               rope_type="llama3", bos_token_id=128000, eos_token_id=128001)
_QWEN25 = dict(model_type="qwen2", qkv_bias=True, rms_norm_eps=1e-6, rope_theta=1000000.0,
               bos_token_id=151643, eos_token_id=151643)

# Shapes from the Llama 2 paper and the config.json files of Meta's and Qwen's HF checkpoints.
PRESETS: dict[str, LlamaConfig] = {
    "llama2-7b": LlamaConfig(),
    "llama2-13b": LlamaConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                              num_attention_heads=40, num_key_value_heads=40),
    "llama2-70b": LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                              num_attention_heads=64, num_key_value_heads=8),
    "llama3.1-8b": LlamaConfig(**_LLAMA3, hidden_size=4096, intermediate_size=14336,
                               num_hidden_layers=32, num_attention_heads=32,
                               num_key_value_heads=8),
    # Llama 3.2 1B: the small Llama 3 (tied head, RoPE factor 32).
    "llama3.2-1b": LlamaConfig(**_LLAMA3, hidden_size=2048, intermediate_size=8192,
                               num_hidden_layers=16, num_attention_heads=32,
                               num_key_value_heads=8, rope_factor=32.0,
                               tie_word_embeddings=True),
    "qwen2.5-7b": LlamaConfig(**_QWEN25, vocab_size=152064, hidden_size=3584,
                              intermediate_size=18944, num_hidden_layers=28,
                              num_attention_heads=28, num_key_value_heads=4,
                              max_position_embeddings=131072),
    "qwen2.5-0.5b": LlamaConfig(**_QWEN25, vocab_size=151936, hidden_size=896,
                                intermediate_size=4864, num_hidden_layers=24,
                                num_attention_heads=14, num_key_value_heads=2,
                                max_position_embeddings=32768, tie_word_embeddings=True),
    # Tiny shapes for CPU tests.
    "tiny": LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512),
    "tiny-mha": LlamaConfig(vocab_size=301, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                            max_position_embeddings=256),
}


def preset(name: str, **overrides) -> LlamaConfig:
  if name not in PRESETS:
    raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
  return PRESETS[name].replace(**overrides)


def to_json(cfg: LlamaConfig) -> str:
  return json.dumps(dataclasses.asdict(cfg), indent=1)


def from_json(text: str, source: str = "model_config.json") -> LlamaConfig:
  try:
    d = json.loads(text)
  except json.JSONDecodeError as e:
    raise ConfigError(f"{source}: not valid JSON ({e})") from None
  fields = {f.name for f in dataclasses.fields(LlamaConfig)}
  unknown = set(d) - fields
  if unknown:
    raise ConfigError(f"{source}: unknown field(s) {', '.join(sorted(unknown))}")
  if "lora_targets" in d:
    d["lora_targets"] = tuple(d["lora_targets"])
  return LlamaConfig(**d)
