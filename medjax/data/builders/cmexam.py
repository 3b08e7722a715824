"""tfds builder `cmexam`: CMExam multiple-choice questions.

manual_dir: a CMExam CSV or a folder of them. A file whose name contains "train", "val" or
"test" goes to that split (train / validation / test); other files go to "validation", as the
shipped sample is validation data. Rows that cannot be parsed are kept out of the dataset
and listed in `builder.problems` (file, line, reason); `medjax data build` prints them.
"""

from __future__ import annotations

import json
from pathlib import Path

import tensorflow_datasets as tfds

from medjax.data import cmexam
from medjax.data.build_tokenized import split_of
from medjax.errors import DataError


class Cmexam(tfds.core.GeneratorBasedBuilder):
  """CMExam questions; `record` is `cmexam.question_to_record` as JSON."""

  name = "cmexam"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass a CMExam CSV or a folder of them as --input."

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            # Options and annotations vary per file: one JSON record keeps the schema fixed.
            "record": tfds.features.Text(),
            "answer": tfds.features.Text(),
            "source": tfds.features.Text(),
        }),
        supervised_keys=None,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = Path(dl_manager.manual_dir)
    files = sorted(f.resolve() for f in root.rglob("*.csv"))
    if not files:
      raise DataError(f"{root}: no .csv files")
    by_split: dict[str, list] = {}
    self.problems = []
    for f in files:
      qs, problems = cmexam.read_cmexam(f)
      self.problems.extend(problems)
      by_split.setdefault(split_of(f), []).extend(qs)
    return {split: self._generate_examples(qs) for split, qs in by_split.items()}

  def _generate_examples(self, questions):
    for q in questions:
      rec = json.dumps(cmexam.question_to_record(q), ensure_ascii=False)
      yield q.source, {"record": rec, "answer": q.answer, "source": q.source}
