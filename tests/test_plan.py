"""`medjax plan`: the arithmetic (hours scale as 1/MFU, cost as the price, chip-hours as
chips x hours), data tokens and epochs from a config, a recipe's sum, MFU from a previous
run, and bad input (unknown topology or price key)."""

import json
from pathlib import Path

import numpy as np
import pytest

from medjax import cli
from medjax.assets import asset_path, resolve
from medjax.checkpoints import hf_config
from medjax.data import cmexam, from_config, packing
from medjax.data.tokenizer import load_tokenizer
from medjax.errors import ConfigError
from medjax.training import config as runconfig
from medjax.training import plan

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SFT = str(CONFIGS / "tiny_sft.py") + ":runlocal"


def test_cost_arithmetic():
  base = plan.run_cost(flops_per_step=1e15, tokens_per_step=1e6, steps=1000, chips=8,
                       peak_flops=459e12, mfu=0.4, price=4.2)
  assert base["step_s"] == pytest.approx(1e15 / (8 * 459e12 * 0.4))
  assert base["tokens_per_s"] == pytest.approx(1e6 / base["step_s"])
  assert base["chip_hours"] == pytest.approx(8 * base["wall_hours"])
  assert base["cost"] == pytest.approx(4.2 * base["chip_hours"])
  half = plan.run_cost(1e15, 1e6, 1000, 8, 459e12, 0.2, 4.2)
  assert half["wall_hours"] == pytest.approx(2 * base["wall_hours"])  # half the MFU
  assert half["cost"] == pytest.approx(2 * base["cost"])
  dear = plan.run_cost(1e15, 1e6, 1000, 8, 459e12, 0.4, 8.4)
  assert dear["cost"] == pytest.approx(2 * base["cost"])  # twice the price
  assert dear["wall_hours"] == base["wall_hours"]
  with pytest.raises(ConfigError, match="--mfu 1.5"):
    plan.run_cost(1e15, 1e6, 1000, 8, 459e12, 1.5, 4.2)


def test_plan_of_a_config_counts_its_data():
  c = runconfig.load(SFT)
  r = plan.plan_run(c, "v5e:2x2", mfu=0.5, price=1.2, fit=False)
  # The model is read from init_from (the shipped TinyStories-260K), not the `model` preset.
  cfg = hf_config.load_hf_config(str(asset_path("tinystories-260k")))
  assert r["params"] == cfg.num_params() and "tinystories-260k" in r["model"]
  assert r["tokens_per_step"] == c.batch_size * c.data.seq_len
  assert r["flops_per_step"] == pytest.approx(
      cfg.flops_per_token(c.data.seq_len) * r["tokens_per_step"])
  # Counted with the run's tokenizer over the training split of the shipped CMExam sample.
  # Truncated and "fit"-packed as training does it: the tokens and rows of the run's own
  # SFT pipeline, and an epoch is those rows.
  tok = load_tokenizer(plan.tokenizer_path(c))
  qs, _ = cmexam.read_cmexam(resolve(c.data.train))
  train, _ = from_config.split_questions(qs, c.data.val_fraction, c.seed)
  docs = packing.tokenize_sft(train, tok, c.data.seq_len, c.data.with_explanation)
  n_rows = len(packing.pack(np.diff(docs.offsets), c.data.seq_len, "fit")[1]) - 1
  assert "cmexam questions" in r["data_note"] and 1e5 < r["data_tokens"] < 1e6
  assert r["data_tokens"] == docs.offsets[-1] and r["data_rows"] == n_rows
  assert r["data_rows"] * c.data.seq_len > r["data_tokens"]  # padding: rows are not full
  assert r["epochs"] == pytest.approx(c.total_steps * c.batch_size / n_rows)
  two = plan.plan_run(c, "v5e:2x2", 0.5, 1.2, epochs=2, fit=False)
  assert two["epochs"] == pytest.approx(2, rel=0.05)
  assert two["steps"] == -(-2 * n_rows // c.batch_size)
  assert two["cost"] / r["cost"] == pytest.approx(two["steps"] / r["steps"])


def test_cli_recipe_sum_and_mfu_from_a_run(tmp_path, capsys):
  run = tmp_path / "run"
  run.mkdir()
  # First interval holds compilation and is skipped; the median of the rest is 0.3.
  recs = [{"step": s, "loss": 1.0, "lr": 0.1, "tokens_per_s": 1.0, "loss_tokens_per_s": 0.5,
           "mfu": m, "step_time_s": 1.0} for s, m in ((1, 0.01), (2, 0.2), (3, 0.3),
                                                      (4, 0.4))]
  (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
  args = ["plan", "--config", SFT, "--config", str(CONFIGS / "tiny_cpt.py") + ":runlocal",
          "--topology", "v5p:2x2x1", "--no-fit", "--tokens", "-", "--tokens", "2e6"]
  assert cli.main([*args, "--from-run", str(run)]) == 0
  out = capsys.readouterr().out
  assert "MFU 30.0% (measured: median of 3 logged intervals" in out
  assert "$4.20 per chip-hour" in out and "as listed" in out
  assert cli.main([*args, "--mfu", "0.15", "--price", "v5p=8.4", "--sft.total_steps=40"]) == 0
  out2 = capsys.readouterr().out
  assert "MFU 15.0% (given)" in out2 and "$8.40 per chip-hour (given with --price)" in out2
  rows = {ln.split()[0]: ln.split() for ln in out2.splitlines()[3:6]}
  assert rows["tiny_sft"][4] == "40" and rows["tiny_cpt"][4] == "20"  # --sft.* only there
  assert rows["tiny_cpt"][8] == "2M"  # --tokens, in config order ("4 x 128" is 3 words)
  hours = [float(rows[k][-3]) for k in ("tiny_sft", "tiny_cpt", "total")]
  assert hours[2] == pytest.approx(hours[0] + hours[1], rel=0.02)


def test_cli_fit_column_compiles_the_step(capsys):
  assert cli.main(["plan", "--config", SFT, "--topology", "v5e:1x1", "--cpu"]) == 0
  out = capsys.readouterr().out
  assert "yes (" in out and "CPU ESTIMATE" in out


@pytest.mark.parametrize("args,needle", [
    (["--topology", "v9:2x2"], "--topology: invalid value 'v9:2x2': expected CHIP:AxB[xC]"),
    (["--topology", "v5p:2x2x1", "--price", "v7=3"], "unknown price key 'v7'"),
    (["--topology", "v5p:2x2x1", "--price", "v5p=free"], "--price: invalid value 'v5p=free'"),
    (["--topology", "v5p:2x2x1", "--tokens", "1", "--tokens", "2"], "one value per --config"),
    (["--topology", "v5p:2x2x1", "--config.bogus=1"], "bogus"),
    (["--topology", "v5p:2x2x1", "--mfu", "35"],
     "--mfu: invalid value '35': accepts a number in (0, 1]"),
])
def test_bad_input_is_one_line(args, needle, capsys):
  assert cli.main(["plan", "--config", SFT, "--no-fit", *args]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and needle in err[0], err


def test_a_recipe_is_priced_before_its_bucket_exists(capsys):
  # The TPU recipes name a bucket that is not on this machine: the base becomes its preset,
  # and the data's tokens are given.
  args = ["plan", "--config", str(CONFIGS / "llama2_7b_cpt.py"), "--config",
          str(CONFIGS / "llama2_7b_sft.py"), "--tokens", "1e9", "--tokens", "2.23e7",
          "--topology", "v5p:2x2x1", "--no-fit"]
  assert cli.main(args) == 0
  out = capsys.readouterr().out
  assert "preset 'llama2-7b' (init_from /gcs/YOUR_BUCKET/medjax/llama2-7b is not here)" in out
  assert "epochs assume full rows" in out  # SFT tokens given: its rows are not counted
  rows = {ln.split()[0]: ln.split() for ln in out.splitlines() if ln.startswith("  llama2_7b")}
  assert rows["llama2_7b_cpt"][4] == "1,000" and rows["llama2_7b_sft"][4] == "1,350"
