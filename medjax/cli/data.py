"""`medjax data build|show|overlap|bench` and `medjax tokenizer extend`.

  medjax data build cmexam --input medjax/assets/cmexam_sample.csv --out /tmp/tfds
  medjax data build medical_text --input corpus/ --out built/ --tokenizer tokenizer.model
  medjax data overlap --build tfds:built/ --eval cmexam_test.csv
  medjax data show --kind sft --input medjax/assets/cmexam_sample.csv --rows 2
  medjax data overlap --corpus medjax/assets/medical_text_sample.csv \
      --eval medjax/assets/cmexam_sample.csv --write-filtered /tmp/clean.jsonl
  medjax tokenizer extend --base llama2/tokenizer.model --corpus medical.csv --add 2000 --out tok/

--tokenizer defaults to the shipped 512-piece TinyStories tokenizer, so every command runs on
a fresh clone; pass Llama 2's tokenizer.model (or a tokenizer.json: Qwen2.5, Llama 3) for
real work. `tokenizer extend` takes SentencePiece bases only: a byte-level BPE base already
covers Chinese.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medjax.assets import asset_path
from medjax.cli.args import path
from medjax.data import cmexam, corpus
from medjax import inputs
from medjax.errors import DataError
from medjax.inputs import DIR, FILE, FILE_OR_DIR, NEW_DIR, NEW_FILE, WORKDIR, Float, Int, Text


def _default_tokenizer() -> str:
  return str(asset_path("tinystories-260k/tokenizer.model"))


def _print_problems(problems, limit: int = 20) -> None:
  if not problems:
    return
  print(f"{len(problems)} rows could not be parsed (not included):")
  for p in problems[:limit]:
    print(f"  {p}")
  if len(problems) > limit:
    print(f"  ... and {len(problems) - limit} more")


def _build_dir(text: str) -> None:
  """A `--build` value names an existing folder (`tfds:` optional)."""
  problem = inputs.path_problem(text.removeprefix("tfds:"), inputs.DIR)
  if problem:
    raise ValueError(problem)


def add_args(parser: argparse.ArgumentParser) -> None:
  sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)

  b = sub.add_parser("build", help="tokenize a corpus once into ArrayRecord rows (with "
                     "--tokenizer), or build a tfds text dataset")
  b.add_argument("name", choices=["medical_text", "cmexam"])
  path(b, "--input", kind=FILE_OR_DIR, required=True, help="file or folder (the tfds manual_dir)")
  path(b, "--out", kind=WORKDIR, required=True, help="data dir to write (train with tfds:OUT)")
  path(b, "--tokenizer", kind=FILE, default=None,
       help="tokenize once with this tokenizer (the run's tokenizer.model or tokenizer.json); "
       "without it, a tfds text dataset (tokenized at every start: small data only)")
  b.add_argument("--seq-len", type=Int(ge=1), default=None,
                 help="stored row length (default 4096 for medical_text, whose runs may use "
                      "any divisor; 1024 for cmexam, whose runs must use it)")
  b.add_argument("--workers", type=Int(ge=1), default=None,
                 help="tokenizing processes (default: one per core but one; 1 = tokenize "
                      "in the main process)")
  b.add_argument("--val-fraction", type=Float(ge=0, lt=1), default=0.02,
                 help="medical_text: documents held out for validation by a stable hash")
  b.add_argument("--with-explanation", action="store_true",
                 help="cmexam: train on the answer and its explanation")

  s = sub.add_parser("show", help="print decoded batch rows with the loss mask visible")
  s.add_argument("--kind", choices=["cpt", "sft"], required=True)
  path(s, "--input", kind=FILE_OR_DIR, nargs="+", help="corpus files (cpt) or a CMExam CSV "
       "(sft); default: the shipped sample")
  path(s, "--tokenizer", kind=FILE, default=None,
       help="tokenizer.model or tokenizer.json (default: shipped tiny)")
  s.add_argument("--seq-len", type=Int(ge=1), default=512)
  s.add_argument("--rows", type=Int(ge=1), default=2)
  s.add_argument("--seed", type=Int(ge=0, lt=2**31), default=0)
  s.add_argument("--with-explanation", action="store_true")

  o = sub.add_parser("overlap", help="eval questions sharing n-grams with a corpus or build")
  src = o.add_mutually_exclusive_group(required=True)
  path(src, "--corpus", kind=FILE_OR_DIR, nargs="+", help="raw corpus files or folders "
       "(streamed)")
  src.add_argument("--build", type=Text(check=_build_dir, what="a build folder, tfds:DIR"),
                   help="a tokenized build: tfds:DIR (or DIR), as in data.train")
  o.add_argument("--name", choices=["medical_text", "cmexam"], default="medical_text",
                 help="which dataset of the build")
  o.add_argument("--split", choices=["train", "validation"], default="train",
                 help="which split of the build")
  path(o, "--tokenizer", kind=FILE, default=None,
       help="--build: the build's tokenizer (default: the path in its manifest)")
  path(o, "--eval", kind=FILE, required=True, help="CMExam CSV")
  o.add_argument("--n", type=Int(ge=1), default=13, help="n-gram length in characters")
  o.add_argument("--show", type=Int(ge=0), default=5, help="worst cases to print")
  path(o, "--write-filtered", kind=NEW_FILE, suffix=".jsonl",
       help="--corpus: write corpus documents without overlap (.jsonl)")

  k = sub.add_parser("bench", help="CPT pipeline throughput in tokens/s")
  path(k, "--input", kind=FILE_OR_DIR, nargs="+", help="corpus (default: shipped medical sample)")
  path(k, "--tokenizer", kind=FILE, default=None)
  k.add_argument("--seq-len", type=Int(ge=1), default=2048)
  k.add_argument("--batch-size", type=Int(ge=1), default=8)
  k.add_argument("--batches", type=Int(ge=1), default=200)


def run(args: argparse.Namespace) -> int:
  return {"build": _build, "show": _show, "overlap": _overlap,
          "bench": _bench}[args.data_command](args)


def _build(args) -> int:
  if args.tokenizer:
    return _build_tokenized(args)
  from medjax.data import builders as datasets
  builder, problems = datasets.build(args.name, args.input, args.out)
  for split, info in builder.info.splits.items():
    print(f"{args.name} {split}: {info.num_examples} examples")
  print(f"written to {builder.data_dir}")
  _print_problems(problems)
  return 0


def _build_tokenized(args) -> int:
  from medjax.assets import resolve
  from medjax.data import build_tokenized
  from medjax.data.tokenizer import load_tokenizer
  tok = load_tokenizer(resolve(args.tokenizer))
  if args.name == "medical_text":
    root, m = build_tokenized.build_text(args.input, args.out, tok, args.seq_len or 4096,
                                         args.val_fraction, workers=args.workers, log=print)
    problems = []
  else:
    root, m, problems = build_tokenized.build_cmexam(args.input, args.out, tok,
                                                     args.seq_len or 1024,
                                                     args.with_explanation)
  total = 0
  for split, info in m["splits"].items():
    total += info["tokens"]
    print(f"{args.name} {split}: {info['documents']:,} documents, {info['tokens']:,} tokens "
          f"in {info['rows']:,} rows of {m['seq_len']} ({len(info['files'])} files)")
  secs = m["build_seconds"]
  print(f"tokenized {total:,} tokens in {secs:.1f} s ({total / max(secs, 1e-9):,.0f} "
        f"tokens/s); tokenizer sha256 {m['tokenizer']['sha256'][:16]}")
  print(f"written to {root} (train with --config.data.train=tfds:{args.out})")
  _print_problems(problems)
  return 0


def _show(args) -> int:
  from medjax.data import pipeline, preview
  from medjax.data.tokenizer import load_tokenizer
  tok = load_tokenizer(args.tokenizer or _default_tokenizer())
  if args.kind == "cpt":
    paths = args.input or [asset_path("medical_text_sample.csv")]
    it = pipeline.make_cpt_iterator(corpus.read_texts(paths), tok, args.seq_len, 1, args.seed)
  else:
    path = (args.input or [asset_path("cmexam_sample.csv")])[0]
    qs, problems = cmexam.read_cmexam(path)
    _print_problems(problems)
    it = pipeline.make_sft_iterator(qs, tok, args.seq_len, 1, args.seed,
                                    with_explanation=args.with_explanation)
  print("⟦...⟧ = tokens not trained on (loss_mask 0 for the position before them)")
  for r in range(args.rows):
    b = next(it)
    print(f"--- row {r}: {int(b['loss_mask'].sum())} of {args.seq_len} targets trained")
    print(preview.render_row(b, tok))
  return 0


def _overlap(args) -> int:
  from medjax.data import overlap
  qs, problems = cmexam.read_cmexam(args.eval)
  _print_problems(problems)
  texts = [q.question + "\n" + cmexam.format_options(q) for q in qs]
  if args.build:
    if args.write_filtered:
      raise DataError("--write-filtered works on --corpus files; filter the raw corpus and "
                      "build again")
    ov = _overlap_build(args, texts)
  else:
    if args.write_filtered and Path(args.write_filtered).suffix != ".jsonl":
      raise DataError(f"{args.write_filtered}: --write-filtered writes JSON lines; use a "
                      ".jsonl name")
    with _filtered_writer(args.write_filtered) as on_doc:
      ov = overlap.ngram_overlap(texts, corpus.iter_documents(args.corpus), args.n, on_doc)
  print(f"{len(ov.hits)} of {len(qs)} eval questions share a {args.n}-character n-gram "
        f"with the corpus; {len(ov.dirty_docs)} corpus documents are involved")
  worst = sorted(ov.hits, key=lambda i: -ov.hits[i] / max(ov.grams[i], 1))[:args.show]
  for i in worst:
    gram, where = ov.example[i]
    print(f"  {qs[i].source}: {ov.hits[i]}/{ov.grams[i]} n-grams shared, e.g. {gram!r} "
          f"in {where}")
  rate = f"{ov.scanned / max(ov.seconds, 1e-9):,.0f} characters/s"
  if ov.tokens:
    rate = f"{ov.tokens:,} tokens, {ov.tokens / max(ov.seconds, 1e-9):,.0f} tokens/s; " + rate
  print(f"scanned {ov.scanned:,} corpus characters in {ov.seconds:.1f} s ({rate})")
  return 0


def _overlap_build(args, texts):
  from medjax.data import overlap, tokenized
  from medjax.data.tokenizer import load_tokenizer
  data_dir = args.build[len("tfds:"):] if args.build.startswith("tfds:") else args.build
  root = tokenized.find(data_dir, args.name)
  if root is None:
    raise DataError(f"{data_dir}: no tokenized {args.name} build (run `medjax data build "
                    f"{args.name} --tokenizer ...`)")
  b = tokenized.Build(root)
  tok = load_tokenizer(args.tokenizer or b.manifest["tokenizer"]["path"])
  b.check_tokenizer(tok)  # decoding with another tokenizer would give other text
  return overlap.build_overlap(texts, b.iter_documents(args.split), tok.decode, args.n)


class _filtered_writer:
  """on_doc callback writing the documents without overlap to a .jsonl file (or nothing)."""

  def __init__(self, path):
    self.path, self.f, self.kept, self.removed = path and Path(path), None, 0, 0

  def __enter__(self):
    if self.path is None:
      return None
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self.f = self.path.open("w", encoding="utf-8")
    return self

  def __call__(self, j, d, dirty):
    if dirty:
      self.removed += 1
      return
    self.f.write(json.dumps({"text": d.text, "source": d.source}, ensure_ascii=False) + "\n")
    self.kept += 1

  def __exit__(self, *exc):
    if self.f is not None:
      self.f.close()
      if exc[0] is None:
        print(f"wrote {self.kept} documents ({self.removed} removed) to {self.path}")
      else:
        self.path.unlink(missing_ok=True)  # nothing half-written is left behind


def _bench(args) -> int:
  from medjax.data import preview
  from medjax.data.tokenizer import load_tokenizer
  tok = load_tokenizer(args.tokenizer or _default_tokenizer())
  texts = corpus.read_texts(args.input or [asset_path("medical_text_sample.csv")])
  r = preview.bench_data(texts, tok, args.seq_len, args.batch_size, args.batches)
  print(json.dumps(r, indent=2))
  return 0


# ----------------------------------------------------------------- medjax tokenizer ...


def tokenizer_add_args(parser: argparse.ArgumentParser) -> None:
  sub = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
  e = sub.add_parser("extend", help="add domain pieces to a SentencePiece model")
  path(e, "--base", kind=FILE, default=None, help="base SentencePiece tokenizer.model "
       "(default: shipped tiny); a tokenizer.json base is refused: it already covers Chinese")
  path(e, "--corpus", kind=FILE_OR_DIR, nargs="+", required=True,
       help="corpus files or folders")
  e.add_argument("--add", type=Int(ge=1), required=True, help="most pieces to add")
  path(e, "--out", kind=NEW_DIR, required=True, help="output folder for tokenizer.model")
  e.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
  r = sub.add_parser("resize", help="grow a checkpoint's embeddings to an extended tokenizer")
  path(r, "--checkpoint", kind=DIR, required=True, help="medjax model dir or training workdir")
  path(r, "--tokenizer", kind=FILE, required=True,
       help="the extended tokenizer.model (or a tokenizer.json)")
  path(r, "--out", kind=NEW_DIR, required=True,
       help="new model dir (input to train's init_from)")


def tokenizer_run(args: argparse.Namespace) -> int:
  from medjax.data.extend import extend_tokenizer
  if args.tokenizer_command == "resize":
    from medjax.checkpoints import vocab
    vocab.resize_checkpoint(args.checkpoint, args.tokenizer, args.out)
    return 0
  texts = corpus.read_texts(args.corpus)
  report = extend_tokenizer(args.base or _default_tokenizer(), texts, args.add, args.out,
                            model_type=args.model_type)
  print(json.dumps(report, ensure_ascii=False, indent=2))
  return 0
