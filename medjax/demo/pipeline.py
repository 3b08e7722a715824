"""`medjax demo`: the paper's pipeline end to end, in miniature, from the shipped samples.

  medjax demo [--quick] [--workdir ./medjax-demo]

Steps (Guo & Hua 2023, scaled down to the 260K-parameter TinyStories Llama on a CPU):

  1. import the base model (`hf.import_hf`, as `medjax import-hf`) and check it reproduces a
     known greedy continuation;
  2. extend the tokenizer with Chinese medical pieces and grow the embeddings (`vocab`);
     skipped for a byte-level BPE base (Qwen2.5, Llama 3: `--base` of either family), whose
     tokenizer already covers Chinese;
  3. continued pretraining (CPT) on medical text with a 10% TinyStories replay;
  4. SFT on CMExam questions (a stable 200-question hold-out is never trained on);
  5. evaluate base, CPT and SFT side by side (perplexities, CMExam accuracy, samples);
  6. export to Hugging Face format and, when torch + transformers are installed, compare
     logits with `transformers`;
  7. write the report (`medjax report` of the CPT and SFT runs, after the demo's own
     sections): WORKDIR/report.md and report.html, with loss curves and every artifact.

Each step records a marker in WORKDIR/steps/ when it finishes; rerunning the same command
reuses finished steps (an interrupted training step resumes from its checkpoint). Changing the
mode or inputs reruns everything from the first affected step.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import time

import ml_collections

from medjax.assets import asset_path
from medjax.checkpoints import hf_export, hf_import, load, modeldir, vocab
from medjax.data import cmexam, corpus, extend
from medjax.data.tokenizer import load_tokenizer
from medjax.demo import report as demo_report
from medjax.demo.steps import TOTAL_STEPS, Steps, signature
from medjax.errors import MedjaxError
from medjax.evaluation import exam, generate, scoring
from medjax.training import loop, report
from medjax.training.config import base_config

# stories260K's greedy continuation of "Once upon a time" ([1, 403, 407, 261, 378]), from
# llama2.c / transformers: the import is right only if medjax reproduces it exactly.
REFERENCE_PROMPT = [1, 403, 407, 261, 378]
REFERENCE_IDS = [432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337,
                 410, 408, 419, 292, 411, 322, 265, 282, 295, 433, 426, 385, 328, 432, 358, 394,
                 261, 370, 432, 352, 266, 268, 388, 426]
SHIPPED_BASE = "tinystories-260k"
EVAL_QUESTIONS = 200  # CMExam questions held out of SFT (stable hash split)
REPLAY_WEIGHT = 0.1  # fraction of CPT rows drawn from TinyStories, against forgetting
VAL_FRACTION = 0.05  # medical documents held out of tokenizer training, CPT and SFT
SEED = 0

# Sizes chosen for a 2-core CPU: quick ~2 min in all, full ~10 min.
SETTINGS = {
    "quick": dict(add_n=500, cpt_steps=40, cpt_batch=8, cpt_seq=128, sft_steps=30, sft_batch=8,
                  sft_seq=256, eval_questions=30, eval_medical=20, eval_stories=10, eval_len=256,
                  train_eval_questions=0, train_eval_stories=0),
    "full": dict(add_n=1500, cpt_steps=300, cpt_batch=16, cpt_seq=128, sft_steps=150,
                 sft_batch=8, sft_seq=256, eval_questions=EVAL_QUESTIONS, eval_medical=80,
                 eval_stories=40, eval_len=256, train_eval_questions=40, train_eval_stories=20),
}
# train_eval_*: the questions and stories the in-training evals score at each eval step
# (0 = validation loss only: the quick mode keeps CI short).


def _log(msg: str) -> None:
  print(msg, flush=True)


# ------------------------------------------------------------------------------ run configs


def train_config(task: str, init_from: str, train: str, tokenizer: str, steps: int, batch: int,
                 seq_len: int, lr: float, replay: str = "", replay_weight: float = 0.0,
                 with_explanation: bool = False, eval_cmexam: str = "",
                 eval_text: str = "", eval_limits: tuple[int, int] = (0, 0)
                 ) -> ml_collections.ConfigDict:
  """A run config built in code from `base_config()` (configs/ may not exist where the
  package is installed): full fine-tuning, one checkpoint at the end."""
  c = base_config()
  c.task = task
  c.init_from = init_from
  c.model_overrides.attention = "einsum"
  c.data.update(dict(train=train, columns="", replay=replay, replay_weight=replay_weight,
                     val_fraction=VAL_FRACTION, seq_len=seq_len, tokenizer=tokenizer,
                     with_explanation=with_explanation))
  c.batch_size = batch
  c.total_steps = steps
  c.log_every = max(1, steps // 20)
  c.checkpoint_every = steps  # one checkpoint at the end (plus any SIGTERM one)
  c.keep_checkpoints = 1
  c.eval_every = max(1, steps // 4)  # validation loss for the loss-curve plot
  c.eval_batches = 2
  c.seed = SEED
  c.optim.update(dict(lr=lr, warmup_steps=max(1, steps // 10), final_lr_ratio=0.1))
  # Small in-training evals (held-out CMExam accuracy, TinyStories perplexity) for the
  # report's domain-gain / forgetting curves; step 5 evaluates the finished models in full.
  ev = dict(cmexam="", text="")
  if eval_limits[0]:
    ev.update(cmexam=eval_cmexam, cmexam_limit=eval_limits[0])
  if eval_limits[1]:
    ev.update(text=eval_text, text_limit=eval_limits[1])
  c.eval.update(ev)
  return c


# ------------------------------------------------------------------------------ data splits


def _split_cmexam(src: str, train_out: str, eval_out: str, n_eval: int) -> tuple[int, int]:
  """Copies CSV rows into train/eval files; eval = the n_eval rows with the smallest hash.

  The hash is of the question and options text, so the hold-out does not depend on row order
  or file edits elsewhere.
  """
  with open(src, encoding="utf-8-sig", newline="") as f:
    reader = csv.reader(f)
    header = next(reader)
    rows = [r for r in reader if any(x.strip() for x in r)]
  key = lambda r: hashlib.sha256("\x1f".join(r[:2]).encode("utf-8")).hexdigest()
  held = set(map(id, sorted(rows, key=key)[:n_eval]))
  for path, part in ((train_out, [r for r in rows if id(r) not in held]),
                     (eval_out, [r for r in rows if id(r) in held])):
    with open(path, "w", encoding="utf-8", newline="") as f:
      w = csv.writer(f)
      w.writerow(header)
      w.writerows(part)
  return len(rows) - len(held), len(held)


def _write_stories(texts: list[str], path: str) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for t in texts:
      f.write(t.strip() + f"\n{corpus.EOT}\n")


# ------------------------------------------------------------------------------ steps


def _import_base(base: str, out: str, shipped: bool) -> dict:
  cfg, params = hf_import.import_hf(base, out, scan_layers=True, log=_log)
  res = {"model_dir": out, "params_m": round(cfg.num_params() / 1e6, 3)}
  if not shipped:
    res.update(reference="skipped", note="imported (reference check only for the shipped base)")
    return res
  got = generate.generate(cfg, params, [REFERENCE_PROMPT], len(REFERENCE_IDS))[0]
  ok = got == REFERENCE_IDS
  _log(f"    greedy reference continuation: {'PASS' if ok else 'FAIL'}")
  if not ok:
    first = next(i for i, (a, b) in enumerate(zip(got, REFERENCE_IDS)) if a != b)
    raise MedjaxError(f"the imported base does not reproduce the reference continuation: "
                      f"first difference at new token {first} (got {got[first]}, expected "
                      f"{REFERENCE_IDS[first]}); the HF import is broken")
  res.update(reference="PASS", note="imported; greedy reference continuation PASS")
  return res


def _extend_vocab(wd: str, base_dir: str, med_train: list[str], med_val: list[str],
                  add_n: int) -> dict:
  base_tok = modeldir.tokenizer_path(base_dir)
  if base_tok is None:
    raise MedjaxError(f"{base_dir}: the base has no tokenizer.model or tokenizer.json")
  if base_tok.endswith(".json"):  # byte-level BPE: nothing to extend, the base goes on as is
    tpc = extend.tokens_per_char(load_tokenizer(base_tok), med_val)
    _log(f"    byte-level BPE base: no vocabulary extension; tokens/char {tpc:.3f}")
    n = load_tokenizer(base_tok).vocab_size
    return {"tokenizer": base_tok, "model_dir": base_dir, "base_vocab_size": n,
            "vocab_size": n, "added": 0, "sample_added": [], "tokens_per_char_before": tpc,
            "tokens_per_char_after": tpc,
            "note": f"byte-level BPE base (vocab {n}): no extension, tokens/char {tpc:.2f}"}
  rep = extend.extend_tokenizer(base_tok, med_train, add_n, os.path.join(wd, "tokenizer"))
  # Measured on the CPT validation documents, which neither the tokenizer nor CPT trains on.
  before = load_tokenizer(base_tok)
  after = load_tokenizer(rep["path"])
  tpc0, tpc1 = extend.tokens_per_char(before, med_val), extend.tokens_per_char(after, med_val)
  resized = os.path.join(wd, "base_resized")
  vocab.resize_checkpoint(base_dir, rep["path"], resized, log=_log)
  _log(f"    tokens/char on held-out medical text: {tpc0:.3f} -> {tpc1:.3f}")
  return {"tokenizer": rep["path"], "model_dir": resized, "base_vocab_size":
          rep["base_vocab_size"], "vocab_size": rep["vocab_size"], "added": rep["added"],
          "sample_added": rep["sample_added"][:10], "tokens_per_char_before": tpc0,
          "tokens_per_char_after": tpc1,
          "note": f"vocab {rep['base_vocab_size']} -> {rep['vocab_size']}, tokens/char "
                  f"{tpc0:.2f} -> {tpc1:.2f}"}


def _train(steps: Steps, c, workdir: str) -> dict:
  steps.fresh_dir(workdir)
  last = loop.main(c, workdir)
  return {"workdir": workdir, "loss": last.get("loss"), "val_loss": last.get("val_loss"),
          "note": f"{c.total_steps} steps, final train loss {last.get('loss', float('nan')):.3f}"
                  + (f", val loss {last['val_loss']:.3f}" if "val_loss" in last else "")}


def _evaluate(models: dict[str, str], base_dir: str, tokenizer_path: str, med_val: list[str],
              stories: list[str], questions: list, eval_len: int) -> dict:
  """Perplexities, CMExam accuracy and greedy samples of each model, on the same tokenizer."""
  tok = load_tokenizer(tokenizer_path)
  med_prompt = cmexam.format_prompt(questions[0])
  rows = {}
  # The original base on its own 512-piece tokenizer: TinyStories numbers only (its medical
  # perplexity would be over byte tokens, not comparable with the extended vocabulary).
  base_tok = modeldir.tokenizer_path(base_dir)
  extended = base_tok != tokenizer_path  # else the "base" row below is the original base
  todo = [("base (original vocab)", base_dir, load_tokenizer(base_tok), False)] if extended \
      else []
  todo += [(name, path, tok, True) for name, path in models.items()]
  for name, path, t, full in todo:
    _log(f"    evaluating {name} ({path})")
    m = load.load(path)
    r = {"path": path}
    r["story_ppl"] = scoring.perplexity(m.cfg, m.params, t, stories, max_len=eval_len)[
        "perplexity"]
    r["story"] = generate.generate_text(m, t, ["Once upon a time"], max_new_tokens=40)[0]
    if full:
      r["medical_ppl"] = scoring.perplexity(m.cfg, m.params, t, med_val, max_len=eval_len)[
          "perplexity"]
      # max_len as SFT's seq_len: long prompts are cut from the left exactly as in training.
      acc = exam.evaluate_cmexam(m.cfg, m.params, t, questions, method="loglik",
                                     max_len=eval_len)
      r.update(cmexam_accuracy=acc["accuracy"], cmexam_chance=acc["chance"],
               cmexam_n=acc["n"])
      r["medical"] = generate.generate_text(m, t, [med_prompt], max_new_tokens=24)[0]
    _log("      " + ", ".join(f"{k} {v:.3f}" for k, v in r.items() if isinstance(v, float)))
    rows[name] = r
  note = (f"Held-out sets: {len(med_val)} medical documents (never seen by the tokenizer "
          f"trainer or CPT), {len(stories)} TinyStories stories (excluded from the replay), "
          f"{len(questions)} CMExam questions (excluded from SFT). Perplexity is per token of "
          + ("the extended tokenizer for all rows except 'base (original vocab)'." if extended
             else "the base's own tokenizer (not extended).")
          + f" The answer to the sample prompt is {questions[0].answer}.")
  return {"rows": rows, "note": note, "medical_prompt": med_prompt,
          "medical_answer": questions[0].answer}


def _export(src: str, out: str, tokenizer_path: str, texts: list[str]) -> dict:
  hf_export.export_hf(src, out, overwrite=True, log=_log)
  res = {"hf_dir": out}
  try:
    import torch
    import transformers
  except ImportError:
    res.update(transformers=None, note="torch/transformers not installed: reload check skipped")
    _log("    " + res["note"])
    return res
  import numpy as np
  text = "Once upon a time, 患者出现头痛和发热，建议及时就医。"
  tok = load_tokenizer(tokenizer_path)
  ids = tok.encode(text)
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  # Tokenizer parity on held-out text, reported (not enforced): the model is exact either way.
  agree = sum(hf_tok(x)["input_ids"] == tok.encode(x) for x in texts) / max(len(texts), 1)
  model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  with torch.no_grad():
    want = model(torch.tensor([ids])).logits.numpy()
  got = np.asarray(load.load(src)(np.array([ids])))
  diff = float(np.abs(got - want).max())
  res.update(transformers=transformers.__version__, max_logit_diff=diff,
             tokenizer_agreement=agree,
             note=f"reloaded with transformers {transformers.__version__}: largest logit "
                  f"difference vs medjax {diff:.2e} on {len(ids)} tokens; AutoTokenizer gives "
                  f"medjax's ids on {agree:.0%} of {len(texts)} held-out medical documents")
  _log("    " + res["note"])
  if agree < 1:
    _log("    warning: AutoTokenizer on the export does not reproduce medjax's tokenizer; "
         "tokenize with medjax.load_tokenizer to feed the exported model")
  if diff > 1e-3:
    raise MedjaxError(f"exported model disagrees with medjax: max logit difference {diff:.3g}")
  return res


# ------------------------------------------------------------------------------ the demo


def run_demo(workdir: str = "medjax-demo", quick: bool = False, base: str | None = None,
             corpus_paths: list[str] | None = None, cmexam_path: str | None = None,
             redo: bool = False) -> dict:
  """Runs the whole pipeline; returns a summary dict (also in WORKDIR/summary.json).

  Args:
    workdir: where every artifact goes; finished steps there are reused.
    quick: the small settings (a couple of minutes on a laptop CPU).
    base: a Hugging Face Llama or Qwen2 dir (default: the shipped TinyStories-260K).
    corpus_paths: medical text files (.csv/.txt/.jsonl; default: the shipped sample).
    cmexam_path: a CMExam CSV (default: the shipped 1,200-question sample).
    redo: ignore finished steps.

  Raises:
    MedjaxError: a failed check (reference continuation, CPT not lowering medical
      perplexity, export parity).
  """
  t0 = time.perf_counter()
  mode = "quick" if quick else "full"
  s = SETTINGS[mode]
  shipped = base is None
  base = os.path.abspath(base or str(asset_path(SHIPPED_BASE)))
  corpus_paths = [os.path.abspath(p) for p in
                  (corpus_paths or [str(asset_path("medical_text_sample.csv"))])]
  cmexam_path = os.path.abspath(cmexam_path or str(asset_path("cmexam_sample.csv")))
  wd = os.path.abspath(workdir)
  os.makedirs(os.path.join(wd, "data"), exist_ok=True)
  steps = Steps(wd, signature({"mode": mode, **s, "replay": REPLAY_WEIGHT}, base,
                                corpus_paths, cmexam_path), redo)
  _log(f"medjax demo ({mode}) in {wd}")

  # Data splits are cheap and deterministic: recomputed every run, never stale.
  docs = corpus.read_documents(corpus_paths)
  med_train, med_val = corpus.split_documents(docs, VAL_FRACTION, SEED)
  med_train, med_val = [d.text for d in med_train], [d.text for d in med_val]
  stories = corpus.read_texts(str(asset_path("tinystories_sample.txt")))
  story_train, story_val = corpus.split_documents(stories, 0.1, SEED)
  replay = os.path.join(wd, "data", "tinystories_replay.txt")
  _write_stories(story_train, replay)
  story_heldout = os.path.join(wd, "data", "tinystories_heldout.txt")
  _write_stories(story_val, story_heldout)
  sft_train = os.path.join(wd, "data", "cmexam_train.csv")
  sft_eval = os.path.join(wd, "data", "cmexam_eval.csv")
  n_tr, n_ev = _split_cmexam(cmexam_path, sft_train, sft_eval, EVAL_QUESTIONS)
  eval_qs, problems = cmexam.read_cmexam(sft_eval)
  if not eval_qs:
    raise MedjaxError(f"{cmexam_path}: no CMExam questions could be read")
  _log(f"data: {len(med_train)}/{len(med_val)} medical train/held-out documents, "
       f"{len(story_train)}/{len(story_val)} TinyStories replay/held-out, "
       f"{n_tr}/{n_ev} CMExam SFT/held-out questions")

  base_dir = os.path.join(wd, "base")
  r1 = steps.run(1, "import", "import the base model and check the reference continuation",
                 lambda: _import_base(base, base_dir, shipped))
  r2 = steps.run(2, "vocab", f"extend the vocabulary with {s['add_n']} medical pieces",
                 lambda: _extend_vocab(wd, base_dir, med_train, med_val, s["add_n"]))
  cpt_dir, sft_dir = os.path.join(wd, "cpt"), os.path.join(wd, "sft")
  train_eval = (s["train_eval_questions"], s["train_eval_stories"])
  cpt_cfg = train_config("cpt", r2["model_dir"], ",".join(corpus_paths), r2["tokenizer"],
                         s["cpt_steps"], s["cpt_batch"], s["cpt_seq"], lr=3e-3, replay=replay,
                         replay_weight=REPLAY_WEIGHT, eval_cmexam=sft_eval,
                         eval_text=story_heldout, eval_limits=train_eval)
  steps.run(3, "cpt", f"continued pretraining, {s['cpt_steps']} steps, "
            f"{REPLAY_WEIGHT:.0%} TinyStories replay", lambda: _train(steps, cpt_cfg, cpt_dir))
  sft_cfg = train_config("sft", cpt_dir, sft_train, r2["tokenizer"], s["sft_steps"],
                         s["sft_batch"], s["sft_seq"], lr=5e-4, with_explanation=True,
                         eval_cmexam=sft_eval, eval_text=story_heldout,
                         eval_limits=train_eval)
  steps.run(4, "sft", f"SFT on {n_tr} CMExam questions, {s['sft_steps']} steps",
            lambda: _train(steps, sft_cfg, sft_dir))
  base_row = "base (resized)" if r2["added"] else "base"
  models = {base_row: r2["model_dir"], "CPT": cpt_dir, "CPT + SFT": sft_dir}
  qs = eval_qs[: s["eval_questions"]]

  def eval_step():
    r = _evaluate(models, base_dir, r2["tokenizer"], med_val[: s["eval_medical"]],
                  story_val[: s["eval_stories"]], qs, s["eval_len"])
    b, c = r["rows"][base_row]["medical_ppl"], r["rows"]["CPT"]["medical_ppl"]
    r["note"] += f" CPT medical perplexity {b:.2f} -> {c:.2f}."
    sft = r["rows"]["CPT + SFT"]
    r["summary"] = (f"CMExam {100 * sft['cmexam_accuracy']:.1f}% after SFT (chance "
                    f"{100 * sft['cmexam_chance']:.1f}%); CPT medical ppl {b:.4g} -> {c:.4g}")
    return r
  r5 = steps.run(5, "eval", "evaluate base, CPT and SFT", eval_step)
  b, c = r5["rows"][base_row]["medical_ppl"], r5["rows"]["CPT"]["medical_ppl"]
  ok = c < b
  _log(f"check: CPT lowered held-out medical perplexity {b:.2f} -> {c:.2f}: "
       f"{'PASS' if ok else 'FAIL'}")
  if not ok:
    raise MedjaxError(f"CPT did not lower held-out medical perplexity ({b:.3f} -> {c:.3f})")

  hf_dir = os.path.join(wd, "hf")
  r6 = steps.run(6, "export", "export the final model to Hugging Face format",
                 lambda: _export(sft_dir, hf_dir, r2["tokenizer"], med_val[: s["eval_medical"]]))

  _log(f"[7/{TOTAL_STEPS}] report")
  runs = report.read_runs([cpt_dir, sft_dir], ["CPT", "SFT"])
  summary = {
      "mode": mode, "workdir": wd, "settings": s, "replay_weight": REPLAY_WEIGHT,
      "reference": r1.get("reference"), "vocab": r2, "eval": r5, "export": r6,
      "cpt_lowered_medical_ppl": ok, "medical_ppl": {"base": b, "cpt": c},
      "throughput": {r.label: report.throughput(r) for r in runs},
      "steps": steps.timings,
      "artifacts": {
          "base model (imported)": base_dir, "extended tokenizer": r2["tokenizer"],
          "base model (resized vocab)": r2["model_dir"], "CPT workdir": cpt_dir,
          "SFT workdir": sft_dir, "Hugging Face export": hf_dir,
          "loss curves": os.path.join(wd, report.FIGURES["loss"]),
          "CMExam SFT split": sft_train, "CMExam held-out split": sft_eval,
          "TinyStories replay": replay, "summary": os.path.join(wd, "summary.json"),
          "report": os.path.join(wd, "report.md"),
          "report (HTML)": os.path.join(wd, "report.html")},
  }
  report.build(runs, wd, title="medjax demo report", intro=demo_report.sections(summary))
  summary["seconds"] = time.perf_counter() - t0
  with open(summary["artifacts"]["summary"], "w") as f:
    json.dump(summary, f, indent=1, default=str)
  _log("\n" + demo_report.eval_table(r5["rows"]))
  _log(f"\nreport: {summary['artifacts']['report']}  ({summary['seconds']:.0f}s in all)")
  return summary
