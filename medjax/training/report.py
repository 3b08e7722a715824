"""The demo's run report: loss curves from `metrics.jsonl`, throughput, and a Markdown page.

Everything here reads files a training workdir already writes (`metrics.jsonl`, `config.json`),
so the report can be rebuilt from finished runs without touching a model.
"""

from __future__ import annotations

import json
import os
import statistics

from medjax.training.metrics import METRICS_FILE


def read_metrics(workdir: str) -> tuple[list[dict], list[dict]]:
  """(train rows, eval rows) of a workdir's metrics.jsonl; eval rows carry `val_loss` etc."""
  path = os.path.join(workdir, METRICS_FILE)
  train, evals = [], []
  if not os.path.exists(path):
    return train, evals
  with open(path) as f:
    for line in f:
      if line.strip():
        rec = json.loads(line)
        (train if "loss" in rec else evals).append(rec)
  return train, evals


def throughput(workdir: str) -> dict:
  """Median tokens/s and MFU over logged intervals, skipping the first (it holds compilation)."""
  rows, _ = read_metrics(workdir)
  steady = rows[1:] or rows
  if not steady:
    return {"tokens_per_s": None, "mfu": None, "steps": 0}
  return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
          "mfu": statistics.median(r["mfu"] for r in steady),
          "steps": rows[-1]["step"]}


def plot_losses(runs: dict[str, str], out_png: str) -> str:
  """One panel per training run: train loss per logged step, validation loss as markers.

  Args:
    runs: label -> training workdir.
    out_png: the image to write.

  Returns:
    out_png.
  """
  import matplotlib
  matplotlib.use("Agg")  # headless: no display on servers and CI
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.5), squeeze=False)
  for ax, (label, wd) in zip(axes[0], runs.items()):
    train, evals = read_metrics(wd)
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    ev = [r for r in evals if "val_loss" in r]
    if ev:
      ax.plot([r["step"] for r in ev], [r["val_loss"] for r in ev], "o--", label="val loss")
    ax.set_title(label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_yscale("log")  # CPT starts far above where it ends; a log axis shows both
    ax.legend()
  fig.tight_layout()
  fig.savefig(out_png, dpi=100)
  plt.close(fig)
  return out_png


def _fmt(x, spec: str = ".2f") -> str:
  return "–" if x is None else format(x, spec)


def eval_table(rows: dict[str, dict]) -> str:
  """A Markdown table of the demo's evaluation: one row per model."""
  lines = ["| model | medical ppl (held-out) | TinyStories ppl (held-out) | "
           "CMExam acc % (loglik) | chance % | n questions |",
           "|---|---:|---:|---:|---:|---:|"]
  for name, r in rows.items():
    acc = r.get("cmexam_accuracy")
    chance = r.get("cmexam_chance")
    lines.append(
        f"| {name} | {_fmt(r.get('medical_ppl'))} | {_fmt(r.get('story_ppl'))} | "
        f"{_fmt(None if acc is None else 100 * acc, '.1f')} | "
        f"{_fmt(None if chance is None else 100 * chance, '.1f')} | {r.get('cmexam_n', '–')} |")
  return "\n".join(lines)


def samples_section(rows: dict[str, dict]) -> str:
  out = []
  for name, r in rows.items():
    for key, title in (("story", "Once upon a time"), ("medical", "held-out CMExam prompt")):
      if r.get(key) is not None:
        out.append(f"- **{name}**, {title}: `{_one_line(r[key])}`")
  return "\n".join(out)


def _one_line(s: str) -> str:
  return " ".join(s.split()).replace("`", "'")[:300]


def write_report(path: str, summary: dict, runs: dict[str, str], png: str) -> str:
  """Writes the Markdown run report.

  Args:
    path: the report file (e.g. WORKDIR/report.md).
    summary: the demo summary (settings, steps, eval, vocab, export, artifacts).
    runs: label -> training workdir (for configs and throughput).
    png: the loss-curve image, linked relative to the report.

  Returns:
    path.
  """
  rel = os.path.relpath(png, os.path.dirname(os.path.abspath(path)))
  ev = summary["eval"]
  v = summary["vocab"]
  lines = [
      "# medjax demo report", "",
      f"Mode: **{summary['mode']}**. The paper's pipeline (Guo & Hua 2023) in miniature: "
      "base model → Chinese vocabulary extension → continued pretraining (CPT) on medical "
      "text → SFT on CMExam → evaluation → Hugging Face export.", "",
      "## Steps", "",
      "| step | result | seconds |", "|---|---|---:|",
  ]
  for name, s in summary["steps"].items():
    lines.append(f"| {name} | {s['note']} | {_fmt(s['seconds'], '.1f')} |")
  lines += [
      "", "## Vocabulary extension", "",
      f"{v['base_vocab_size']} → {v['vocab_size']} pieces ({v['added']} added). Tokens per "
      f"character on held-out medical text: {v['tokens_per_char_before']:.3f} before, "
      f"{v['tokens_per_char_after']:.3f} after.", "",
      "## Evaluation", "",
      eval_table(ev["rows"]), "",
      ev["note"], "",
      "### Greedy samples", "",
      samples_section(ev["rows"]), "",
      "## Training", "",
      f"![loss curves]({rel})", "",
      "| run | steps | tokens/s (median) | MFU (median) |", "|---|---:|---:|---:|",
  ]
  for label, wd in runs.items():
    t = throughput(wd)
    mfu = None if t["mfu"] is None else 100 * t["mfu"]
    lines.append(f"| {label} | {t['steps']} | {_fmt(t['tokens_per_s'], '.0f')} | "
                 f"{_fmt(mfu, '.2f')}% |")
  lines += ["", "Tokens/s counts trained (loss-bearing) tokens, so SFT, which trains only on "
            "answers, shows far fewer than CPT. MFU is measured against this host's jitted f32 "
            "matmul peak on CPU, or the vendor's bf16 peak on accelerators (`medjax.training.metrics`).",
            ""]
  x = summary.get("export", {})
  lines += ["## Export", "", f"Exported to `{x.get('hf_dir')}`. {x.get('note', '')}", ""]
  lines += ["## Configs", ""]
  for label, wd in runs.items():
    # train.py has written the resolved run config under both names over time.
    found = [p for p in ("run_config.json", "config.json") if os.path.exists(os.path.join(wd, p))]
    if found:
      cfg_path = os.path.join(wd, found[0])
      with open(cfg_path) as f:
        lines += [f"### {label} (`{cfg_path}`)", "", "```json", f.read().strip(), "```", ""]
  lines += ["## Artifacts", ""]
  lines += [f"- {k}: `{p}`" for k, p in summary["artifacts"].items()]
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return path
