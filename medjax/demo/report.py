"""The demo's sections of its report (steps, vocabulary, evaluation, samples, export,
artifacts), placed before the training sections `medjax.training.report` writes for every
run."""

from __future__ import annotations

from medjax.training.report_format import Doc, markdown_table


def _fmt(x, spec: str = ".2f"):
  return None if x is None else format(x, spec)


def eval_rows(rows: dict[str, dict]) -> tuple[list[str], list[list]]:
  """(header, rows) of the demo's evaluation table: one row per model."""
  header = ["model", "medical ppl (held-out)", "TinyStories ppl (held-out)",
            "CMExam acc % (loglik)", "chance %", "n questions"]
  out = []
  for name, r in rows.items():
    acc, chance = r.get("cmexam_accuracy"), r.get("cmexam_chance")
    out.append([name, _fmt(r.get("medical_ppl")), _fmt(r.get("story_ppl")),
                _fmt(None if acc is None else 100 * acc, ".1f"),
                _fmt(None if chance is None else 100 * chance, ".1f"), r.get("cmexam_n")])
  return header, out


def eval_table(rows: dict[str, dict]) -> str:
  """The evaluation table as Markdown (for the console)."""
  return markdown_table(*eval_rows(rows))


def _one_line(s: str) -> str:
  return " ".join(s.split()).replace("`", "'")[:300]


def sections(summary: dict) -> Doc:
  """The demo-specific part of the report, from the demo summary."""
  doc = Doc("")
  ev, v = summary["eval"], summary["vocab"]
  doc.para(f"Mode: **{summary['mode']}**. The paper's pipeline (Guo & Hua 2023) in miniature: "
           "base model → Chinese vocabulary extension → continued pretraining (CPT) on medical "
           "text → SFT on CMExam → evaluation → Hugging Face export.")
  doc.heading("Steps")
  doc.table(["step", "result", "seconds"],
            [[name, s["note"], _fmt(s["seconds"], ".1f")] for name, s in summary["steps"].items()],
            "llr")
  doc.heading("Vocabulary extension")
  doc.para(f"{v['base_vocab_size']} → {v['vocab_size']} pieces ({v['added']} added). Tokens per "
           f"character on held-out medical text: {v['tokens_per_char_before']:.3f} before, "
           f"{v['tokens_per_char_after']:.3f} after.")
  doc.heading("Evaluation")
  doc.table(*eval_rows(ev["rows"]))
  doc.para(ev["note"])
  doc.heading("Greedy samples", 3)
  doc.bullets([f"**{name}**, {title}: `{_one_line(r[key])}`" for name, r in ev["rows"].items()
               for key, title in (("story", "Once upon a time"),
                                  ("medical", "held-out CMExam prompt"))
               if r.get(key) is not None])
  x = summary.get("export", {})
  doc.heading("Export")
  doc.para(f"Exported to `{x.get('hf_dir')}`. {x.get('note', '')}")
  doc.heading("Artifacts")
  doc.bullets([f"{k}: `{p}`" for k, p in summary["artifacts"].items()])
  return doc
