"""Bad input through the CLI: a one-line error naming the file/field/value, exit 1, no
traceback, and nothing written half-way. Each case runs `medjax.cli.main` in-process and fails
before any compile, so the whole file takes seconds."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from medjax import cli
from medjax.checkpoints import convert
from medjax.checkpoints import safetensors_io
from medjax.model.config import LlamaConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TOKENIZER = "asset:tinystories-260k/tokenizer.model"
HF = dict(model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=48,
          num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
          max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
          architectures=["LlamaForCausalLM"])


def write_hf(d: Path, config: dict | None = None, drop: str | None = None,
             reshape: str | None = None) -> Path:
  """A tiny HF Llama dir written without torch: config.json + model.safetensors (zeros),
  optionally missing tensor `drop` or with tensor `reshape` one row short."""
  d.mkdir(parents=True, exist_ok=True)
  (d / "config.json").write_text(json.dumps(config or HF))
  c = {k: v for k, v in HF.items() if k not in ("model_type", "architectures")}
  cfg = LlamaConfig(**c)
  specs = []
  for k in convert.hf_keys(cfg):
    shape = convert.hf_shape(cfg, k)
    if k == drop:
      continue
    if k == reshape:
      shape = (shape[0] - 1, *shape[1:])
    specs.append((k, shape, np.dtype(np.float32)))
  shapes = {k: s for k, s, _ in specs}
  safetensors_io.write_file(str(d / "model.safetensors"), specs,
                            lambda k: np.zeros(shapes[k], np.float32))
  return d


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Shared fixtures: a good HF dir, its medjax import (no tokenizer), a corpus."""
  root = tmp_path_factory.mktemp("bad_input")
  hf = write_hf(root / "hf")
  assert cli.main(["import-hf", str(hf), str(root / "ckpt")]) == 0
  rng = np.random.default_rng(0)
  words = ["fever", "cough", "heart", "blood", "lung", "pain"]
  (root / "corpus.txt").write_text(
      "\n\n".join(" ".join(rng.choice(words, 30)) for _ in range(20)))
  assert cli.main(["data", "build", "medical_text", "--input", str(root / "corpus.txt"),
                   "--out", str(root / "built"), "--tokenizer", TOKENIZER, "--seq-len", "64",
                   "--workers", "1"]) == 0
  return root


BUILT = Path("built") / "medical_text" / "tokenized"


def _edit_manifest(root: Path, edit) -> None:
  path = root / BUILT / "manifest.json"
  m = json.loads(path.read_text())
  edit(m)
  path.write_text(json.dumps(m))


def train_args(root: Path, *overrides: str) -> list[str]:
  base = {"init_from": "", "model": "tiny", "data.train": str(root / "corpus.txt"),
          "data.replay": "", "data.seq_len": 64, "batch_size": 4, "total_steps": 2,
          "eval_every": 0, "eval.text": "", "data.tokenizer": TOKENIZER}
  return (["train", "--config", str(CONFIGS / "tiny_cpt.py"), "--workdir", str(root / "w")]
          + [f"--config.{k}={v}" for k, v in base.items()] + list(overrides))


def eval_args(root: Path, flag: str, source: str, *extra: str, ckpt: str = "ckpt") -> list[str]:
  """`medjax eval` of root/ckpt on root/source (given as --cmexam or --text) into res.json."""
  return (["eval", "--checkpoint", str(root / ckpt), flag, str(root / source), *extra,
           "--out", str(root / "res.json")])


def _bad_hf(root: Path, **kw) -> Path:
  return write_hf(root / "hf_case", **kw)


# (id, make(root) -> argv, needle in the error line, path that must not be written).
# `root` is a fresh per-case directory holding copies of the shared fixtures.
CASES = [
    ("unknown-config-field", lambda r: train_args(r, "--config.totl_steps=3"),
     "totl_steps", "w"),
    ("wrong-type-override", lambda r: train_args(r, "--config.total_steps=abc"),
     "total_steps", "w"),
    ("missing-config-file",
     lambda r: ["train", "--config", str(r / "nope.py"), "--workdir", str(r / "w")],
     "nope.py: no such file", "w"),
    ("bad-nan-policy", lambda r: train_args(r, "--config.nan_policy=ignore"),
     "nan_policy", "w"),
    ("unknown-model-preset", lambda r: train_args(r, "--config.model=llama9"),
     "llama9", "w"),
    ("hf-dir-without-config-json",
     lambda r: (os.remove(_bad_hf(r) / "config.json"),
                ["import-hf", str(r / "hf_case"), str(r / "out")])[1],
     "no config.json", "out"),
    ("hf-config-not-json",
     lambda r: ((_bad_hf(r) / "config.json").write_text("{oops"),
                ["import-hf", str(r / "hf_case"), str(r / "out")])[1],
     "config.json: not valid JSON", "out"),
    ("hf-model-type-not-llama",
     lambda r: (_bad_hf(r, config={**HF, "model_type": "mistral"}),
                ["import-hf", str(r / "hf_case"), str(r / "out")])[1],
     "model_type='mistral'", "out"),
    ("unsupported-rope-scaling",
     lambda r: (_bad_hf(r, config={**HF, "rope_scaling": {"type": "linear", "factor": 2.0}}),
                ["import-hf", str(r / "hf_case"), str(r / "out")])[1],
     "rope_scaling type 'linear'", "out"),
    ("trust-remote-code-auto-map",
     lambda r: (_bad_hf(r, config={**HF, "auto_map": {
         "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}),
                ["import-hf", str(r / "hf_case"), str(r / "out")])[1],
     "auto_map", "out"),
    ("safetensors-missing-tensor",
     lambda r: (_bad_hf(r, drop="model.norm.weight"),
                ["import-hf", str(r / "hf_case"), str(r / "out")])[1],
     "missing tensor(s) model.norm.weight", "out"),
    ("safetensors-misshapen-tensor",
     lambda r: (_bad_hf(r, reshape="model.layers.0.mlp.up_proj.weight"),
                ["import-hf", str(r / "hf_case"), str(r / "out")])[1],
     "'model.layers.0.mlp.up_proj.weight' has shape (47, 32)", "out"),
    ("safetensors-truncated",
     lambda r: ((_bad_hf(r) / "model.safetensors").write_bytes(b"\x10\x00"),
                ["import-hf", str(r / "hf_case"), str(r / "out")])[1],
     "model.safetensors: truncated safetensors file", "out"),
    ("pytorch-bin-pickle",
     lambda r: (os.remove(_bad_hf(r) / "model.safetensors"),
                (r / "hf_case" / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01."),
                ["import-hf", str(r / "hf_case"), str(r / "out")])[2],
     "pytorch_model.bin: refusing to load a PyTorch pickle", "out"),
    ("pt-pickle",
     lambda r: (os.remove(_bad_hf(r) / "model.safetensors"),
                (r / "hf_case" / "consolidated.00.pt").write_bytes(b"\x80\x04K\x01."),
                ["import-hf", str(r / "hf_case"), str(r / "out")])[2],
     "consolidated.00.pt: refusing to load a PyTorch pickle", "out"),
    ("cmexam-missing-columns",
     lambda r: ((r / "q.csv").write_text("Question,Options\n问,A 甲\\nB 乙\n"),
                eval_args(r, "--cmexam", "q.csv"))[1],
     "q.csv:1: missing column 'Answer'", "res.json"),
    ("cmexam-unparseable-options",
     lambda r: ((r / "q.csv").write_text(
         "Question,Options,Answer,Explanation\n问题,甲乙丙丁,A,\n"),
                eval_args(r, "--cmexam", "q.csv"))[1],
     "q.csv:2: option line '甲乙丙丁'", "res.json"),
    ("non-utf8-text",
     lambda r: ((r / "gbk.txt").write_bytes("发热咳嗽\n\n胸痛".encode("gbk")),
                eval_args(r, "--text", "gbk.txt"))[1],
     "gbk.txt:1: not UTF-8", "res.json"),
    ("empty-corpus",
     lambda r: ((r / "empty.txt").write_text("\n\n"),
                train_args(r, f"--config.data.train={r / 'empty.txt'}"))[1],
     "empty.txt: no documents", "w"),
    ("missing-corpus", lambda r: train_args(r, f"--config.data.train={r / 'nope.txt'}"),
     "nope.txt': no such file or folder", "w"),
    ("build-from-another-tokenizer",
     lambda r: (_edit_manifest(r, lambda m: m["tokenizer"].update(sha256="0" * 64)),
                train_args(r, f"--config.data.train=tfds:{r / 'built'}"))[1],
     "built with tokenizer sha256 0000000000000000", "w"),
    ("build-truncated-arrayrecord",
     lambda r: (os.truncate(r / BUILT / "train-00000.array_record", 100),
                train_args(r, f"--config.data.train=tfds:{r / 'built'}"))[1],
     "train-00000.array_record: 100 bytes, the manifest says", "w"),
    ("build-missing-split",
     lambda r: (_edit_manifest(r, lambda m: m["splits"].pop("train")),
                train_args(r, f"--config.data.train=tfds:{r / 'built'}"))[1],
     "manifest.json: no split 'train'", "w"),
    ("build-seq-len-not-a-divisor",
     lambda r: train_args(r, f"--config.data.train=tfds:{r / 'built'}",
                          "--config.data.seq_len=48"),
     "data.seq_len=48 must divide the build's row length 64", "w"),
    ("build-empty-source",
     lambda r: ((r / "empty.txt").write_text("\n\n"),
                ["data", "build", "medical_text", "--input", str(r / "empty.txt"), "--out",
                 str(r / "new"), "--tokenizer", TOKENIZER, "--workers", "1"])[1],
     "empty.txt: no documents", "new"),
    ("seq-len-beyond-positions", lambda r: train_args(r, "--config.data.seq_len=4096"),
     "data.seq_len=4096 exceeds the model's max_position_embeddings=512", "w"),
    ("tokenizer-larger-than-embedding", lambda r: train_args(r, "--config.model=tiny-mha"),
     "vocabulary 512 is larger than the model's embedding table (301)", "w"),
    ("init-checkpoint-shape-mismatch",
     lambda r: (_edit_json(r / "ckpt" / "model_config.json", hidden_size=48),
                train_args(r, f"--config.init_from={r / 'ckpt'}"))[1],
     "parameter embedding has shape (97, 32), the model config needs (97, 48)", "w"),
    ("resume-workdir-of-another-model",
     lambda r: (_fake_run(r / "w"), train_args(r))[1],
     "checkpoints/1: saved state has ['params']['embedding'] of shape (3, 5)", None),
    ("mesh-does-not-divide-devices", lambda r: train_args(r, "--config.mesh.fsdp=2"),
     "does not divide the 1 devices", "w"),
    ("batch-not-divisible-by-data-parallel",
     lambda r: train_args(r, "--config.batch_size=3", "--config.accum_steps=2"),
     "batch_size=3 must be divisible", "w"),
    ("unwritable-workdir",
     lambda r: ((r / "file").write_text("x"),
                train_args(r) + ["--workdir", str(r / "file" / "w")])[1],
     "cannot be created: ", "file/w"),
    ("export-into-non-empty-dir",
     lambda r: ((r / "out").mkdir(), (r / "out" / "keep.txt").write_text("mine"),
                ["export-hf", str(r / "ckpt"), str(r / "out")])[2],
     "out: folder is not empty (pass --overwrite", None),
    ("import-into-non-empty-dir",
     lambda r: ((r / "out").mkdir(), (r / "out" / "keep.txt").write_text("mine"),
                ["import-hf", str(r / "hf"), str(r / "out")])[2],
     "out: folder is not empty (pass --overwrite", None),
    ("eval-checkpoint-without-tokenizer",
     lambda r: ((r / "t.txt").write_text("fever and cough"),
                eval_args(r, "--text", "t.txt"))[1],
     "ckpt: checkpoint has no tokenizer.model", "res.json"),
    ("eval-missing-checkpoint",
     lambda r: ((r / "t.txt").write_text("fever"),
                eval_args(r, "--text", "t.txt", ckpt="nope"))[1],
     "nope: no such folder", "res.json"),
    ("eval-bad-limit",
     lambda r: eval_args(r, "--text", "corpus.txt", "--limit", "0"),
     "argument --limit: invalid value '0': accepts an int >= 1", "res.json"),
    # Ranges of config fields, checked before anything is built (seq_len=0 used to allocate
    # until the kernel killed the run; a negative lr trained to a loss of 46).
    ("seq-len-zero", lambda r: train_args(r, "--config.data.seq_len=0"),
     "config.data.seq_len=0: accepts an int >= 1", "w"),
    ("negative-lr", lambda r: train_args(r, "--config.optim.lr=-1e-3"),
     "config.optim.lr=-0.001: accepts a number > 0", "w"),
    ("replay-weight-one", lambda r: train_args(r, "--config.data.replay_weight=1"),
     "config.data.replay_weight=1.0: accepts a number in [0, 1)", "w"),
    ("keep-checkpoints-zero", lambda r: train_args(r, "--config.keep_checkpoints=0"),
     "config.keep_checkpoints=0: accepts an int >= 1", "w"),
    ("mesh-size-zero", lambda r: train_args(r, "--config.mesh.tensor=0"),
     "config.mesh.tensor=0: accepts an int >= 1 or -1", "w"),
    ("frozen-unknown-prefix", lambda r: train_args(r, "--config.frozen=embeding"),
     "'embeding' is no param path prefix", "w"),
    ("misspelt-field", lambda r: train_args(r, "--config.optim.learning_rate=1"),
     "config.optim.learning_rate: unknown field", "w"),
    ("field-set-in-config-file-unknown",
     lambda r: (_config(r, "c.totl_steps = 3"), _train_with(r, "cfg.py"))[1],
     "config.totl_steps=3: unknown field", "w"),
    # Config files that do not load: one line with the file, the line and the error.
    ("config-syntax-error",
     lambda r: (_config(r, "c.total_steps = (3"), _train_with(r, "cfg.py"))[1],
     "cfg.py:6: SyntaxError: ", "w"),
    ("config-raises",
     lambda r: (_config(r, "c.total_steps = 1 // 0"), _train_with(r, "cfg.py"))[1],
     "cfg.py:6: ZeroDivisionError: integer division or modulo by zero", "w"),
    ("config-wrong-type-in-file",
     lambda r: (_config(r, "c.data.seq_len = '256'"), _train_with(r, "cfg.py"))[1],
     "cfg.py:6: TypeError: ", "w"),
    ("config-without-get_config",
     lambda r: ((r / "cfg.py").write_text("x = 1\n"), _train_with(r, "cfg.py"))[1],
     "cfg.py: no get_config() function", "w"),
    ("config-is-a-folder", lambda r: _train_with(r, ""),
     "is a folder, not a file", "w"),
    # Output paths.
    ("export-into-a-file",
     lambda r: ((r / "out").write_text("mine"), ["export-hf", str(r / "ckpt"), str(r / "out")])[1],
     "out: is a file, not a folder", None),
    ("overwrite-would-delete-the-input",
     lambda r: ["export-hf", str(r / "ckpt"), str(r), "--overwrite"],
     "--overwrite would delete CHECKPOINT", None),
    ("resize-over-a-model-dir",  # used to delete the folder without asking
     lambda r: ["tokenizer", "resize", "--checkpoint", str(r / "ckpt"), "--tokenizer",
                str(r / "corpus.txt"), "--out", str(r / "ckpt")],
     "ckpt: folder is not empty (pass --overwrite", None),
    ("eval-out-is-a-folder",
     lambda r: ((r / "res.json").mkdir(), eval_args(r, "--text", "corpus.txt"))[1],
     "res.json: is a folder, not a file", None),
    ("workdir-is-a-url", lambda r: train_args(r) + ["--workdir", "gs://bucket/run"],
     "gs:// paths are not opened directly", None),
    ("fit-bad-mesh", lambda r: ["fit", "--topology", "v5p:2x2x1", "--mesh", "1,x,1"],
     "argument --mesh: invalid value '1,x,1'", None),
    ("fit-zero-topology", lambda r: ["fit", "--topology", "v5p:0x2x1"],
     "every dimension must be at least 1", None),
]


def _config(root: Path, line: str) -> None:
  """root/cfg.py: tiny_cpt's config with `line` on line 6 (inside get_config)."""
  (root / "cfg.py").write_text(
      "from medjax.training.config import base_config\n\n\n"
      "def get_config(arg=None):\n"
      "  c = base_config()\n"
      f"  {line}\n"
      "  return c\n")


def _train_with(root: Path, config: str) -> list[str]:
  argv = train_args(root)
  argv[2] = str(root / config)
  return argv


def _fake_run(workdir: Path) -> None:
  """A workdir whose checkpoint holds some other model's state."""
  import jax.numpy as jnp
  from medjax.checkpoints import manager as checkpoint
  ck = checkpoint.Checkpointer(str(workdir))
  ck.save(1, {"params": {"embedding": jnp.zeros((3, 5))}}, {}, {"step": 1})
  ck.close()


def _edit_json(path: Path, **kw) -> None:
  d = json.loads(path.read_text())
  d.update(kw)
  path.write_text(json.dumps(d))


def _snapshot(root: Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
          if p.is_file()}


@pytest.mark.parametrize("make,needle,absent", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(files, tmp_path, capsys, make, needle, absent):
  root = tmp_path / "case"
  shutil.copytree(files, root)
  argv = make(root)
  before = _snapshot(root)
  capsys.readouterr()
  rc = cli.main(argv)
  err = capsys.readouterr().err
  lines = [ln for ln in err.splitlines() if ln.strip()]
  assert rc == 1, err
  assert "Traceback" not in err, err
  assert len(lines) == 1 and lines[0].startswith(f"medjax {argv[0]}: error: "), err
  assert needle in lines[0], lines[0]
  if absent:
    assert not (root / absent).exists(), f"{absent} was written: {err}"
  assert _snapshot(root) == before  # nothing written or changed anywhere


def test_debug_shows_the_traceback(files, tmp_path):
  from medjax.errors import ConfigError
  with pytest.raises(ConfigError, match="totl_steps"):
    cli.main(["--debug"] + train_args(files, "--config.totl_steps=3"))
