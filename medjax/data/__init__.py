"""Data: tokenizers, corpus and exam readers, packing, grain pipelines, tfds builders, and
the pipelines a run config asks for."""
