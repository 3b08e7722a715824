"""Run reports (`medjax report WORKDIR [WORKDIR ...]`; the demo's report too).

For each training workdir: loss and learning-rate curves, tokens/s and MFU, the in-training
evals over steps with domain gain (validation loss, exam accuracy) beside forgetting
(general-text perplexity), the config and the checkpoints; several runs are compared in the
same figures and tables. A run that starts from another one given (SFT with `init_from`
the CPT workdir) is drawn after it on one step axis. Written as Markdown with PNG figures
and as one self-contained HTML file (`report_format`).

Everything here reads files a training workdir already has (`metrics.jsonl`,
`run_config.json`, `checkpoints/`), so reports are rebuilt from finished or running runs
without touching a model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics

from medjax.errors import CheckpointError
from medjax.training import metrics
from medjax.training.metrics import METRICS_FILE
from medjax.training.report_format import Doc

RUN_CONFIG = "run_config.json"
CKPT_DIR = "checkpoints"  # medjax.checkpoints.manager.CKPT_DIR, without importing orbax
FIGURES = {"loss": "loss_curves.png", "throughput": "throughput.png", "evals": "evals.png"}
_TITLES = {"val_loss": "validation loss\n(domain; lower is better)",
           "general_ppl": "general-text perplexity\n(forgetting; lower is better)"}


@dataclasses.dataclass
class Run:
  """One training workdir, as read from its files."""

  label: str
  workdir: str
  train: list[dict]  # metrics.jsonl records with a train loss
  evals: list[dict]  # records with val_loss / {task}_acc / general_ppl
  config: dict  # run_config.json ({} if absent)
  checkpoints: list[tuple[int, int]]  # (step, bytes)
  best: dict | None  # checkpoints/best.json: {"step", "val_loss"}
  offset: int = 0  # steps of the runs before it in a chain (CPT -> SFT)

  @property
  def last_step(self) -> int:
    steps = [r["step"] for r in self.train + self.evals]
    return max(steps) if steps else 0


def read_metrics(workdir: str) -> tuple[list[dict], list[dict]]:
  """(train rows, eval rows) of a workdir's metrics.jsonl; a line torn by a crash is skipped."""
  train, evals = [], []
  for _, rec in metrics.records(os.path.join(workdir, METRICS_FILE)):
    if "step" in rec:
      (train if "loss" in rec else evals).append(rec)
  return train, evals


def read_run(workdir: str, label: str | None = None) -> Run:
  """Reads one training workdir.

  Raises:
    CheckpointError: the path is not a directory, or holds neither metrics.jsonl nor
      run_config.json (not a training run).
  """
  if not os.path.isdir(workdir):
    raise CheckpointError(f"{workdir}: no such directory")
  has = [f for f in (METRICS_FILE, RUN_CONFIG) if os.path.exists(os.path.join(workdir, f))]
  if not has:
    raise CheckpointError(f"{workdir}: not a training workdir (no {METRICS_FILE} or "
                          f"{RUN_CONFIG})")
  train, evals = read_metrics(workdir)
  config = {}
  if RUN_CONFIG in has:
    try:
      with open(os.path.join(workdir, RUN_CONFIG)) as f:
        config = json.load(f)
    except ValueError as e:
      raise CheckpointError(f"{os.path.join(workdir, RUN_CONFIG)}: not JSON ({e})") from None
  ckpt_dir = os.path.join(workdir, CKPT_DIR)
  ckpts = []
  if os.path.isdir(ckpt_dir):
    for name in os.listdir(ckpt_dir):
      if name.isdigit():
        ckpts.append((int(name), _du(os.path.join(ckpt_dir, name))))
  best = None
  try:
    with open(os.path.join(ckpt_dir, "best.json")) as f:
      best = json.load(f)
  except (OSError, ValueError):
    pass
  return Run(label or os.path.basename(os.path.abspath(workdir)), workdir, train, evals,
             config, sorted(ckpts), best)


def read_runs(workdirs: list[str], labels: list[str] | None = None) -> list[Run]:
  """Reads several runs; labels default to folder names (made unique); chains them."""
  labels = list(labels or [])
  if len(labels) > len(workdirs):
    raise CheckpointError(f"{len(labels)} labels for {len(workdirs)} workdirs")
  runs = [read_run(w, labels[i] if i < len(labels) else None) for i, w in enumerate(workdirs)]
  seen: dict[str, int] = {}
  for r in runs:
    n = seen[r.label] = seen.get(r.label, 0) + 1
    if n > 1:
      r.label = f"{r.label} ({n})"
  _chain(runs)
  return runs


def _chain(runs: list[Run]) -> None:
  """A run whose init_from is another given run's workdir continues that run's step axis."""
  where = {os.path.realpath(r.workdir): r for r in runs}
  for r in runs:
    seen, cur, offset = set(), r, 0
    while True:
      parent = where.get(os.path.realpath(str(cur.config.get("init_from", ""))))
      if parent is None or id(parent) in seen or parent is r:
        break
      seen.add(id(parent))
      offset += parent.last_step
      cur = parent
    r.offset = offset


def throughput(run: Run | str) -> dict:
  """Medians over the logged intervals, skipping the first (it holds compilation).

  Returns:
    {tokens_per_s, loss_tokens_per_s, mfu, step_time_s, intervals, steps, all_tokens}:
    all_tokens is False for runs logged before medjax counted every processed token (their
    tokens/s and MFU count loss-bearing tokens only).
  """
  rows = (run if isinstance(run, Run) else read_run(run)).train
  steady = rows[1:] or rows
  med = lambda k: statistics.median(r[k] for r in steady) if steady and all(
      k in r for r in steady) else None
  return {"tokens_per_s": med("tokens_per_s"), "loss_tokens_per_s": med("loss_tokens_per_s"),
          "mfu": med("mfu"), "step_time_s": med("step_time_s"), "intervals": len(steady),
          "steps": rows[-1]["step"] if rows else 0,
          "all_tokens": bool(steady) and "loss_tokens_per_s" in steady[0]}


def eval_keys(runs: list[Run]) -> list[str]:
  """The in-training eval metrics present: val_loss, then exam accuracies, then general_ppl."""
  keys = {k for r in runs for e in r.evals for k in e}
  accs = sorted(k for k in keys if k.endswith("_acc"))
  return [k for k in ("val_loss",) if k in keys] + accs + [
      k for k in ("general_ppl",) if k in keys]


def _title(key: str) -> str:
  if key.endswith("_acc"):
    return f"{key[:-4]} accuracy\n(domain; higher is better)"
  return _TITLES.get(key, key)


# ------------------------------------------------------------------------------ figures


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")  # headless: no display on servers and CI
  import matplotlib.pyplot as plt
  return plt


def _boundaries(ax, runs: list[Run]) -> None:
  for r in runs:
    if r.offset:
      ax.axvline(r.offset, color="0.6", lw=0.8, ls=":")


def _save(plt, fig, axes, runs: list[Run], out_png: str) -> str:
  """Stage boundaries and a legend on every panel, then the figure to `out_png`."""
  for a in axes:
    _boundaries(a, runs)
    a.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out_png, dpi=100)
  plt.close(fig)
  return out_png


def plot_losses(runs: list[Run], out_png: str) -> str:
  """Train loss (with validation loss as markers) and learning rate against steps."""
  plt = _pyplot()
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.6))
  for i, r in enumerate(runs):
    col = f"C{i}"
    a1.plot([r.offset + x["step"] for x in r.train], [x["loss"] for x in r.train], color=col,
            label=f"{r.label} train")
    ev = [e for e in r.evals if "val_loss" in e]
    if ev:
      a1.plot([r.offset + e["step"] for e in ev], [e["val_loss"] for e in ev], "o--",
              color=col, ms=4, label=f"{r.label} val")
    a2.plot([r.offset + x["step"] for x in r.train], [x["lr"] for x in r.train], color=col,
            label=r.label)
  a1.set(title="loss (nats/token)", xlabel="step", yscale="log")  # CPT starts far above its end
  a2.set(title="learning rate", xlabel="step")
  return _save(plt, fig, (a1, a2), runs, out_png)


def plot_throughput(runs: list[Run], out_png: str) -> str:
  """Processed and loss-bearing tokens/s, and MFU, per logged interval (the first, which
  holds compilation, left out)."""
  plt = _pyplot()
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.6))
  for i, r in enumerate(runs):
    rows, col = r.train[1:] or r.train, f"C{i}"
    steps = [r.offset + x["step"] for x in rows]
    a1.plot(steps, [x["tokens_per_s"] for x in rows], color=col, label=f"{r.label} processed")
    if rows and "loss_tokens_per_s" in rows[0]:
      a1.plot(steps, [x["loss_tokens_per_s"] for x in rows], "--", color=col,
              label=f"{r.label} loss-bearing")
    a2.plot(steps, [100 * x["mfu"] for x in rows], color=col, label=r.label)
  a1.set(title="tokens/s", xlabel="step")
  a2.set(title="MFU %", xlabel="step")
  return _save(plt, fig, (a1, a2), runs, out_png)


def plot_evals(runs: list[Run], keys: list[str], out_png: str) -> str:
  """One panel per in-training eval: domain metrics and forgetting side by side."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.8), squeeze=False)
  for ax, key in zip(axes[0], keys):
    for i, r in enumerate(runs):
      ev = [e for e in r.evals if key in e]
      if ev:
        ax.plot([r.offset + e["step"] for e in ev], [e[key] for e in ev], "o-", ms=4,
                color=f"C{i}", label=r.label)
    ax.set(title=_title(key), xlabel="step")
  return _save(plt, fig, axes[0], runs, out_png)


# ------------------------------------------------------------------------------ tables


def _f(x, spec: str = ".4g"):
  return None if x is None else format(x, spec)


def _size(n: int) -> str:
  return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


def _du(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def runs_section(doc: Doc, runs: list[Run]) -> None:
  doc.heading("Runs")
  rows = []
  for r in runs:
    c, d = r.config, r.config.get("data", {})
    best = r.best and f"{r.best['val_loss']:.4g} (step {r.best['step']})"
    rows.append([r.label, f"`{r.workdir}`", c.get("task"), c.get("exam", "cmexam"),
                 f"`{c.get('init_from')}`" if c.get("init_from") else c.get("model"),
                 f"{r.last_step} / {c.get('total_steps')}",
                 f"{c.get('batch_size')} × {d.get('seq_len')}",
                 _f(r.train[-1]["loss"]) if r.train else None, best])
  doc.table(["run", "workdir", "task", "exam", "init_from", "steps done / total",
             "batch × seq", "last train loss", "best val loss"], rows, "lllllrrrr")
  chained = [r for r in runs if r.offset]
  if chained:
    doc.para("Chained runs (their `init_from` is another run here) start at step "
             + ", ".join(f"{r.offset} ({r.label})" for r in chained)
             + " of the figures' step axis.")


def throughput_section(doc: Doc, runs: list[Run], png: str) -> None:
  doc.heading("Throughput")
  doc.image(png, "tokens/s and MFU")
  rows = []
  for r in runs:
    t = throughput(r)
    share = (t["loss_tokens_per_s"] / t["tokens_per_s"]
             if t["loss_tokens_per_s"] is not None and t["tokens_per_s"] else None)
    rows.append([r.label, t["intervals"], _f(t["tokens_per_s"], ".0f"),
                 _f(t["loss_tokens_per_s"], ".0f"), _f(share and 100 * share, ".1f"),
                 _f(t["mfu"] and 100 * t["mfu"], ".2f"), _f(t["step_time_s"], ".3g")])
  doc.table(["run", "intervals", "tokens/s (processed)", "loss-bearing tokens/s",
             "loss share %", "MFU %", "step time s"], rows)
  doc.para("Medians over the logged intervals after the first (which holds compilation). "
           "Tokens/s and MFU count every processed token (SFT prompts included, padding not); "
           "loss-bearing tokens are the ones the loss is taken on. MFU is 6·N + attention "
           "FLOPs per token against the chips' peak (a measured f32 matmul on CPU).")
  old = [r.label for r in runs if r.train and "loss_tokens_per_s" not in r.train[-1]]
  if old:
    doc.para(f"Logged before medjax counted every processed token: {', '.join(old)}; their "
             "tokens/s and MFU count loss-bearing tokens only.")


def evals_section(doc: Doc, runs: list[Run], keys: list[str], png: str | None) -> None:
  doc.heading("Domain gain and forgetting")
  if not keys:
    doc.para("No in-training evals were logged (`eval_every` = 0, or no eval step yet).")
    return
  doc.image(png, "in-training evals")
  rows = []
  for r in runs:
    for k in keys:
      ev = [e for e in r.evals if k in e]
      if ev:
        a, b = ev[0], ev[-1]
        rows.append([r.label, k, f"{_f(a[k])} (step {r.offset + a['step']})",
                     f"{_f(b[k])} (step {r.offset + b['step']})", _f(b[k] - a[k], "+.4g")])
  doc.table(["run", "eval", "first", "last", "change"], rows, "llrrr")
  doc.para("Domain: validation loss on held-out training data and exam accuracy on held-out "
           "questions; forgetting: perplexity on general text (`eval.text`). The first eval "
           "is the first `eval_every` step of each run, not the starting model.")
  rows = [[r.label, r.offset + e["step"], *[_f(e.get(k)) for k in keys]]
          for r in runs for e in r.evals]
  doc.table(["run", "step", *keys], rows)


def checkpoints_section(doc: Doc, runs: list[Run]) -> None:
  doc.heading("Checkpoints")
  rows = []
  for r in runs:
    for step, size in r.checkpoints:
      note = "best val loss" if r.best and r.best.get("step") == step else ""
      path = os.path.join(r.workdir, CKPT_DIR, str(step))
      rows.append([r.label, step, _size(size), note, f"`{path}`"])
  if rows:
    doc.table(["run", "step", "size", "", "path"], rows, "lrrll")
  else:
    doc.para("No checkpoints.")


def config_section(doc: Doc, runs: list[Run]) -> None:
  doc.heading("Configs")
  for r in runs:
    if r.config:
      doc.code(json.dumps(r.config, indent=1, ensure_ascii=False), "json",
               summary=f"{r.label}: `{os.path.join(r.workdir, RUN_CONFIG)}`")


# ------------------------------------------------------------------------------ the report


def build(runs: list[Run], out_dir: str, title: str = "medjax run report",
          intro: Doc | None = None) -> dict[str, str]:
  """Writes report.md, report.html and the figures for `runs` into `out_dir`.

  Args:
    runs: from `read_runs`.
    out_dir: created if needed.
    title: the page title.
    intro: sections placed before the training sections (the demo's).

  Returns:
    {"markdown", "html", "loss", "throughput", "evals"(if any)}: the files written.
  """
  os.makedirs(out_dir, exist_ok=True)
  out = {k: os.path.join(out_dir, v) for k, v in FIGURES.items()}
  keys = eval_keys(runs)
  plot_losses(runs, out["loss"])
  plot_throughput(runs, out["throughput"])
  if keys:
    plot_evals(runs, keys, out["evals"])
  else:
    del out["evals"]
  doc = Doc(title)
  if intro is not None:
    doc.extend(intro)
  runs_section(doc, runs)
  doc.heading("Loss and learning rate")
  doc.image(out["loss"], "loss and learning-rate curves")
  evals_section(doc, runs, keys, out.get("evals"))
  throughput_section(doc, runs, out["throughput"])
  checkpoints_section(doc, runs)
  config_section(doc, runs)
  out["markdown"] = os.path.join(out_dir, "report.md")
  out["html"] = os.path.join(out_dir, "report.html")
  with open(out["markdown"], "w") as f:
    f.write(doc.markdown(out_dir))
  with open(out["html"], "w") as f:
    f.write(doc.html())
  return out
