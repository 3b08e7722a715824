"""`medjax bench`: medjax side by side with Hugging Face, in one process, alternately.

  medjax bench train --shape 50m --compare-hf --steps 16 --block 4   # tokens/s, MFU, ratio
  medjax bench train --shape demo --compare-hf --steps 200   # TinyStories-260K CPT, losses too
  medjax bench train --shape demo --compare-hf --breakdown   # + the step's parts timed alone
  medjax bench generate --shape 50m --compare-hf   # greedy decoding tokens/s, batch 8, floor
  medjax bench train --shape 7b --layers 8 --compare-hf --steps 12 --block 3   # on a GPU
  medjax bench attention                           # fwd+bwd of each attention implementation
  medjax bench data                                # packed CPT pipeline tokens/s
  medjax bench data --corpus-tokens 1e8            # tokenized build: build, first batch, RSS
  medjax bench import                              # HF -> medjax of a ~1 GB model: time, RSS
  medjax bench export                              # import + export at 70B width, 1 vs 3 layers
  medjax bench export --lora-rank 8 --sizes 1gb    # a LoRA workdir: base streamed vs whole
  medjax bench safetensors                         # medjax's reader vs the safetensors package
  medjax bench fit                                 # `medjax fit` on the paper's TPU slices
  medjax bench scaling                             # tokens/s vs sequence length and width

The machine is shared by whatever else runs, so the two sides are timed in turn (single
steps, or blocks of steps with `--block`) and compared by ratio; the matmul peaks of XLA
and PyTorch (f32 on CPU, bf16 on a GPU) are measured the same way in the same run. On a GPU
both sides share the device: f32 weights and AdamW, bf16 activations (torch: autocast,
sdpa attention, fused AdamW), cuDNN attention for medjax. Compilation and warm-up are timed
separately, never in the rates. Each run appends its figures, the device, date, commit and
exact command to `benchmarks/RESULTS.md` (`--no-record` to skip, `--results FILE` elsewhere).

`medjax.bench` has one module per subcommand (train, generate, attention, hf_import,
fit_table, scaling); `models` holds the shapes, weights, batches and the two trainers they
share, `common` the matmul peaks and the results file. This module is the command line.
"""

from __future__ import annotations

import argparse
import os

from medjax.bench.attention import attention_lines, bench_attention
from medjax.bench.common import RESULTS, record
from medjax.bench.fit_table import bench_fit, fit_lines
from medjax.bench.generate import bench_generate, generate_lines
from medjax.bench.hf_import import (IMPORT_SHAPES, bench_export, bench_import,
                                    bench_lora_export, export_lines, import_lines,
                                    lora_export_lines)
from medjax.bench.models import SHAPES, make_shape
from medjax.bench.safetensors_read import bench_safetensors, safetensors_lines
from medjax.bench.scaling import bench_scaling, scaling_lines
from medjax.bench.train import bench_breakdown, bench_train, breakdown_lines, train_lines
from medjax.cli.args import path
from medjax.errors import UsageError
from medjax.inputs import FILE, NEW_FILE, WORKDIR, Float, Int, Ints, Text
from medjax.model.config import ATTENTION


def _import_shapes(text: str) -> None:
  bad = [x for x in text.split(",") if x not in IMPORT_SHAPES]
  if bad or not text:
    raise ValueError(f"unknown shape(s) {', '.join(map(repr, bad or ['']))}")


def add_args(parser: argparse.ArgumentParser) -> None:
  sub = parser.add_subparsers(dest="bench_command", metavar="WHAT", required=True)

  def common(p, shape="50m"):
    p.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    path(p, "--results", kind=NEW_FILE, help=f"results file (default {RESULTS})")
    p.add_argument("--note", default="", type=Text(),
                   help="a note for the device line, e.g. 'shared'")
    if shape:
      p.add_argument("--shape", default=shape, choices=list(SHAPES))
      p.add_argument("--batch", type=Int(ge=1), help="rows per step (default: the shape's)")
      p.add_argument("--seq-len", type=Int(ge=1), help="tokens per row (default: the shape's)")
      p.add_argument("--width", type=Int(ge=1), help="hidden size (random shapes; mlp = 8/3 "
                     "width)")
      p.add_argument("--layers", type=Int(ge=1), help="number of layers (random shapes)")
      p.add_argument("--attention", choices=list(ATTENTION), default=None,
                     help="default: the shape's (einsum); auto off CPU (cuDNN on GPU)")
      p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                     help="activations (weights and AdamW stay f32); default f32 on CPU, "
                          "bf16 elsewhere")

  t = sub.add_parser("train", help="train steps: medjax vs transformers + torch AdamW")
  common(t)
  t.add_argument("--steps", type=Int(ge=2), default=6, help="steps per side, warm-up included")
  t.add_argument("--warmup", type=Int(ge=1), default=1, help="untimed first steps")
  t.add_argument("--block", type=Int(ge=1), default=None,
                 help="steps per side before switching (default 5 from 20 steps, else 1)")
  t.add_argument("--compare-hf", action="store_true")
  t.add_argument("--breakdown", action="store_true",
                 help="also time the model's parts alone: head and loss, attention, the rest")

  g = sub.add_parser("generate", help="greedy decoding: medjax vs transformers' generate")
  common(g)
  g.add_argument("--new-tokens", type=Int(ge=1), default=64)
  g.add_argument("--prompt-len", type=Int(ge=1), default=16)
  g.add_argument("--reps", type=Int(ge=1), default=3)
  g.add_argument("--compare-hf", action="store_true")

  a = sub.add_parser("attention", help="fwd+bwd time of each attention implementation")
  common(a, shape=None)
  a.add_argument("--batch", type=Int(ge=1), default=1)
  a.add_argument("--seq-len", type=Int(ge=1), default=4096)
  a.add_argument("--heads", type=Int(ge=1), default=32)
  a.add_argument("--kv-heads", type=Int(ge=1), default=32)
  a.add_argument("--head-dim", type=Int(ge=1), default=128)
  a.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
  a.add_argument("--reps", type=Int(ge=1), default=10)

  d = sub.add_parser("data", help="packed CPT pipeline tokens/s per process; with "
                     "--corpus-tokens, the tokenized build at corpus scale")
  common(d, shape=None)
  d.add_argument("--corpus-tokens", type=Float(gt=0), default=None,
                 help="build a synthetic corpus of this many tokens (e.g. 1e8) and measure "
                      "build tokens/s, time to first batch, peak RSS, overlap tokens/s")
  path(d, "--tokenizer", kind=FILE, default=None,
       help="--corpus-tokens: tokenizer.model (default: the shipped tiny one)")
  d.add_argument("--workers", type=Int(ge=1), default=None,
                 help="--corpus-tokens: build workers")
  path(d, "--tmp", kind=WORKDIR, help="--corpus-tokens: where to write corpus and build")
  d.add_argument("--compare-text", action="store_true",
                 help="--corpus-tokens: also time the first batch from the raw files")
  d.add_argument("--keep", action="store_true", help="--corpus-tokens: keep corpus and build")
  d.add_argument("--seq-len", type=Int(ge=1), default=None,
                 help="default 2048; 4096 with --corpus-tokens")
  d.add_argument("--batch-size", type=Int(ge=1), default=None,
                 help="default 8; 256 with --corpus-tokens (the CPT recipe's)")
  d.add_argument("--batches", type=Int(ge=1), default=None,
                 help="batches timed (default 200; 20 with --corpus-tokens)")

  i = sub.add_parser("import", help="HF -> medjax import of a synthetic model: time, RSS")
  common(i, shape=None)
  i.add_argument("--size", choices=list(IMPORT_SHAPES), default="1gb")
  i.add_argument("--shard-mb", type=Float(gt=0), default=768,
                 help="HF shard size (default: as Llama-2-7b-hf, largest shard ~3/4 model)")
  path(i, "--tmp", kind=WORKDIR, help="where to write the synthetic checkpoint "
       "(default $TMPDIR)")
  i.add_argument("--layers", type=Int(ge=1), help="override the shape's number of layers")
  i.add_argument("--no-scan", dest="scan", action="store_false",
                 help="import to per-layer params (the peak should not grow with depth)")
  i.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="dtype of the synthetic HF files")

  e = sub.add_parser("export", help="import-hf + export-hf at Llama-2-70B width, 1 vs 3 layers: "
                     "peak RSS must not grow with depth; --lora-rank: a LoRA workdir's export, "
                     "base streamed vs restored whole")
  common(e, shape=None)
  e.add_argument("--sizes", default="70b-1,70b-3", type=Text(check=_import_shapes,
                 what=f"shapes among {','.join(IMPORT_SHAPES)}"),
                 help=f"comma-separated shapes among {', '.join(IMPORT_SHAPES)}")
  e.add_argument("--shard-mb", type=Float(gt=0), default=4800, help="HF shard size (MiB)")
  e.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
  e.add_argument("--lora-rank", type=Int(ge=1), default=None,
                 help="instead: export a LoRA workdir (two real training steps from the "
                 "imported model), base streamed vs restored whole")
  path(e, "--tmp", kind=WORKDIR, help="where to write the checkpoints (default $TMPDIR; "
       "~20 GB)")

  st = sub.add_parser("safetensors", help="reading safetensors: medjax's reader vs the package")
  common(st, shape=None)
  st.add_argument("--tensors", type=Int(ge=1), default=16)
  st.add_argument("--tensor-mib", type=Int(ge=1), default=64)
  st.add_argument("--reps", type=Int(ge=1), default=3)
  path(st, "--tmp", kind=WORKDIR, help="where to write the file (default $TMPDIR)")

  f = sub.add_parser("fit", help="`medjax fit` on the paper's TPU slices")
  common(f, shape=None)
  f.add_argument("--quick", action="store_true", help="one tiny case (for tests)")

  c = sub.add_parser("scaling", help="medjax tokens/s vs sequence length and width")
  common(c)
  c.add_argument("--seqs", type=Ints(ge=1), default="512,1024,2048,4096")
  c.add_argument("--widths", type=Ints(ge=1), default="256,512,768,1024")
  c.add_argument("--tokens-per-step", type=Int(ge=1), default=4096)
  c.add_argument("--steps", type=Int(ge=1), default=3)
  c.add_argument("--warmup", type=Int(ge=0), default=1)


def run(args: argparse.Namespace) -> int:
  cmd = args.bench_command
  if cmd == "fit" and "device_count" not in os.environ.get("XLA_FLAGS", ""):
    # CPU stand-in devices for the slice when libtpu is absent; before jax starts.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=32").strip()
  # Both libraries share a GPU in one process: jax must not take 75% of it up front.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  if cmd in ("train", "generate", "scaling"):
    s = dict(make_shape(args.shape, args), name=args.shape)
  if cmd == "train" and args.warmup >= args.steps:
    raise UsageError(f"argument --warmup: {args.warmup}: leaves none of --steps {args.steps} "
                     "timed")
  if cmd == "train":
    r = bench_train(s, args.steps, args.compare_hf, args.warmup, block=args.block)
    lines = train_lines(s, r)
    if args.breakdown:
      bd = bench_breakdown(s["cfg"], r["params"], r["batch"])
      lines += breakdown_lines(s["cfg"], r, bd)
    record(args, f"train --shape {args.shape}", lines)
  elif cmd == "generate":
    b = args.batch or 8
    r = bench_generate(s, args.new_tokens, b, args.prompt_len, args.reps, args.compare_hf)
    record(args, f"generate --shape {args.shape}",
           generate_lines(s, r, args.new_tokens, b, args.prompt_len))
  elif cmd == "attention":
    shape = (args.batch, args.seq_len, args.heads, args.kv_heads, args.head_dim, args.dtype)
    record(args, "attention", attention_lines(bench_attention(*shape, args.reps), *shape))
  elif cmd == "data" and args.corpus_tokens:
    from medjax.assets import asset_path
    from medjax.bench.data_scale import bench_scale, scale_lines
    tok = args.tokenizer or str(asset_path("tinystories-260k/tokenizer.model"))
    r = bench_scale(int(args.corpus_tokens), tok, args.seq_len or 4096, args.batch_size or 256,
                    args.batches or 20, args.workers, args.tmp, args.compare_text, args.keep)
    record(args, f"data --corpus-tokens {int(args.corpus_tokens):,}", scale_lines(r))
  elif cmd == "data":
    from medjax.assets import asset_path
    from medjax.data import corpus, preview
    from medjax.data.tokenizer import Tokenizer
    tok = Tokenizer(asset_path("tinystories-260k/tokenizer.model"))
    texts = corpus.read_texts([asset_path("medical_text_sample.csv")])
    r = preview.bench_data(texts, tok, args.seq_len or 2048, args.batch_size or 8,
                           args.batches or 200)
    record(args, "data", [
        f"packed CPT pipeline (shipped medical sample, TinyStories tokenizer), batch "
        f"{r['batch_size']} x seq {r['seq_len']}, {r['num_batches']} batches, one process:",
        f"  tokenize {r['tokenize_tokens_per_s']:,} tokens/s ({r['num_tokens']:,} tokens, "
        f"{r['num_docs']} docs); pipeline {r['pipeline_tokens_per_s']:,} tokens/s; "
        f"end to end {r['end_to_end_tokens_per_s']:,} tokens/s"])
  elif cmd == "import":
    r = bench_import(args.size, args.shard_mb, args.tmp, args.layers, args.scan, args.dtype)
    record(args, f"import --size {args.size}", import_lines(args.size, r))
  elif cmd == "export":
    sizes = [x.strip() for x in args.sizes.split(",") if x.strip()]
    bad = [x for x in sizes if x not in IMPORT_SHAPES]
    if bad:
      from medjax.errors import ConfigError
      raise ConfigError(f"--sizes {bad[0]!r}: expected among {', '.join(IMPORT_SHAPES)}")
    if args.lora_rank:
      record(args, f"export --sizes {args.sizes} --lora-rank {args.lora_rank}",
             lora_export_lines(bench_lora_export(sizes, args.lora_rank, args.tmp, args.dtype)))
    else:
      record(args, f"export --sizes {args.sizes}",
             export_lines(bench_export(sizes, args.shard_mb, args.tmp, args.dtype)))
  elif cmd == "safetensors":
    r = bench_safetensors(args.tensors, args.tensor_mib, args.reps, args.tmp)
    record(args, "safetensors", safetensors_lines(r))
  elif cmd == "fit":
    record(args, "fit", fit_lines(bench_fit(args.quick)))
  elif cmd == "scaling":
    seqs, widths = list(args.seqs), list(args.widths)
    rows = bench_scaling(args, seqs, widths, args.tokens_per_step, args.steps)
    record(args, f"scaling --shape {args.shape}", [
        f"medjax training, {args.tokens_per_step} tokens per step, f32 "
        f"(rows 1-{len(seqs)}: seq varies at width {s['cfg'].hidden_size}; then width "
        f"varies at seq {SHAPES[args.shape]['seq']}; mlp = 8/3 width)", *scaling_lines(rows)])
  return 0
