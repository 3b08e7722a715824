"""tfds builders for medjax data, written as array_record files and read with grain.

    medjax data build medical_text --input CORPUS_DIR_OR_FILE --out DATA_DIR
    medjax data build cmexam --input CSV_DIR_OR_FILE --out DATA_DIR

Both use tfds' `manual_dir` (the `--input` path) and `file_format="array_record"`, which needs
no TensorFlow: tfds writes and reads array_record with numpy only. `load_texts` and
`load_questions` read a built split back through `tfds.data_source` (random access, usable
as a grain source).

tfds 4.9.10 imports the `importlib_resources` backport only to check a type; on Python >= 3.9
the standard library module is identical, so we alias it rather than add a dependency.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import importlib.resources.abc
import io
import json
import os
import sys
import tempfile
from pathlib import Path

try:
  import importlib_resources  # noqa: F401
except ImportError:
  sys.modules["importlib_resources"] = importlib.resources

from medjax.errors import DataError

BUILDERS = ("medical_text", "cmexam")


def builder_class(name: str):
  """The tfds builder class for `name` (imported lazily: tfds is slow to import)."""
  if name == "medical_text":
    from medjax.data.builders.medical_text import MedicalText
    return MedicalText
  if name == "cmexam":
    from medjax.data.builders.cmexam import Cmexam
    return Cmexam
  raise DataError(f"unknown dataset {name!r} (choose from {', '.join(BUILDERS)})")


def build(name: str, input_path: str | os.PathLike, out_dir: str | os.PathLike):
  """Builds dataset `name` from `input_path` into the tfds data dir `out_dir`.

  Args:
    name: "medical_text" or "cmexam".
    input_path: the manual_dir: a file or a folder of input files.
    out_dir: tfds data_dir; the dataset lands in out_dir/name/VERSION/.

  Returns:
    (builder, problems): the prepared builder and the rows that could not be parsed
    (`cmexam.Problem`, with file and line).
  """
  import tensorflow_datasets as tfds
  if not Path(input_path).exists():
    raise DataError(f"{input_path}: no such file or folder")
  cls = builder_class(name)
  b = cls(data_dir=str(out_dir), file_format="array_record")
  with tempfile.TemporaryDirectory() as tmp:
    manual = Path(input_path)
    if manual.is_file():
      # tfds wants manual_dir to be a folder: link the one file into a temporary one
      # (the builders resolve links, so sources still name the real file).
      (Path(tmp) / manual.name).symlink_to(manual.resolve())
      manual = Path(tmp)
    # tfds prints "Downloading and preparing dataset Unknown size ..." and "Subsequent calls
    # will reuse this data" to stdout though nothing is downloaded; `data build` prints what
    # was built instead. Its progress bars (stderr) still show.
    with contextlib.redirect_stdout(io.StringIO()):
      b.download_and_prepare(download_config=tfds.download.DownloadConfig(
          manual_dir=str(manual)))
  return b, list(getattr(b, "problems", []))


def _source(data_dir: str | os.PathLike, name: str, split: str):
  import tensorflow_datasets as tfds
  root = Path(data_dir) / name
  versions = sorted(p for p in root.glob("*") if (p / "dataset_info.json").exists())
  if not versions:
    raise DataError(f"{root}: no built dataset (run `medjax data build {name}` first)")
  builder = tfds.builder_from_directory(str(versions[-1]))
  if split not in builder.info.splits:
    raise DataError(f"{versions[-1]}: no split {split!r} "
                    f"(have {', '.join(builder.info.splits)})")
  return builder.as_data_source(split=split)


def load_texts(data_dir: str | os.PathLike, split: str = "train") -> list[str]:
  """The documents of a built `medical_text` split."""
  src = _source(data_dir, "medical_text", split)
  return [src[i]["text"].decode("utf-8") for i in range(len(src))]


def load_questions(data_dir: str | os.PathLike, split: str = "validation"):
  """The `cmexam.Question`s of a built `cmexam` split."""
  from medjax.data import cmexam
  src = _source(data_dir, "cmexam", split)
  return [cmexam.question_from_record(json.loads(src[i]["record"])) for i in range(len(src))]
