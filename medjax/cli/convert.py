"""`medjax import-hf` and `medjax export-hf`."""

from __future__ import annotations


def add_args(p):
  p.add_argument("hf_dir", help="Hugging Face Llama 2/3.x or Qwen2/2.5 directory (config.json "
                 "+ *.safetensors, tokenizer.model or tokenizer.json)")
  p.add_argument("out_dir", help="medjax checkpoint directory to write")
  p.add_argument("--no-scan", dest="scan", action="store_false",
                 help="store per-layer weights instead of stacked (scanned) ones")
  p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")


def run(args):
  import os
  from medjax.checkpoints import hf_import
  from medjax.errors import CheckpointError
  if os.path.exists(args.out_dir) and os.listdir(args.out_dir) and not args.overwrite:
    raise CheckpointError(f"{args.out_dir}: directory is not empty (pass --overwrite)")
  hf_import.import_hf_streaming(args.hf_dir, args.out_dir, scan_layers=args.scan)  # low memory


def export_add_args(p):
  p.add_argument("checkpoint", help="medjax checkpoint dir (import-hf output) or training workdir")
  p.add_argument("out_dir", help="Hugging Face directory to write")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
  p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
  p.add_argument("--max-shard-gb", type=float, default=5.0,
                 help="split safetensors into shards of at most this size (default 5)")


def export_run(args):
  from medjax.checkpoints import hf_export
  hf_export.export_hf(args.checkpoint, args.out_dir, dtype=args.dtype,
                      overwrite=args.overwrite, max_shard_bytes=int(args.max_shard_gb * (1 << 30)))
