"""scripts/tpu_*.sh: syntax, dry-run output, and the exact gcloud argv (a fake gcloud on PATH).

No network and no Google Cloud account: the fake gcloud records each call and plays back
queued-resource states, so the spot loop's preemption handling is exercised end to end.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "scripts").glob("*.sh"))
CPT = str(REPO / "configs" / "llama2_7b_cpt.py")

FAKE_GCLOUD = f"""#!{sys.executable}
# Records argv; plays back queued-resource states and training exit statuses.
import json, os, sys
d = os.environ["FAKE_DIR"]
args = sys.argv[1:]
with open(os.path.join(d, "calls.jsonl"), "a") as f:
  f.write(json.dumps(args) + "\\n")
def pop(name):
  p = os.path.join(d, name)
  items = json.load(open(p)) if os.path.exists(p) else []
  if not items:
    sys.exit("fake gcloud: no more " + name)
  json.dump(items[1:], open(p, "w"))
  return items[0]
if args[:4] == ["compute", "tpus", "queued-resources", "describe"]:
  s = pop("states.json")
  if s == "NONE":
    sys.exit("NOT_FOUND")
  print(s)
elif args[:4] == ["compute", "tpus", "tpu-vm", "ssh"] and args[-1].startswith("--command=cat "):
  print(pop("exits.json"))
"""


def _env(tmp_path, **extra):
  bindir = tmp_path / "bin"
  bindir.mkdir(exist_ok=True)
  fake = bindir / "gcloud"
  fake.write_text(FAKE_GCLOUD)
  fake.chmod(0o755)
  env = {k: v for k, v in os.environ.items() if k not in ("PROJECT", "TPU_NAME", "DRY_RUN",
                                                          "MOUNT", "PREFIX", "RUNTIME_VERSION",
                                                          "ACCELERATOR_TYPE", "MEDJAX_SRC")}
  env.update(PATH=f"{bindir}{os.pathsep}{env['PATH']}", FAKE_DIR=str(tmp_path),
             BUCKET="gs://bkt", ZONE="us-east5-a", PROJECT="proj", POLL_SECONDS="0",
             MEDJAX_SRC="medjax @ git+https://example.invalid/medjax.git")
  env.update(extra)
  return env


def _run(tmp_path, script, *args, check=True, **extra):
  r = subprocess.run(["bash", str(REPO / "scripts" / script), *args], env=_env(tmp_path, **extra),
                     capture_output=True, text=True, timeout=60, cwd=tmp_path)
  if check:
    assert r.returncode == 0, r.stderr
  return r


def _calls(tmp_path):
  p = tmp_path / "calls.jsonl"
  return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


def _flag(argv, name):
  return next(a.split("=", 1)[1] for a in argv if a.startswith(name + "="))


def _bash_syntax(code: str):
  r = subprocess.run(["bash", "-n"], input=code, capture_output=True, text=True)
  assert r.returncode == 0, f"{r.stderr}\n{code}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
  r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
  assert r.returncode == 0, r.stderr


def test_dry_run_prints_and_runs_nothing(tmp_path):
  out = _run(tmp_path, "tpu_create.sh", "--dry-run", SPOT="1").stdout
  assert ("gcloud compute tpus tpu-vm create medjax --zone=us-east5-a --project=proj "
          "--accelerator-type=v5p-8 --version=v2-alpha-tpuv5") in out
  assert "--spot" in out
  out = _run(tmp_path, "tpu_install.sh", "--dry-run", MEDJAX_SRC="").stdout
  assert "python3 -m pip wheel" in out and "gs://bkt/medjax/code/medjax-" in out
  assert "tpu-vm ssh medjax --zone=us-east5-a --project=proj --worker=all" in out
  assert "pip install -q -U jax\\[tpu\\] /tmp/medjax-" in out
  out = _run(tmp_path, "tpu_train.sh", "--dry-run", CPT, "llama2-7b-cpt").stdout
  assert "--worker=all" in out
  assert ("medjax train --config $HOME/medjax-configs/llama2_7b_cpt.py:/gcs/bkt/medjax "
          "--workdir /gcs/bkt/medjax/runs/llama2-7b-cpt") in out
  out = _run(tmp_path, "tpu_queued.sh", "--dry-run", CPT, "r1").stdout
  assert "queued-resources create medjax-qr" in out and "--spot" in out
  assert "medjax train --config" in out
  out = _run(tmp_path, "tpu_delete.sh", "--dry-run", "--queued").stdout
  assert "queued-resources delete medjax-qr --zone=us-east5-a --project=proj --force" in out
  out = _run(tmp_path, "tpu_run.sh", "--dry-run", "medjax eval --help").stdout
  assert "--worker=0" in out and "medjax eval --help" in out
  assert _calls(tmp_path) == []  # dry run: gcloud never called


def test_create_and_runtime_by_accelerator(tmp_path):
  for acc, runtime in (("v5p-32", "v2-alpha-tpuv5"), ("v5litepod-8", "v2-alpha-tpuv5-lite"),
                       ("v6e-8", "v2-alpha-tpuv6e"), ("v4-8", "tpu-ubuntu2204-base")):
    _run(tmp_path, "tpu_create.sh", ACCELERATOR_TYPE=acc)
    argv = _calls(tmp_path)[-1]
    assert argv[:5] == ["compute", "tpus", "tpu-vm", "create", "medjax"]
    assert _flag(argv, "--accelerator-type") == acc and _flag(argv, "--version") == runtime
  r = _run(tmp_path, "tpu_create.sh", check=False, ZONE="")
  assert r.returncode != 0 and "ZONE" in r.stderr


def test_install_remote_script(tmp_path):
  _run(tmp_path, "tpu_install.sh")
  (argv,) = _calls(tmp_path)
  assert argv[:5] == ["compute", "tpus", "tpu-vm", "ssh", "medjax"]
  assert _flag(argv, "--worker") == "all"
  remote = _flag(argv, "--command")
  _bash_syntax(remote)
  assert "gcsfuse --implicit-dirs" in remote and "bkt /gcs/bkt" in remote
  pip = shlex.split(next(x for x in remote.splitlines() if "install -q -U jax" in x))
  assert pip[-2:] == ["jax[tpu]", "medjax @ git+https://example.invalid/medjax.git"]


def test_train_launch_command(tmp_path):
  odd = "--config.eval.text=/gcs/bkt/it's here.txt"
  _run(tmp_path, "tpu_train.sh", CPT, "gs://bkt/medjax/runs/cpt", "--config.accum_steps=64", odd,
       LIBTPU_INIT_ARGS="--xla_tpu_foo=1")
  cp, ssh = _calls(tmp_path)
  assert cp == ["storage", "cp", CPT, "gs://bkt/medjax/code/configs/llama2_7b_cpt.py"]
  assert _flag(ssh, "--worker") == "all" and _flag(ssh, "--zone") == "us-east5-a"
  remote = _flag(ssh, "--command")
  _bash_syntax(remote)
  nohup = next(line for line in remote.splitlines() if line.startswith("nohup"))
  tokens = shlex.split(nohup)
  assert tokens[:3] == ["nohup", "bash", "-c"] and tokens[4:] == [
      ">", "$HOME/medjax-logs/cpt.log", "2>&1", "<", "/dev/null", "&"]
  job = tokens[3]
  _bash_syntax(job)
  assert job.startswith("trap 'touch $HOME/medjax-logs/cpt.term' TERM; ")
  train = shlex.split(job.split(";")[1])
  assert train == ["env", "JAX_COMPILATION_CACHE_DIR=/gcs/bkt/medjax/jax_cache",
                   "PYTHONUNBUFFERED=1", "LIBTPU_INIT_ARGS=--xla_tpu_foo=1",
                   "$HOME/medjax-venv/bin/medjax", "train",
                   "--config", "$HOME/medjax-configs/llama2_7b_cpt.py:/gcs/bkt/medjax",
                   "--workdir", "/gcs/bkt/medjax/runs/cpt", "--config.accum_steps=64", odd]
  assert job.endswith("; echo $s > $HOME/medjax-logs/cpt.exit")


def test_train_rejects_bad_arguments(tmp_path):
  r = _run(tmp_path, "tpu_train.sh", CPT, "run", "--steps=3", check=False)
  assert r.returncode == 1 and "--config.FIELD=VALUE" in r.stderr
  r = _run(tmp_path, "tpu_train.sh", CPT, "gs://other/run", check=False)
  assert r.returncode == 1 and "gs://bkt" in r.stderr
  r = _run(tmp_path, "tpu_train.sh", "nope.py", "run", check=False)
  assert r.returncode == 1 and "nope.py" in r.stderr
  assert _calls(tmp_path) == []


def test_queued_loop_relaunches_after_preemption(tmp_path):
  # requested, waits, runs, preempted (VM lost), re-requested, runs, SIGTERM with the VM
  # still up (relaunch on it), finishes.
  states = ["NONE", "WAITING_FOR_RESOURCES", "ACTIVE", "ACTIVE", "SUSPENDED", "NONE",
            "ACTIVE", "ACTIVE", "ACTIVE", "ACTIVE", "ACTIVE"]
  (tmp_path / "states.json").write_text(json.dumps(states))
  (tmp_path / "exits.json").write_text(json.dumps(["", "preempted", "0"]))
  r = _run(tmp_path, "tpu_queued.sh", CPT, "cpt", "--config.accum_steps=64",
           DELETE_WHEN_DONE="1")
  assert "training finished" in r.stderr
  calls = _calls(tmp_path)
  creates = [c for c in calls if c[2:4] == ["queued-resources", "create"]]
  deletes = [c for c in calls if c[2:4] == ["queued-resources", "delete"]]
  trains = [c for c in calls if c[3] == "ssh" and "medjax train" in c[-1]]
  assert len(creates) == 2 and len(trains) == 3
  assert len(deletes) == 2  # after the preemption, and when done
  assert {"--spot", "--node-id=medjax", "--accelerator-type=v5p-8",
          "--runtime-version=v2-alpha-tpuv5"} <= set(creates[0])
  assert all("--force" in d for d in deletes)
  # the relaunch is the same command: the run resumes from its workdir
  assert trains[0] == trains[1] == trains[2]
  assert "--workdir /gcs/bkt/medjax/runs/cpt" in trains[0][-1]


def test_queued_loop_stops_on_failure(tmp_path):
  (tmp_path / "states.json").write_text(json.dumps(["ACTIVE", "ACTIVE", "ACTIVE"]))
  (tmp_path / "exits.json").write_text(json.dumps(["1"]))
  r = _run(tmp_path, "tpu_queued.sh", CPT, "cpt", check=False)
  assert r.returncode == 1 and "exited with status 1" in r.stderr
