"""`medjax data build|show|overlap|bench` and `medjax tokenizer extend`.

  medjax data build cmexam --input medjax/assets/cmexam_sample.csv --out /tmp/tfds
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
from medjax.inputs import FILE, FILE_OR_DIR, NEW_DIR, NEW_FILE, WORKDIR, DIR, Int


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


def add_args(parser: argparse.ArgumentParser) -> None:
  sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)

  b = sub.add_parser("build", help="build a tfds array_record dataset from raw files")
  b.add_argument("name", choices=["medical_text", "cmexam"])
  path(b, "--input", kind=FILE_OR_DIR, required=True, help="file or folder (the tfds manual_dir)")
  path(b, "--out", kind=WORKDIR, required=True, help="tfds data_dir to write (or add to)")

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

  o = sub.add_parser("overlap", help="eval questions sharing n-grams with a corpus")
  path(o, "--corpus", kind=FILE_OR_DIR, nargs="+", required=True)
  path(o, "--eval", kind=FILE, required=True, help="CMExam CSV")
  o.add_argument("--n", type=Int(ge=1), default=13, help="n-gram length in characters")
  o.add_argument("--show", type=Int(ge=0), default=5, help="worst cases to print")
  path(o, "--write-filtered", kind=NEW_FILE, suffix=".jsonl",
       help="write corpus documents without overlap (.jsonl)")

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
  from medjax.data import builders as datasets
  builder, problems = datasets.build(args.name, args.input, args.out)
  for split, info in builder.info.splits.items():
    print(f"{args.name} {split}: {info.num_examples} examples")
  print(f"written to {builder.data_dir}")
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
  docs = corpus.read_documents(args.corpus)
  qs, problems = cmexam.read_cmexam(args.eval)
  _print_problems(problems)
  texts = [q.question + "\n" + cmexam.format_options(q) for q in qs]
  ov = overlap.ngram_overlap(texts, docs, args.n)
  print(f"{len(ov.hits)} of {len(qs)} eval questions share a {args.n}-character n-gram with "
        f"the corpus; {len(ov.dirty_docs)} of {len(docs)} corpus documents are involved")
  worst = sorted(ov.hits, key=lambda i: -ov.hits[i] / max(ov.grams[i], 1))[:args.show]
  for i in worst:
    gram, src = ov.example[i]
    print(f"  {qs[i].source}: {ov.hits[i]}/{ov.grams[i]} n-grams shared, e.g. {gram!r} "
          f"in {src}")
  if args.write_filtered:
    out = Path(args.write_filtered)
    out.parent.mkdir(parents=True, exist_ok=True)
    kept = 0
    with out.open("w", encoding="utf-8") as f:
      for j, d in enumerate(docs):
        if j not in ov.dirty_docs:
          f.write(json.dumps({"text": d.text, "source": d.source}, ensure_ascii=False) + "\n")
          kept += 1
    print(f"wrote {kept} documents ({len(docs) - kept} removed) to {out}")
  return 0


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
