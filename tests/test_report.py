"""A recipe as its user sees it, on tiny runs: CPT with in-training evals (metrics.jsonl and
TensorBoard, equal to `medjax eval` on the same checkpoint), then SFT from it on a second
exam schema (the English `medqa_usmle` task: trained and evaluated by configuration only),
throughput counting every processed token, and `medjax report` comparing the chained runs,
with its bad input."""

import glob
import json
import os
import shutil
import struct
from pathlib import Path

import pytest

from medjax import cli
from medjax.assets import asset_path
from medjax.training import config as runconfig
from medjax.training import loop, report

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SEQ = 64
EXAM = str(asset_path("cmexam_sample.csv"))
TEXT = str(asset_path("tinystories_sample.txt"))
MEDQA = str(asset_path("medqa_usmle_sample.csv"))


def _config(name, **kw):
  o = {"init_from": "", "model": "tiny", "data.replay": "", "data.seq_len": SEQ,
       "batch_size": 4, "log_every": 1, "checkpoint_every": 4, "total_steps": 4,
       "eval_every": 2, "eval_batches": 1, "optim.warmup_steps": 1,
       "data.tokenizer": "asset:tinystories-260k/tokenizer.model",
       "eval.cmexam": EXAM, "eval.cmexam_limit": 6, "eval.text": TEXT, "eval.text_limit": 4}
  o.update(kw)
  return runconfig.load(str(CONFIGS / name), [f"--config.{k}={v}" for k, v in o.items()])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A tiny CPT run with in-training evals, and an SFT run started from it on the English
  USMLE-style sample (its own columns, header and answer cue), only the config changed."""
  root = tmp_path_factory.mktemp("runs")
  cpt, sft = str(root / "cpt"), str(root / "sft")
  loop.main(_config("tiny_cpt.py", **{"data.train": "asset:medical_text_sample.csv"}), cpt)
  # The eval file is a copy: a different path from data.train, so the loop scores its first
  # questions (as `medjax eval --limit` does) instead of the held-out split.
  medqa_eval = shutil.copy(MEDQA, root / "medqa_eval.csv")
  loop.main(_config("tiny_sft.py", init_from=cpt, total_steps=2, checkpoint_every=2,
                    exam="medqa_usmle", **{"data.train": MEDQA, "data.seq_len": 256,
                                           "data.with_explanation": True,
                                           "eval.cmexam": medqa_eval, "eval.text": ""}), sft)
  return cpt, sft, str(medqa_eval)


def _tensorboard_scalars(workdir):
  """{(tag, step): value} from the run's TensorBoard event file (TFRecord framing)."""
  from tensorboardX.proto import event_pb2
  (path,) = glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*"))
  data, i, out = Path(path).read_bytes(), 0, {}
  while i < len(data):
    (n,) = struct.unpack("<Q", data[i:i + 8])
    event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
    i += 12 + n + 4  # length, its crc, the record, its crc
    for v in event.summary.value:
      out[v.tag, event.step] = v.simple_value
  return out


def test_in_training_evals_match_medjax_eval(runs, tmp_path):
  cpt, _, _ = runs
  _, evals = report.read_metrics(cpt)
  assert [e["step"] for e in evals] == [2, 4]
  last = evals[-1]
  assert {"val_loss", "cmexam_acc", "general_ppl"} <= set(last)
  tb = _tensorboard_scalars(cpt)
  for e in evals:
    for k in ("val_loss", "cmexam_acc", "general_ppl"):
      assert tb[k, e["step"]] == pytest.approx(e[k], rel=1e-6)  # TB stores float32
  # `medjax eval` on the newest checkpoint (step 4) scores what the loop scored at step 4.
  out = tmp_path / "acc.json"
  assert cli.main(["eval", "--checkpoint", cpt, "--cmexam", EXAM, "--limit", "6",
                   "--out", str(out)]) == 0
  assert json.loads(out.read_text())["accuracy"] == last["cmexam_acc"]
  assert cli.main(["eval", "--checkpoint", cpt, "--text", TEXT, "--limit", "4",
                   "--max-len", str(SEQ), "--out", str(out)]) == 0
  assert json.loads(out.read_text())["perplexity"] == pytest.approx(last["general_ppl"],
                                                                    rel=1e-5)


def test_second_exam_schema_trains_and_evaluates(runs, tmp_path, capsys):
  _, sft, medqa_eval = runs
  train, evals = report.read_metrics(sft)
  assert train[-1]["loss"] < 20 and train[-1]["loss_tokens_seen"] > 0
  (e,) = evals
  assert e["step"] == 2 and 0 <= e["medqa_usmle_acc"] <= 1 and "cmexam_acc" not in e
  assert json.loads(Path(sft, "run_config.json").read_text())["exam"] == "medqa_usmle"
  out = tmp_path / "medqa.json"
  assert cli.main(["eval", "--checkpoint", sft, "--task", "medqa_usmle", "--exam", medqa_eval,
                   "--limit", "6", "--out", str(out)]) == 0
  r = json.loads(out.read_text())
  assert r["task"] == "medqa_usmle" and r["n"] == 6 and r["unparsed"]["count"] == 0
  assert r["accuracy"] == e["medqa_usmle_acc"]
  # The same file read as CMExam names the missing column and the task field, exit 1.
  capsys.readouterr()
  assert cli.main(["eval", "--checkpoint", sft, "--exam", medqa_eval]) == 1
  err = capsys.readouterr().err.strip()
  assert medqa_eval in err and "'Question'" in err and "field 'question'" in err


def test_throughput_counts_every_processed_token(runs):
  cpt, sft, _ = runs
  for wd, batch, seq in ((cpt, 4, SEQ), (sft, 4, 256)):
    train, _ = report.read_metrics(wd)
    seen = [r["tokens_seen"] for r in train]
    per_step = [b - a for a, b in zip([0.0] + seen, seen)]
    # Processed tokens are the rows' non-padding tokens: at most batch x seq, and (packed
    # rows) most of it; loss tokens are a subset.
    assert all(0.5 * batch * seq <= t <= batch * seq for t in per_step), per_step
    assert all(r["loss_tokens_seen"] <= r["tokens_seen"] for r in train)
    assert all(r["loss_tokens_per_s"] <= r["tokens_per_s"] for r in train)
  # CPT trains on (almost) every token; SFT only on answers, so the two counts part there.
  cpt_train, _ = report.read_metrics(cpt)
  sft_train, _ = report.read_metrics(sft)
  cpt_share = cpt_train[-1]["loss_tokens_seen"] / cpt_train[-1]["tokens_seen"]
  sft_share = sft_train[-1]["loss_tokens_seen"] / sft_train[-1]["tokens_seen"]
  assert cpt_share > 0.9 and sft_share < 0.5, (cpt_share, sft_share)


def test_report_on_chained_runs(runs, tmp_path, capsys):
  cpt, sft, _ = runs
  out = tmp_path / "rep"
  assert cli.main(["report", cpt, sft, "--out", str(out), "--label", "CPT",
                   "--label", "SFT"]) == 0
  md = (out / "report.md").read_text()
  for section in ("## Runs", "## Loss and learning rate", "## Domain gain and forgetting",
                  "## Throughput", "## Checkpoints", "## Configs"):
    assert section in md
  # SFT started from the CPT workdir: its evals sit after CPT's 4 steps on the step axis.
  assert "start at step 4 (SFT)" in md
  evals_table = md[md.index("| run | step | val_loss | cmexam_acc | medqa_usmle_acc | "
                            "general_ppl |"):]
  evals_table = evals_table[: evals_table.index("\n\n")]
  steps = [(ln.split("|")[1].strip(), ln.split("|")[2].strip())
           for ln in evals_table.splitlines()[2:]]
  assert steps == [("CPT", "2"), ("CPT", "4"), ("SFT", "6")], steps
  assert "best val loss" in md and f"{cpt}/checkpoints/4" in md
  for png in ("loss_curves.png", "throughput.png", "evals.png"):
    assert (out / png).stat().st_size > 5000
  html = (out / "report.html").read_text()
  # Self-contained: the three figures are embedded, nothing is fetched.
  assert html.count('src="data:image/png;base64,') == 3
  assert "src=\"http" not in html and "<link" not in html
  assert "<td class=\"r\">6</td>" in html


def test_report_refuses_a_folder_that_is_not_a_run(runs, tmp_path, capsys):
  cpt, _, _ = runs
  not_run = tmp_path / "empty"
  not_run.mkdir()
  out = tmp_path / "rep"
  assert cli.main(["report", cpt, str(not_run), "--out", str(out)]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and str(not_run) in err[0] and "metrics.jsonl" in err[0]
  assert not out.exists()  # nothing written
