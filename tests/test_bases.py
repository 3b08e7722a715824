"""Qwen2.5 and Llama 3.x bases: logits equal transformers', exact round trips through
`import-hf`/`export-hf`, refusals of what medjax does not implement, preset sizes."""

import json

import jax
import numpy as np
import pytest

import medjax
from medjax import cli
from medjax.assets import asset_path
from medjax.checkpoints import hf_config, hf_export, hf_import, modeldir
from medjax.data import corpus
from medjax.data.tokenizer import load_tokenizer
from medjax.model import config
from medjax.model import llama as model
from medjax.model import params as params_lib
from hf_fixtures import hf_logits, make_bpe_tokenizer, make_hf_llama

# Llama 3.1 RoPE scaling at a scale where the tiny head (8 or 16 dims, theta 5e5) has
# frequencies in all three bands: kept (wavelength < 64), blended (64..256), divided by 8.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
# initializer_range 0.1 (HF's is 0.02): logits large enough that a wrong bias or frequency
# moves them far beyond the 1e-4 tolerance.
CASES = {
    "qwen2": dict(family="qwen2", rope_theta=1e6),
    "qwen2_tied_head_dim": dict(family="qwen2", tie=True, head_dim=16),
    "llama3": dict(rope_theta=5e5, rope_scaling=LLAMA3_ROPE, head_dim=16,
                   max_position_embeddings=1024),
    "llama_biases": dict(attention_bias=True, mlp_bias=True, tie=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
  hf = make_hf_llama(tmp_path, initializer_range=0.1, **CASES[case])
  tokens = np.random.default_rng(0).integers(0, 97, (2, 64 if "llama3" in case else 11))
  m = medjax.load(str(tmp_path))
  assert m.cfg.model_type == CASES[case].get("family", "llama")
  got = np.asarray(m(tokens))
  diff = np.abs(got - hf_logits(hf, tokens)).max()
  assert diff <= 1e-4, diff
  if case == "llama3":  # the same weights without the scaling are far off: it is applied
    plain = jax.jit(model.forward, static_argnums=0)(m.cfg.replace(rope_type="default"),
                                                     m.params, tokens)
    assert np.abs(np.asarray(plain) - got).max() > 100 * 1e-4


@pytest.mark.parametrize("family", ["qwen2", "llama3"])
def test_import_export_round_trip(tmp_path, family):
  """CLI import (streaming) -> export: transformers loads the same class with the same
  logits and AutoTokenizer encodes as medjax; import -> export -> import is bit-identical."""
  transformers = pytest.importorskip("transformers")
  import torch
  hf_dir, ck, out = tmp_path / "hf", tmp_path / "ck", tmp_path / "out"
  case = CASES["qwen2" if family == "qwen2" else "llama3"]
  hf = make_hf_llama(hf_dir, vocab=620, initializer_range=0.1, **case)
  make_bpe_tokenizer(hf_dir, style=family)
  assert cli.main(["import-hf", str(hf_dir), str(ck), "--no-scan"]) == 0
  assert cli.main(["export-hf", str(ck), str(out)]) == 0
  got = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
  assert type(got) is type(hf)
  tok = load_tokenizer(modeldir.tokenizer_path(str(ck)))
  text = "患者男性，45岁，发热3天，伴咳嗽。血压 160/100 mmHg。"
  ids = np.array([tok.encode(text)])
  assert (ids[0, 0] == tok.bos_id) == (family == "llama3")
  want = np.asarray(medjax.load(str(ck))(ids))
  assert np.abs(hf_logits(got, ids) - want).max() <= 1e-4
  assert np.abs(hf_logits(hf, ids) - want).max() <= 1e-4
  # The tokenizer files go out as they came in, and transformers reads them as medjax does.
  for name in ("tokenizer.json", "tokenizer_config.json"):
    assert (out / name).read_bytes() == (hf_dir / name).read_bytes()
  assert transformers.AutoTokenizer.from_pretrained(str(out))(text)["input_ids"] == ids[0].tolist()
  cfg = modeldir.load_config(str(ck))
  p1 = modeldir.restore_params(str(ck), cfg)
  _, p2 = hf_import.import_hf(str(out), scan_layers=False)
  f1, f2 = params_lib.flatten(p1), params_lib.flatten(p2)
  assert sorted(f1) == sorted(f2)
  assert any(k.endswith("/b") for k in f1) == (family == "qwen2")
  for k in f1:
    assert np.array_equal(np.asarray(f1[k]), np.asarray(f2[k])), k
  assert hf_config.load_hf_config(str(out)) == cfg


def _qwen_dir(d, **edit):
  """A qwen2 config.json (and nothing else): refusals happen before weights are read."""
  c = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 620,
       "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
       "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
       "rope_theta": 1e6, "use_sliding_window": False, "sliding_window": None,
       "tie_word_embeddings": False}
  c.update(edit)
  d.mkdir(parents=True, exist_ok=True)
  (d / "config.json").write_text(json.dumps(c))
  return d


@pytest.mark.parametrize("edit,needle", [
    (dict(model_type="mistral"), "model_type='mistral' is not supported"),
    (dict(use_sliding_window=True, sliding_window=64), "use_sliding_window=true"),
    (dict(layer_types=["full_attention", "sliding_attention"]), "layer_types"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling type 'yarn'"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "lacks low_freq_factor"),
    (dict(attention_dropout=0.1), "attention_dropout=0.1"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
    (dict(quantization_config={"quant_method": "gptq"}), "quantization_config"),
])
def test_import_refuses_unsupported_fields(tmp_path, capsys, edit, needle):
  hf_dir = _qwen_dir(tmp_path / "hf", **edit)
  assert cli.main(["import-hf", str(hf_dir), str(tmp_path / "out")]) == 1
  err = capsys.readouterr().err.strip()
  assert needle in err and str(hf_dir / "config.json") in err and "\n" not in err, err
  assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_import_refuses_bad_tokenizer_json(tmp_path, capsys):
  hf_dir = _qwen_dir(tmp_path / "hf", vocab_size=64)
  tok = make_bpe_tokenizer(hf_dir, style="qwen2")
  assert cli.main(["import-hf", str(hf_dir), str(tmp_path / "out")]) == 1
  err = capsys.readouterr().err.strip()
  assert f"{tok}: vocabulary of 603 tokens does not fit config.json vocab_size=64" in err, err
  spec = json.loads(open(tok).read())
  spec["model"] = {"type": "WordPiece", "vocab": {"[UNK]": 0}, "unk_token": "[UNK]"}
  open(tok, "w").write(json.dumps(spec))
  assert cli.main(["import-hf", str(hf_dir), str(tmp_path / "out")]) == 1
  err = capsys.readouterr().err.strip()
  assert f"{tok}: model.type='WordPiece' is not supported" in err and "\n" not in err, err
  assert not (tmp_path / "out").exists()


def test_export_refuses_config_without_hf_form(tmp_path):
  cfg = config.preset("tiny-mha", model_type="qwen2", qkv_bias=True, o_bias=True)
  (tmp_path / "ck" / "params").mkdir(parents=True)  # refused before any weight is read
  (tmp_path / "ck" / "model_config.json").write_text(config.to_json(cfg))
  with pytest.raises(medjax.CheckpointError, match="o_bias=True"):
    hf_export.export_hf(str(tmp_path / "ck"), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


# Parameter counts of the released checkpoints (sum of their safetensors shapes).
RELEASED = {"qwen2.5-7b": 7_615_616_512, "qwen2.5-0.5b": 494_032_768,
            "llama3.1-8b": 8_030_261_248, "llama3.2-1b": 1_235_814_400}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_preset_sizes(name):
  """num_params, the Flax params and transformers' model of the exported config agree with
  the released checkpoint's parameter count."""
  transformers = pytest.importorskip("transformers")
  import torch
  cfg = config.preset(name, scan_layers=True)
  shapes = jax.eval_shape(lambda: model.init_params(cfg, jax.random.PRNGKey(0)))
  assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes)) == cfg.num_params()
  d = hf_config.to_hf_dict(cfg)
  hcfg = transformers.AutoConfig.for_model(**{k: v for k, v in d.items() if k != "torch_dtype"})
  with torch.device("meta"):
    hf = transformers.AutoModelForCausalLM.from_config(hcfg)
  assert type(hf).__name__ == d["architectures"][0]
  n_hf = sum(p.numel() for p in hf.parameters())  # a tied head is counted once
  assert cfg.num_params() == n_hf == RELEASED[name]
  assert hf_config.from_hf_dict(d, scan_layers=True) == cfg


def test_demo_base_steps_on_a_qwen_base(tmp_path):
  """`medjax demo --base` on a byte-level BPE base: imported, no vocabulary extension (the
  base and its tokenizer.json go on as they are), exported back to a Qwen2 that transformers
  and AutoTokenizer read as medjax does. (The training and evaluation steps share their code
  with the Llama 2 demo; their no-BOS parts are tested in test_hf_tokenizer.py.)"""
  pytest.importorskip("transformers")
  from medjax.demo import pipeline
  hf_dir = tmp_path / "hf"
  make_hf_llama(hf_dir, vocab=620, initializer_range=0.1, **CASES["qwen2"])
  make_bpe_tokenizer(hf_dir, style="qwen2")
  base = str(tmp_path / "base")
  r1 = pipeline._import_base(str(hf_dir), base, shipped=False)
  texts = corpus.read_texts([asset_path("medical_text_sample.csv")])[400:420]
  r2 = pipeline._extend_vocab(str(tmp_path), base, texts, texts, add_n=50)
  assert r2["added"] == 0 and r2["model_dir"] == base and r2["tokenizer"].endswith(".json")
  assert not (tmp_path / "tokenizer").exists()
  r6 = pipeline._export(r1["model_dir"], str(tmp_path / "out"), r2["tokenizer"], texts)
  assert r6["max_logit_diff"] <= 1e-4 and r6["tokenizer_agreement"] == 1.0


@pytest.mark.parametrize("base", ["qwen2.5_7b", "llama3.1_8b"])
def test_recipe_configs(base):
  """configs/{qwen2.5_7b,llama3.1_8b}_{cpt,sft}.py: the paper's recipe on the new base."""
  import pathlib
  from medjax.training import config as runconfig
  from medjax.training import recipes
  root = pathlib.Path(__file__).resolve().parents[1] / "configs"
  preset = base.replace("_", "-")
  cpt = runconfig.load(f"{root}/{base}_cpt.py:/gcs/b/medjax")
  sft = runconfig.load(f"{root}/{base}_sft.py:/gcs/b/medjax")
  for c in (cpt, sft):
    runconfig.validate(c, paths=False)  # the bucket's paths exist only on the TPU VM
    assert c.model == preset and preset in config.PRESETS and preset in recipes.BASES
  assert (cpt.task, cpt.init_from) == ("cpt", f"/gcs/b/medjax/{preset}")
  assert (sft.task, sft.init_from) == ("sft", f"/gcs/b/medjax/runs/{preset}-cpt")
  # Only the base differs from the paper's Llama 2 recipe (and so the tokenized data).
  ref = recipes.paper_cpt("7b", "/gcs/b/medjax").to_dict()
  diff = {k for k, v in cpt.to_dict().items() if ref[k] != v}
  assert diff == {"model", "init_from", "data"}, diff
  tok = recipes.TOKENIZER_OF[preset]
  assert (cpt.data.train, cpt.data.replay) == (f"tfds:/gcs/b/medjax/data/built/{tok}",
                                               f"tfds:/gcs/b/medjax/data/built_general/{tok}")
  assert {k for k, v in cpt.data.to_dict().items() if ref["data"][k] != v} == {"train", "replay"}


def test_biases_get_no_weight_decay():
  import types
  import jax.numpy as jnp
  from medjax.training import optim
  cfg = config.preset("tiny-mha", model_type="qwen2", qkv_bias=True, scan_layers=True)
  shapes = jax.eval_shape(lambda: model.init_params(cfg, jax.random.PRNGKey(0)))
  params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), shapes)
  oc = types.SimpleNamespace(lr=0.1, warmup_steps=0, total_steps=10, final_lr_ratio=1.0, b1=0.9,
                             b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0)
  opt, _ = optim.make_optimizer(oc, cfg, shapes)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates = params_lib.flatten(jax.jit(lambda p: opt.update(zero, opt.init(p), p)[0])(params))
  assert float(jnp.abs(updates["layers/attn/q/b"]).max()) == 0.0  # [L, N, H]: no decay
  assert float(jnp.abs(updates["layers/attn/q/w"]).min()) > 0.0  # matrices decay
