"""Where a model's weights come from: a model dir, a training workdir (its newest good
checkpoint, a LoRA run's adapters put back on their base), an HF dir, or a random preset.

`build_model` is what a run's `init_from` means; `restore` and `resolve_checkpoint` serve
eval, export and `medjax.load`.
"""

from __future__ import annotations

import json
import os

import jax

from medjax.assets import resolve
from medjax.checkpoints import hf_import, modeldir, workdir
from medjax.errors import CheckpointError, ConfigError
from medjax.model import config, llama, lora
from medjax.model import params as params_lib
from medjax.model.config import LlamaConfig


def resolve_checkpoint(path: str) -> str:
  """A model dir, or the newest checkpoint's model dir inside a training workdir."""
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: no such checkpoint")
  if modeldir.is_model_dir(path):
    return path
  found = workdir.latest_model_dir(path)
  if found is None:
    raise CheckpointError(f"{path}: neither a medjax checkpoint (model_config.json + params/) "
                          "nor a training workdir with checkpoints")
  return found


def restore(src: str, cfg: LlamaConfig, shardings=None) -> dict:
  """Params of a model dir or of a workdir's newest good checkpoint, in `cfg`'s layout."""
  if modeldir.is_model_dir(src):
    return modeldir.restore_params(src, cfg, shardings)
  return workdir.restore_workdir_params(src, cfg, shardings, lora_base=_with_lora_base)


def build_model(init_from: str, preset: str, overrides: dict, seed: int, place=None
                ) -> tuple[LlamaConfig, dict | None, str | None]:
  """The model a run starts from: (config, params or None for random init, tokenizer path).

  Args:
    init_from: an HF dir, an `import-hf` dir, a training workdir, `asset:NAME`, or "" for
      a random `preset`.
    preset: the `model.config.PRESETS` name used when init_from is "".
    overrides: LlamaConfig fields (dtype, scan_layers, remat, attention, lora_rank, ...;
      lora_targets may be a comma-separated string).
    seed: draws fresh LoRA adapters.
    place: place(cfg) -> param NamedShardings in cfg's layout: weights are read straight
      onto the mesh, each process loading only the slices its devices own.
  """
  over = dict(overrides)
  if isinstance(over.get("lora_targets"), str):
    over["lora_targets"] = tuple(t.strip() for t in over["lora_targets"].split(",") if t.strip())
  place = place or (lambda cfg: None)
  src = resolve(init_from) if init_from else ""
  if not src:
    return config.preset(preset, **over), None, None
  if src.startswith("gs://"):
    raise ConfigError(f"init_from {src}: gs:// paths are not opened directly; mount the bucket "
                      "with gcsfuse and pass /gcs/BUCKET/... (scripts/tpu_install.sh does)")
  if not os.path.exists(src):
    raise ConfigError(f"init_from={init_from!r}: {src} does not exist")
  if modeldir.is_hf_dir(src):
    cfg, params = hf_import.import_hf(src, scan_layers=over.get("scan_layers", True),
                                      shardings_fn=place)
  else:
    src = resolve_checkpoint(src)
    cfg = modeldir.load_config(src)
    rcfg = cfg.replace(scan_layers=over.get("scan_layers", cfg.scan_layers),
                       lora_rank=0) if not cfg.lora_rank else cfg
    params = restore(src, rcfg, place(rcfg))
    if cfg.lora_rank:  # SFT on top of a LoRA run: start from its merged weights
      params, cfg = lora.merge(params, cfg.replace(
          scan_layers=over.get("scan_layers", cfg.scan_layers)))
  tok = modeldir.tokenizer_path(src)
  keep = {k: v for k, v in over.items() if k not in ("lora_rank",)}
  cfg = cfg.replace(**keep, lora_rank=0)
  params = params_lib.to_layout(params, cfg)
  lora_rank = over.get("lora_rank", 0)
  if lora_rank:
    cfg = cfg.replace(lora_rank=lora_rank)
    params = lora.add_adapters(params, cfg, jax.random.PRNGKey(seed))
  return cfg, params, tok


def lora_base_stream(run_dir: str, cfg: LlamaConfig):
  """The frozen base of a LoRA workdir as a per-layer tensor stream (`stream.ParamStream`
  of a model dir or of a workdir's newest readable checkpoint, `stream.HFParams` of an HF
  dir), for export without restoring the model; None where the base must be rebuilt whole
  (random init, a LoRA run's workdir), as `_with_lora_base` does. The base's shapes must be
  the run's."""
  from medjax.checkpoints import hf_config, stream
  c = _run_config(run_dir)
  src = resolve(c["init_from"]) if c.get("init_from") else ""
  if not src or not os.path.isdir(src):
    return None
  if modeldir.is_hf_dir(src):
    bcfg = hf_config.load_hf_config(src)
    base = stream.HFParams(bcfg, src)
  else:  # a model dir, or a workdir's newest readable checkpoint (as training restored it)
    if not (modeldir.is_model_dir(src) or workdir.latest_model_dir(src)):
      return None
    bcfg = modeldir.load_config(src)
    base = next((s for s in stream.candidates(src) if isinstance(s, stream.ParamStream)), None)
    if base is None or bcfg.lora_rank:  # LoRA on LoRA: merged whole, as training did
      return None
  # Every tensor's shape is checked again as it is written (`safetensors_io.write_file`).
  want = cfg.replace(lora_rank=0).num_params()
  if bcfg.num_params() != want or bcfg.vocab_size != cfg.vocab_size:
    raise CheckpointError(f"{run_dir}: the LoRA run's base {src} is not the model it "
                          f"trained ({bcfg.num_params():,} vs {want:,} params)")
  return base


def _run_config(run_dir: str) -> dict:
  path = os.path.join(run_dir, "run_config.json")
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{path}: cannot read the LoRA run's config, needed to rebuild its "
                          f"base weights ({e})") from None


def _with_lora_base(run_dir: str, adapters: dict, shardings=None) -> dict:
  """A LoRA run's checkpoint holds only adapters: rebuild its base as training did (from
  the run's saved config and `init_from`) and put the trained adapters on it. With the
  model's `shardings` the base is read straight onto them (a pod's eval never holds it on
  one device)."""
  c = _run_config(run_dir)

  def place(bcfg):  # the model's shardings less the adapters', when they are the base's tree
    if shardings is None:
      return None
    flat = {k: v for k, v in params_lib.flatten(shardings).items() if not lora.is_lora_path(k)}
    want = params_lib.flatten(jax.eval_shape(lambda: llama.init_params(
        bcfg.replace(lora_rank=0), jax.random.PRNGKey(0))))
    return params_lib.unflatten(flat) if flat.keys() == want.keys() else None

  try:
    cfg, params, _ = build_model(c.get("init_from", ""), c.get("model", "tiny"),
                                 c.get("model_overrides", {}), c.get("seed", 0), place)
    if params is None:  # random init: the same draw as the run's (seed-determined)
      params = llama.init_params(cfg, jax.random.PRNGKey(c.get("seed", 0)))
  except Exception as e:
    raise CheckpointError(f"{run_dir}: LoRA checkpoints hold only adapters; the base "
                          f"init_from={c.get('init_from')!r} could not be loaded ({e})") from None
  return params_lib.unflatten({**params_lib.flatten(params), **params_lib.flatten(adapters)})


