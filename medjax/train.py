"""`medjax train`: continued pretraining (task=cpt) and CMExam SFT (task=sft).

One linear `main(config, workdir)` in sections: mesh, model, data, state, step, checkpoint,
loop. Rerunning the same command resumes from the newest good checkpoint in the workdir.
"""

from __future__ import annotations

import functools
import os
import signal

import jax
import numpy as np

from medjax import checkpoint as ckpt_lib
from medjax import config as config_lib
from medjax import distributed, hf, lora, metrics as metrics_lib, modeldir, runconfig
from medjax import model as model_lib
from medjax import sharding
from medjax import train_step as ts
from medjax.errors import CheckpointError, ConfigError, DataError


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


class _Preemption:
  """SIGTERM (TPU preemption, `kill`) sets a flag; the loop checkpoints and exits cleanly."""

  def __init__(self):
    self.requested = False
    self._prev = None

  def __enter__(self):
    try:
      self._prev = signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # not the main thread (e.g. some test runners)
      self._prev = None
    return self

  def _handler(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    if self._prev is not None:
      signal.signal(signal.SIGTERM, self._prev)


def build_model(c, place=None) -> tuple[config_lib.LlamaConfig, dict | None, str | None]:
  """(model config, params or None for random init, tokenizer path) from the run config.

  place(cfg) -> param NamedShardings in cfg's layout: weights are read straight onto the
  mesh, each process loading only the slices its devices own (never the whole model).
  """
  over = runconfig.model_overrides(c)
  place = place or (lambda cfg: None)
  src = runconfig.resolve(c.init_from) if c.init_from else ""
  if not src:
    return config_lib.preset(c.model, **over), None, None
  _no_gs("init_from", src)
  if not os.path.exists(src):
    raise ConfigError(f"init_from={c.init_from!r}: {src} does not exist")
  if os.path.exists(os.path.join(src, "config.json")) and not modeldir.is_model_dir(src):
    cfg, params = hf.import_hf(src, scan_layers=over.get("scan_layers", True),
                               shardings_fn=place)
    tok = os.path.join(src, "tokenizer.model")
  else:
    src = hf.resolve_checkpoint(src)
    cfg = modeldir.load_config(src)
    rcfg = cfg.replace(scan_layers=over.get("scan_layers", cfg.scan_layers),
                       lora_rank=0) if not cfg.lora_rank else cfg
    params = hf.restore(src, rcfg, place(rcfg))
    if cfg.lora_rank:  # SFT on top of a LoRA run: start from its merged weights
      params, cfg = lora.merge(params, cfg.replace(
          scan_layers=over.get("scan_layers", cfg.scan_layers)))
    tok = os.path.join(src, modeldir.TOKENIZER)
  keep = {k: v for k, v in over.items() if k not in ("lora_rank",)}
  cfg = cfg.replace(**keep, lora_rank=0)
  params = modeldir.to_layout(params, cfg)
  lora_rank = over.get("lora_rank", 0)
  if lora_rank:
    cfg = cfg.replace(lora_rank=lora_rank)
    params = lora.add_adapters(params, cfg, jax.random.PRNGKey(c.seed))
  return cfg, params, tok if os.path.exists(tok) else None


def main(c, workdir: str) -> dict:
  """Runs (or resumes) a training job; returns the last logged metrics."""
  runconfig.validate(c)
  _no_gs("--workdir", workdir)
  distributed.initialize()

  # ---------------------------------------------------------------- mesh
  mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
  rules = runconfig.rules(c)
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  if c.batch_size % (dp * c.accum_steps) or c.batch_size % jax.process_count():
    raise ConfigError(f"batch_size={c.batch_size} must be divisible by data*fsdp={dp} times "
                      f"accum_steps={c.accum_steps}, and by the {jax.process_count()} processes")

  # ---------------------------------------------------------------- model
  # Weights stream onto the mesh as they are read (import-hf dir, HF dir or workdir).
  cfg, init_params, tok_path = build_model(
      c, place=lambda cfg: sharding.param_shardings(cfg, mesh, rules))
  tok_path = runconfig.resolve(c.data.tokenizer) if c.data.tokenizer else tok_path
  if not tok_path:
    raise ConfigError("data.tokenizer: no tokenizer given and the init checkpoint has none")
  from medjax.tokenizer import Tokenizer
  tokenizer = Tokenizer(tok_path)
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ConfigError(f"data.tokenizer {tok_path}: vocabulary {tokenizer.vocab_size} is larger "
                      f"than the model's embedding table ({cfg.vocab_size}); resize the "
                      "checkpoint first (`medjax tokenizer resize`)")
  if c.data.seq_len > cfg.max_position_embeddings:
    raise ConfigError(f"data.seq_len={c.data.seq_len} exceeds the model's "
                      f"max_position_embeddings={cfg.max_position_embeddings}")

  _log(f"mesh {dict(mesh.shape)}  devices {jax.device_count()} ({jax.devices()[0].platform})  "
       f"model {cfg.num_params() / 1e6:.2f}M params")

  # ---------------------------------------------------------------- data
  train_it, val_source = runconfig.make_data(c, tokenizer, _log)

  # ---------------------------------------------------------------- state
  frozen = tuple(x.strip() for x in c.frozen.split(",") if x.strip())
  pshape = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.PRNGKey(0)))
  optimizer, schedule = ts.make_optimizer(runconfig.optim(c), cfg, pshape, frozen)
  st_shard = sharding.tree_shardings(mesh, ts.state_axes(cfg, optimizer, c.seed), rules)
  if init_params is None:
    make = lambda: ts.init_state(model_lib.init_params(cfg, jax.random.PRNGKey(c.seed)),
                                 optimizer, c.seed)
    state_fn = jax.jit(make, out_shardings=st_shard)
    init_args = ()
  else:
    state_fn = jax.jit(lambda p: ts.init_state(p, optimizer, c.seed),
                       in_shardings=(st_shard["params"],), out_shardings=st_shard)
    init_args = (jax.device_put(init_params, st_shard["params"]),)
  abstract = jax.eval_shape(state_fn, *init_args)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, st_shard)

  # ---------------------------------------------------------------- checkpoint
  # The workdir is created only now, once the config, model and data have been checked,
  # so bad input leaves nothing behind.
  _make_workdir(workdir)
  ckpt = ckpt_lib.Checkpointer(workdir, keep=c.keep_checkpoints)
  saved = ckpt_lib.SavedState(cfg)  # LoRA: the frozen base is not written (see there)
  # first: a workdir of another model is refused
  restored = ckpt.restore_latest(saved.select(abstract))
  runconfig.save_run_files(c, cfg, tok_path, workdir)
  if restored is not None:
    start, state, data_state = restored
    if saved.partial:  # the base comes from init_from, as at the start of the run
      state = saved.complete(state, state_fn(*init_args))
    if data_state:
      train_it.set_state(data_state)
    _log(f"resumed from {ckpt.directory}/{start}")
  else:
    state = state_fn(*init_args)
    start = 0
  ckpt_lib.trim_metrics(workdir, start)  # drop what a crash logged after the checkpoint
  del init_params, init_args

  # ---------------------------------------------------------------- step
  batch_sharding = sharding.NamedSharding(mesh, sharding.logical_to_spec(("batch", "length"),
                                                                         rules, mesh))
  step_fn = functools.partial(ts.train_step, cfg=cfg, optimizer=optimizer, schedule=schedule,
                              accum_steps=c.accum_steps)
  with sharding.activate(mesh, rules):
    train = jax.jit(step_fn, in_shardings=(st_shard, batch_sharding),
                    out_shardings=(st_shard, None), donate_argnums=0)
    evaluate = jax.jit(functools.partial(ts.eval_step, cfg=cfg),
                       in_shardings=(st_shard["params"], batch_sharding))

  def run_eval(params) -> dict:
    out = {}
    if val_source is not None:
      tot, cnt = 0.0, 0.0
      for i, b in enumerate(runconfig.val_batches(c, val_source, tokenizer)):
        if i >= c.eval_batches:
          break
        with sharding.activate(mesh, rules):
          l, n = evaluate(params, distributed.global_batch(b, mesh, batch_sharding))
        tot, cnt = tot + float(l), cnt + float(n)
      if cnt:
        out["val_loss"] = tot / cnt
        out["val_ppl"] = float(np.exp(out["val_loss"]))
    out.update(runconfig.extra_evals(c, cfg, params, tokenizer))
    return out

  # ---------------------------------------------------------------- loop
  logger = metrics_lib.Logger(workdir, cfg, c, total=c.total_steps, start=start)
  pending, last = [], {}
  skipped_at_start = int(jax.device_get(state["skipped"]))
  try:
    with _Preemption() as preempt:
      step = start
      while step < c.total_steps:
        try:
          local = next(train_it)
        except StopIteration:
          _log("data exhausted")
          break
        state, m = train(state, distributed.global_batch(local, mesh, batch_sharding))
        step += 1
        pending.append(m)  # fetched every log_every steps, so the host never waits per step
        if step % c.log_every == 0 or step == c.total_steps or preempt.requested:
          fetched = jax.device_get(pending)
          pending = []
          if c.nan_policy == "stop" and not all(bool(f["finite"]) for f in fetched):
            _stop_nonfinite(step, ckpt)
          last = logger.log(step, fetched, skipped=int(jax.device_get(state["skipped"])))
        evals = {}
        if c.eval_every and (step % c.eval_every == 0 or step == c.total_steps):
          evals = run_eval(state["params"])
          logger.log_eval(step, evals)
          last.update(evals)
          logger.reset_clock()  # tokens/s and MFU measure training, not evaluation
        if step % c.checkpoint_every == 0 or step == c.total_steps or preempt.requested:
          # nan_policy=stop: never checkpoint past a skipped step, even between log steps.
          if c.nan_policy == "stop" and int(jax.device_get(state["skipped"])) > skipped_at_start:
            _stop_nonfinite(step, ckpt)
          ckpt.save(step, saved.select(state), train_it.get_state(),
                    {"step": step, **_floats(last), **evals})
        if preempt.requested:
          ckpt.wait()
          _log(f"SIGTERM: checkpoint at step {step} written; exiting")
          break
    ckpt.close()  # waits for the last save: a failed write is raised here
  except BaseException:  # no save left running, no tmp dir left behind, a clean error
    ckpt.abort()
    logger.close()
    raise
  logger.close()
  return last


def _stop_nonfinite(step: int, ckpt) -> None:
  ckpt.wait()
  good = ckpt.all_steps()
  where = f"{ckpt.directory}/{good[-1]}" if good else "none written yet"
  raise DataError(f"non-finite loss or gradient at or before step {step} (nan_policy=stop; "
                  f"it was not applied); last checkpoint: {where}")


def _no_gs(name: str, path: str) -> None:
  # Orbax writes gs:// itself, but the data readers, run files and metrics use local file
  # I/O; on TPU VMs the bucket is mounted with gcsfuse instead (scripts/tpu_install.sh).
  if path.startswith("gs://"):
    raise ConfigError(f"{name} {path}: gs:// paths are not opened directly; mount the bucket "
                      "with gcsfuse and pass /gcs/BUCKET/... (scripts/tpu_install.sh does)")


def _make_workdir(workdir: str) -> None:
  """Creates the workdir and checks it is writable, with an error naming it (main has
  already refused gs://)."""
  probe = os.path.join(workdir, f".write_test.{jax.process_index()}")  # hosts share the dir
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise CheckpointError(f"--workdir {workdir}: not writable ({e.strerror or e})") from None


def _floats(d: dict) -> dict:
  return {k: float(v) for k, v in d.items() if isinstance(v, (int, float, np.floating))}


# ------------------------------------------------------------------------------ CLI


def add_args(p):
  p.add_argument("--config", required=True,
                 help="config file with get_config(), e.g. configs/tiny_cpt.py[:arg]")
  p.add_argument("--workdir", required=True,
                 help="run directory (a local path; on TPU VMs the gcsfuse-mounted bucket, "
                      "/gcs/BUCKET/...)")
  g = p.add_argument_group(
      "multi-process", "Cloud TPU VMs (and clusters jax detects, e.g. SLURM) need none of "
      "these: jax finds the other hosts itself. Elsewhere give all three on every host.")
  g.add_argument("--coordinator", default=None, help="host:port of process 0")
  g.add_argument("--num-processes", type=int, default=None)
  g.add_argument("--process-id", type=int, default=None)
  p.epilog = ("Override any config field with --config.FIELD=VALUE, e.g. "
              "--config.total_steps=100 --config.optim.lr=1e-4")
  p.set_defaults(_accepts_rest=True)


def run(args):
  c = runconfig.load(args.config, args.rest)
  explicit = (args.coordinator, args.num_processes, args.process_id)
  if explicit != (None, None, None):
    if None in explicit:
      raise ConfigError("--coordinator, --num-processes and --process-id go together")
    distributed.initialize(*explicit)
  main(c, args.workdir)
