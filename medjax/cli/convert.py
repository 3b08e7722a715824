"""`medjax import-hf` and `medjax export-hf`."""

from __future__ import annotations

from medjax.cli.args import path
from medjax.inputs import DIR, NEW_DIR, Float
from medjax.model.config import DTYPES


def add_args(p):
  path(p, "hf_dir", kind=DIR, help="Hugging Face Llama 2/3.x or Qwen2/2.5 directory "
       "(config.json + *.safetensors, tokenizer.model or tokenizer.json)")
  path(p, "out_dir", kind=NEW_DIR, help="medjax checkpoint directory to write")
  p.add_argument("--no-scan", dest="scan", action="store_false",
                 help="store per-layer weights instead of stacked (scanned) ones")


def run(args):
  from medjax.checkpoints import hf_import
  hf_import.import_hf_streaming(args.hf_dir, args.out_dir, scan_layers=args.scan)  # low memory


def export_add_args(p):
  path(p, "checkpoint", kind=DIR,
       help="medjax checkpoint dir (import-hf output) or training workdir")
  path(p, "out_dir", kind=NEW_DIR, help="Hugging Face directory to write")
  p.add_argument("--dtype", default="float32", choices=DTYPES)
  p.add_argument("--max-shard-gb", type=Float(gt=0), default=5.0,
                 help="split safetensors into shards of at most this size (default 5)")


def export_run(args):
  from medjax.checkpoints import hf_export
  hf_export.export_hf(args.checkpoint, args.out_dir, dtype=args.dtype,
                      overwrite=args.overwrite, max_shard_bytes=int(args.max_shard_gb * (1 << 30)))
