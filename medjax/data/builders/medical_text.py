"""tfds builder `medical_text`: plain medical documents for continued pretraining.

manual_dir: a corpus file or folder (`.txt`, `.jsonl`, `.csv`; see `medjax.data.corpus`). The
documents are split into train and validation by a hash of their text (2% validation).
"""

from __future__ import annotations

import tensorflow_datasets as tfds

from medjax.data import corpus

VAL_FRACTION = 0.02


class MedicalText(tfds.core.GeneratorBasedBuilder):
  """Medical text documents, one example per document."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass a corpus file or folder as --input (manual_dir)."

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "source": tfds.features.Text(),  # "file:line"
        }),
        supervised_keys=None,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    files = [f.resolve() for f in corpus.list_files(dl_manager.manual_dir)]
    docs = corpus.read_documents(files)
    train, val = corpus.split_documents(docs, VAL_FRACTION, seed=0)
    # tfds rejects an empty split; a tiny corpus may hash no document into validation.
    splits = {"train": train, "validation": val}
    return {k: self._generate_examples(v) for k, v in splits.items() if v}

  def _generate_examples(self, docs):
    for i, d in enumerate(docs):
      # The source is unique per document; the index guards against duplicate lines.
      yield f"{d.source}#{i}", {"text": d.text, "source": d.source}
