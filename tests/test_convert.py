"""HF boundary: export loads in transformers, round trips are exact, bad input is refused."""

import json
import os

import jax
import numpy as np
import pytest

import medjax
from medjax import cli
from medjax.checkpoints import hf_export, hf_import, modeldir
from medjax.model import params as params_lib
from medjax.errors import CheckpointError, ConfigError
from hf_fixtures import hf_logits, make_hf_llama, TINYSTORIES


@pytest.fixture
def hf_dir(tmp_path):
  d = tmp_path / "hf"
  make_hf_llama(d, heads=4, kv_heads=2)
  return d


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 0.05)])
def test_export_loads_in_transformers(tmp_path, hf_dir, dtype, tol):
  transformers = pytest.importorskip("transformers")
  import torch
  ck, out = tmp_path / "ck", tmp_path / "out"
  hf_import.import_hf(str(hf_dir), str(ck))
  # Small shards force the sharded layout with an index, as HF writes for big models.
  hf_export.export_hf(str(ck), str(out), dtype=dtype, max_shard_bytes=20_000)
  assert (out / "model.safetensors.index.json").exists()
  m = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
  tokens = np.random.default_rng(0).integers(0, 97, (2, 9))
  want = np.asarray(medjax.load(str(ck))(tokens))
  assert np.abs(hf_logits(m, tokens) - want).max() <= tol


def test_import_export_import_is_bit_identical(tmp_path, hf_dir):
  cfg, p1 = hf_import.import_hf(str(hf_dir), str(tmp_path / "a"), scan_layers=False)
  hf_export.export_hf(str(tmp_path / "a"), str(tmp_path / "b"))
  _, p2 = hf_import.import_hf(str(tmp_path / "b"), scan_layers=False)
  f1, f2 = params_lib.flatten(p1), params_lib.flatten(p2)
  assert sorted(f1) == sorted(f2)
  for k in f1:
    assert np.array_equal(np.asarray(f1[k]), np.asarray(f2[k])), k
  # The orbax checkpoint restores exactly what was imported, in either layout.
  p3 = modeldir.restore_params(str(tmp_path / "a"), cfg.replace(scan_layers=True))
  f3 = params_lib.flatten(params_lib.unstack_layers(p3))
  for k in f1:
    assert np.array_equal(np.asarray(f1[k]), np.asarray(f3[k])), k


def test_export_tokenizer_loads_with_autotokenizer(tmp_path):
  d = TINYSTORIES
  transformers = pytest.importorskip("transformers")
  hf_import.import_hf(str(d), str(tmp_path / "ck"))
  hf_export.export_hf(str(tmp_path / "ck"), str(tmp_path / "out"))
  tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
  ids = tok("Once upon a time")["input_ids"]
  assert ids == [1, 403, 407, 261, 378]
  cfg = json.loads((tmp_path / "out" / "config.json").read_text())
  assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["vocab_size"] == 512


def test_cli_import_export(tmp_path, hf_dir, capsys):
  assert cli.main(["import-hf", str(hf_dir), str(tmp_path / "ck")]) == 0
  assert cli.main(["export-hf", str(tmp_path / "ck"), str(tmp_path / "out")]) == 0
  assert (tmp_path / "out" / "model.safetensors").exists()
  # A second export into the now non-empty dir is refused without --overwrite.
  assert cli.main(["export-hf", str(tmp_path / "ck"), str(tmp_path / "out")]) == 1
  assert "not empty" in capsys.readouterr().err
  assert cli.main(["export-hf", str(tmp_path / "ck"), str(tmp_path / "out"), "--overwrite"]) == 0


def _edit_config(d, **kw):
  p = d / "config.json"
  c = json.loads(p.read_text())
  c.update(kw)
  p.write_text(json.dumps(c))


@pytest.mark.parametrize("edit,needle", [
    (dict(model_type="mistral"), "model_type"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling"),
    (dict(auto_map={"AutoModelForCausalLM": "x.Y"}), "auto_map"),
    (dict(hidden_act="gelu"), "hidden_act"),
])
def test_refuses_unsupported_configs(hf_dir, edit, needle):
  _edit_config(hf_dir, **edit)
  with pytest.raises(ConfigError, match=needle) as e:
    hf_import.import_hf(str(hf_dir))
  assert "config.json" in str(e.value)


def test_refuses_dir_without_config(tmp_path):
  with pytest.raises(ConfigError, match="no config.json"):
    hf_import.import_hf(str(tmp_path))


def test_refuses_pickles(hf_dir):
  os.remove(hf_dir / "model.safetensors")
  (hf_dir / "pytorch_model.bin").write_bytes(b"not loaded")
  with pytest.raises(CheckpointError, match="pickle") as e:
    hf_import.import_hf(str(hf_dir))
  assert "pytorch_model.bin" in str(e.value) and "safetensors" in str(e.value)


def _rewrite_safetensors(path, fn):
  from safetensors.numpy import load_file, save_file
  t = load_file(str(path))
  fn(t)
  save_file(t, str(path))


def test_refuses_missing_tensor(hf_dir):
  _rewrite_safetensors(hf_dir / "model.safetensors",
                       lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(CheckpointError, match=r"missing tensor.*layers\.1\.mlp\.up_proj"):
    hf_import.import_hf(str(hf_dir))


def test_refuses_misshapen_tensor(hf_dir):
  def cut(t):
    t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:8]
  _rewrite_safetensors(hf_dir / "model.safetensors", cut)
  with pytest.raises(CheckpointError, match=r"model.safetensors.*k_proj.*shape \(8, 32\)"):
    hf_import.import_hf(str(hf_dir))


def test_refuses_truncated_safetensors(hf_dir):
  p = hf_dir / "model.safetensors"
  data = p.read_bytes()
  p.write_bytes(data[: len(data) // 2])
  with pytest.raises(CheckpointError, match="model.safetensors"):
    hf_import.import_hf(str(hf_dir))


def test_restore_refuses_shape_mismatch(tmp_path, hf_dir):
  cfg, _ = hf_import.import_hf(str(hf_dir), str(tmp_path / "ck"))
  with pytest.raises(CheckpointError, match="shape"):
    modeldir.restore_params(str(tmp_path / "ck"), cfg.replace(intermediate_size=64))


def test_lora_merge_export_equals_adapted_model(tmp_path, hf_dir):
  transformers = pytest.importorskip("transformers")
  import torch
  from medjax.model import lora
  from medjax.model import llama as model
  cfg, params = hf_import.import_hf(str(hf_dir), scan_layers=True)
  lcfg = cfg.replace(lora_rank=2, lora_targets=("q", "v", "o", "down"))
  lp = lora.add_adapters(params, lcfg, jax.random.PRNGKey(0))
  # Make B non-zero so the adapters change the output.
  lp = jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.05 if "lora_b" in jax.tree_util.keystr(path) else x, lp)
  modeldir.save(str(tmp_path / "ck"), lcfg, lp)
  hf_export.export_hf(str(tmp_path / "ck"), str(tmp_path / "out"))
  m = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"),
                                                        dtype=torch.float32).eval()
  tokens = np.random.default_rng(0).integers(0, 97, (1, 7))
  want = np.asarray(model.forward(lcfg, lp, tokens))
  base = np.asarray(model.forward(cfg, params, tokens))
  assert np.abs(want - base).max() > 1e-3  # the adapters matter
  assert np.abs(hf_logits(m, tokens) - want).max() <= 1e-4
