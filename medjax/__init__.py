"""medjax: continued pretraining and SFT of Llama 2 for medical QA, in JAX/Flax."""

from medjax.config import LlamaConfig, PRESETS, preset
from medjax.errors import CheckpointError, ConfigError, DataError, MedjaxError


def load(path: str, **overrides):
  """An HF Llama dir or medjax checkpoint -> model callable on int32 tokens [B,T] -> logits."""
  from medjax.hf import load as _load
  return _load(path, **overrides)


__all__ = ["LlamaConfig", "PRESETS", "preset", "load", "MedjaxError", "ConfigError",
           "CheckpointError", "DataError"]
__version__ = "0.1.0"
