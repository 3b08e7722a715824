"""The training loop of `medjax train`: continued pretraining (task=cpt) and CMExam SFT (sft).

One linear `main(config, workdir)` in sections: mesh, model, data, state, step, checkpoint,
loop. Rerunning the same command resumes from the newest good checkpoint in the workdir.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os

import jax
import numpy as np

from medjax import inputs
from medjax.assets import resolve
from medjax.checkpoints import manager as ckpt_lib
from medjax.checkpoints import sources
from medjax.data import from_config
from medjax.data.tokenizer import copy_tokenizer, load_tokenizer
from medjax.errors import CheckpointError, ConfigError, DataError
from medjax.model import config as config_lib
from medjax.model import llama as model_lib
from medjax.model import params as params_lib
from medjax.parallel import agreement, distributed, sharding
from medjax.parallel.placement import Placement
from medjax.training import config as runconfig
from medjax.training import evals as evals_lib
from medjax.training import metrics as metrics_lib
from medjax.training import optim
from medjax.training import state as state_lib
from medjax.training import step as ts


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def main(c, workdir: str) -> dict:
  """Runs (or resumes) a training job; returns the last logged metrics."""
  runconfig.validate(c)  # every field, before anything is built or written
  problem = inputs.path_problem(workdir, inputs.WORKDIR)
  if problem:
    raise ConfigError(f"--workdir {workdir}: {problem}")
  distributed.initialize()
  # Every process must run the same job: refuse (on all of them) before anything is written.
  agreement.check_same({"config": c.to_dict(), "workdir": os.path.abspath(workdir)})

  # ---------------------------------------------------------------- mesh
  mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
  rules = runconfig.rules(c)
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  if c.batch_size % (dp * c.accum_steps) or c.batch_size % jax.process_count():
    raise ConfigError(f"batch_size={c.batch_size} must be divisible by data*fsdp={dp} times "
                      f"accum_steps={c.accum_steps}, and by the {jax.process_count()} processes")

  # ---------------------------------------------------------------- model
  # Weights stream onto the mesh as they are read (import-hf dir, HF dir or workdir).
  cfg, init_params, tok_path = sources.build_model(
      c.init_from, c.model, c.model_overrides.to_dict(), c.seed,
      place=lambda cfg: params_lib.param_shardings(cfg, mesh, rules))
  tok_path = resolve(c.data.tokenizer) if c.data.tokenizer else tok_path
  if not tok_path:
    raise ConfigError("data.tokenizer: no tokenizer given and the init checkpoint has none")
  tokenizer = load_tokenizer(tok_path)
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
  # Each process reads its devices' rows of every global batch. The data position saved in
  # checkpoints is global, so a run resumes on another process count or mesh.
  batch_sharding = sharding.batch_sharding(mesh, rules)
  rows = distributed.process_slice(c.batch_size, batch_sharding)
  train_it, val_source = from_config.make_data(c, tokenizer, _log, rows)
  evals_lib.check(c)

  # ---------------------------------------------------------------- state
  frozen = tuple(x.strip() for x in c.frozen.split(",") if x.strip())
  pshape = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.PRNGKey(0)))
  optimizer, schedule = optim.make_optimizer(runconfig.optim(c), cfg, pshape, frozen)
  st_shard = sharding.tree_shardings(mesh, state_lib.state_axes(cfg, optimizer, c.seed), rules)
  if init_params is None:
    make = lambda: state_lib.init_state(model_lib.init_params(cfg, jax.random.PRNGKey(c.seed)),
                                 optimizer, c.seed)
    state_fn = jax.jit(make, out_shardings=st_shard)
    init_args = ()
  else:
    state_fn = jax.jit(lambda p: state_lib.init_state(p, optimizer, c.seed),
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
  save_run_files(c, cfg, tok_path, workdir)
  if restored is not None:
    start, state, data_state = restored
    if saved.partial:  # the base comes from init_from, as at the start of the run
      state = saved.complete(state, state_fn(*init_args))
    if data_state:
      train_it.set_state(data_state)  # a global batch position: any process count
    _log(f"resumed from {ckpt.directory}/{start}")
  else:
    state = state_fn(*init_args)
    start = 0
  metrics_lib.trim_metrics(workdir, start)  # drop what a crash logged after the checkpoint
  del init_params, init_args

  # ---------------------------------------------------------------- step
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
      for i, b in enumerate(from_config.val_batches(c, val_source, tokenizer, rows)):
        if i >= c.eval_batches:
          break
        with sharding.activate(mesh, rules):
          l, n = jax.device_get(evaluate(params, distributed.global_batch(b, mesh,
                                                                           batch_sharding)))
        tot, cnt = tot + float(l), cnt + float(n)
      if cnt:
        out["val_loss"] = tot / cnt
        out["val_ppl"] = float(np.exp(out["val_loss"]))
    out.update(evals_lib.extra_evals(c, cfg, params, tokenizer, Placement(mesh, rules)))
    return out

  # ---------------------------------------------------------------- loop
  logger = metrics_lib.Logger(workdir, cfg, c, total=c.total_steps, start=start)
  pending, last = [], {}
  skipped_at_start = int(jax.device_get(state["skipped"]))
  try:
    # A SIGTERM to any process stops all of them at one agreed step, checkpointed there.
    with agreement.Preemption() as preempt:
      step = start
      while step < c.total_steps:
        try:
          local = next(train_it)
        except StopIteration:
          _log("data exhausted")
          break
        batch = distributed.global_batch(local, mesh, batch_sharding)  # the one copy in
        # No other host<->device copy in the step: an implicit one (a numpy array slipping
        # into the jitted call, a value fetched from it) would be a silent slowdown.
        with _host_transfers_disallowed():
          state, m = train(state, batch)
        step += 1
        stop = preempt.reached(step)
        pending.append(m)  # fetched every log_every steps, so the host never waits per step
        if step % c.log_every == 0 or step == c.total_steps or stop:
          fetched = jax.device_get(pending)
          pending = []
          if c.nan_policy == "stop" and not all(bool(f["finite"]) for f in fetched):
            _stop_nonfinite(step, ckpt)
          # Realized mixture fractions: a collective, so only at steps every process logs.
          mix = (metrics_lib.mixture_fractions(train_it)
                 if step % c.log_every == 0 or step == c.total_steps else {})
          last = logger.log(step, fetched, skipped=int(jax.device_get(state["skipped"])),
                            extra=mix)
        evals = {}
        if c.eval_every and (step % c.eval_every == 0 or step == c.total_steps):
          evals = run_eval(state["params"])
          logger.log_eval(step, evals)
          last.update(evals)
          logger.reset_clock()  # tokens/s and MFU measure training, not evaluation
        if step % c.checkpoint_every == 0 or step == c.total_steps or stop:
          # nan_policy=stop: never checkpoint past a skipped step, even between log steps.
          if c.nan_policy == "stop" and int(jax.device_get(state["skipped"])) > skipped_at_start:
            _stop_nonfinite(step, ckpt)
          ckpt.save(step, saved.select(state), train_it.get_state(),
                    {"step": step, **_floats(last), **evals})
        if stop:
          ckpt.wait()
          if preempt.multi:  # each host's log says where it stopped: all at the same step
            print(f"process {jax.process_index()}: SIGTERM: checkpoint at step {step} written "
                  "(every process stopped there); exiting", flush=True)
          else:
            _log(f"SIGTERM: checkpoint at step {step} written; exiting")
          break
    ckpt.close()  # waits for the last save: a failed write is raised here
  except BaseException:  # no save left running, no tmp dir left behind, a clean error
    ckpt.abort()
    logger.close()
    raise
  logger.close()
  return last


@contextlib.contextmanager
def _host_transfers_disallowed():
  """jax's transfer guard for host<->device copies (device-to-device ones, e.g. a batch
  resharded onto the mesh inside jit, are allowed)."""
  with jax.transfer_guard_host_to_device("disallow"), \
       jax.transfer_guard_device_to_host("disallow"):
    yield


def _stop_nonfinite(step: int, ckpt) -> None:
  ckpt.wait()
  good = ckpt.all_steps()
  where = f"{ckpt.directory}/{good[-1]}" if good else "none written yet"
  raise DataError(f"non-finite loss or gradient at or before step {step} (nan_policy=stop; "
                  f"it was not applied); last checkpoint: {where}")


def _make_workdir(workdir: str) -> None:
  """Creates the workdir and checks it is writable, with an error naming it (main has
  already refused gs:// and paths that cannot be created)."""
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


def save_run_files(c, cfg: config_lib.LlamaConfig, tokenizer: str, workdir: str) -> None:
  """The resolved config, model config and tokenizer, so the workdir is a loadable model."""
  if jax.process_index() != 0:
    return
  with open(os.path.join(workdir, "run_config.json"), "w") as f:
    json.dump(c.to_dict(), f, indent=1, default=str)
  with open(os.path.join(workdir, "model_config.json"), "w") as f:
    f.write(config_lib.to_json(cfg))
  copy_tokenizer(tokenizer, workdir)
