"""medjax: continued pretraining and SFT of Llama-family models for medical QA, in JAX/Flax."""

from medjax.errors import CheckpointError, ConfigError, DataError, MedjaxError
from medjax.model.config import PRESETS, LlamaConfig, preset


def load(path: str, mesh=None, rules=None, **overrides):
  """An HF Llama/Qwen2 dir, medjax checkpoint or training workdir -> a model callable on int32
  tokens [B,T] -> f32 logits [B,T,V] (`checkpoints.load.Loaded`). With `mesh`, the params
  are read straight onto it, sharded by the training rules (`rules` overrides them)."""
  from medjax.checkpoints.load import load as _load
  return _load(path, mesh=mesh, rules=rules, **overrides)


def __getattr__(name: str):
  # `medjax.Tokenizer` without importing sentencepiece for every `import medjax`.
  if name == "Tokenizer":
    from medjax.data.tokenizer import Tokenizer
    return Tokenizer
  if name == "load_tokenizer":  # tokenizer.model or tokenizer.json, by file or model dir
    from medjax.data.tokenizer import load_tokenizer
    return load_tokenizer
  raise AttributeError(f"module 'medjax' has no attribute {name!r}")


__all__ = ["LlamaConfig", "PRESETS", "preset", "load", "Tokenizer", "load_tokenizer", "MedjaxError",
           "ConfigError", "CheckpointError", "DataError"]
__version__ = "0.1.0"
