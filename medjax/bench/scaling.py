"""`bench scaling`: medjax training tokens/s vs sequence length and width."""

from __future__ import annotations

import argparse

from medjax.bench.common import median_of
from medjax.bench.models import SHAPES, make_shape
from medjax.bench.train import bench_train


def bench_scaling(args, seqs, widths, tokens_per_step: int, steps: int, log=print) -> list:
  """medjax tokens/s vs sequence length and vs width (at the shape's sequence length), with
  the same tokens per step everywhere."""
  rows = []
  base_seq = SHAPES[args.shape]["seq"]
  points = [("seq", t, None) for t in seqs] + [("width", base_seq, w) for w in widths]
  for kind, seq, width in points:
    a = argparse.Namespace(**{**vars(args), "seq_len": seq, "width": width,
                              "batch": max(tokens_per_step // seq, 1)})
    s = dict(make_shape(args.shape, a), name=args.shape)
    r = bench_train(s, steps, compare_hf=False, warmup=args.warmup, log=lambda *x: None)
    st = median_of(r["mj_t"])
    tps = r["tokens_per_step"] / st
    rows.append({"kind": kind, "seq": seq, "width": s["cfg"].hidden_size,
                 "params": s["cfg"].num_params(), "batch": s["batch"], "tokens_per_s": tps,
                 "flops": tps * r["flops_per_token"], "peak": r["peak"].median()["xla"],
                 "attn_share": _attn_share(s["cfg"], seq), "compile_s": r["compile_s"]})
    log("measured " + _scaling_row(rows[-1]), flush=True)
  return rows


def _attn_share(cfg, seq: int) -> float:
  attn = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.hd * seq / 2
  return attn / cfg.flops_per_token(seq)


def _scaling_row(r: dict) -> str:
  return (f"| {r['seq']:>5} | {r['width']:>5} | {r['params'] / 1e6:6.1f}M | {r['batch']:>3} | "
          f"{r['tokens_per_s']:8.0f} | {r['flops'] / 1e9:6.1f} | {r['flops'] / r['peak']:5.1%} | "
          f"{r['attn_share']:5.1%} |")


def scaling_lines(rows) -> list[str]:
  head = ["| seq | width | params | batch | tokens/s | GFLOP/s | of XLA peak | attn FLOPs |",
          "|---:|---:|---:|---:|---:|---:|---:|---:|"]
  return head + [_scaling_row(r) for r in rows]
