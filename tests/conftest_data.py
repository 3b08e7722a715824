"""Shared fixtures for the data-layer tests (imported by test_tokenizer/test_cmexam/test_data)."""

from pathlib import Path

import pytest

# The development data lives next to the repo, not in it: a user's clone has no shared/.
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
LLAMA_TOKENIZER = SHARED / "llama2-tokenizer" / "tokenizer.model"
CMEXAM_CSV = SHARED / "cmexam" / "cmexam_val_part.csv"
ASSETS = Path(__file__).resolve().parents[1] / "medjax" / "assets"
TINY_TOKENIZER = ASSETS / "tinystories-260k" / "tokenizer.model"  # shipped


def need(path: Path) -> Path:
  """Skips the calling test when a file from ../shared/data is absent."""
  if not path.exists():
    pytest.skip(f"{path} not present (needs the shared development data)")
  return path


@pytest.fixture(scope="session")
def tiny_tok():
  """The 512-piece TinyStories tokenizer, shipped in the package."""
  from medjax.data.tokenizer import Tokenizer
  return Tokenizer(TINY_TOKENIZER)


@pytest.fixture(scope="session")
def llama_tok():
  from medjax.data.tokenizer import Tokenizer
  return Tokenizer(need(LLAMA_TOKENIZER))
