"""Runs one process of a multi-process job in a child, so that the distributed runtime's fatal
errors come out as one line.

jax's distributed runtime stops a process from C++ (a fatal log line, a stack trace, SIGABRT)
when the job cannot form within the init timeout (no coordinator, too few processes), when a
peer stops sending heartbeats (it died or hangs), or when the coordinator goes away. Python
cannot catch that, so the command runs its work in a child process and this parent, which
imports nothing heavy, passes the child's output through, drops the runtime's stack traces,
and turns its fatal error into `medjax CMD: error: ...` with exit status 1. SIGTERM and
SIGINT are passed on to the child (jax's preemption sync catches SIGTERM there); the child
dies with the parent (PR_SET_PDEATHSIG), so a SIGKILL to the parent never leaves a stray
worker in the job.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

WORKER_ENV = "MEDJAX_WORKER"  # set in the child: it does the work instead of supervising

# glog-style lines of the runtime: "F1201 14:31:51.080998   17847 client.h:80] message"
_GLOG = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ ([\w.]+):\d+\] ?(.*)$")
_FRAME = re.compile(r"^\s+@\s+0x")
_FATAL = "Terminating process because the JAX distributed service detected fatal errors"
# Runtime error lines that only retell the fatal error summarised at the end.
_RETOLD = ("coordination_service", "client.h", "preemption_sync_manager")


def is_worker() -> bool:
  return os.environ.get(WORKER_ENV) == "1"


def _die_with_parent():  # runs in the child between fork and exec
  try:
    import ctypes
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):  # not Linux: a killed parent may leave the child
    pass


class _Filter:
  """Passes the child's stderr through, line by line, keeping the runtime's fatal error."""

  def __init__(self, out):
    self.out = out
    self.pending = ""
    self.fatal: list[str] | None = None  # the fatal status and the lines after it
    self.error_line: str | None = None  # the child's own "medjax ...: error: ..." line
    self.retelling = False  # inside a runtime error line's continuation

  def feed(self, text: str) -> None:
    self.pending += text
    *lines, self.pending = self.pending.split("\n")
    for line in lines:
      self._line(line)
    # A progress bar redraws one line with \r and no newline: pass it on as it comes.
    if "\r" in self.pending and self.fatal is None:
      done, _, self.pending = self.pending.rpartition("\r")
      self.out.write(done + "\r")
      self.out.flush()

  def close(self) -> None:
    if self.pending:
      self._line(self.pending)
      self.pending = ""

  def _line(self, line: str) -> None:
    if _FRAME.match(line) or line.startswith("*** ") or line.startswith("[Gloo] "):
      return  # stack traces; gloo's per-rank connection notes
    m = _GLOG.match(line)
    if m and m.group(1) == "F" and _FATAL in m.group(3):
      self.fatal = [m.group(3).split("absl::Status:", 1)[-1].strip()]
      return
    if self.fatal is not None:
      if not m:
        self.fatal.append(line)
      return
    if m:
      # The runtime's error lines retell the fatal error to come, continuation lines too.
      self.retelling = m.group(1) in "EF" and m.group(2).startswith(_RETOLD)
    if self.retelling:
      return
    if line.startswith("medjax ") and ": error: " in line and self.error_line is None:
      self.error_line = line
    self.out.write(line + "\n")
    self.out.flush()


def explain(fatal: list[str], facts: dict) -> str:
  """One line for the runtime's fatal status (`fatal`: its lines).

  Args:
    fatal: the status text after `absl::Status:`, then the lines that followed it.
    facts: coordinator, num_processes, init_timeout, heartbeat_timeout (for the message).
  """
  text = "\n".join(fatal)
  if "heartbeat" in text or "unhealthy" in text:
    after = text.split("heartbeats", 1)[-1]
    tasks = {int(t) for t in re.findall(r"(?:task:|^)(\d+)\s*$", after, re.M)}
    tasks |= {int(t) for t in re.findall(r"[Tt]ask:? ?(\d+) heartbeat timeout", text)}
    tasks = sorted(tasks)
    who = ("process " + ", ".join(map(str, tasks))) if tasks else "a process"
    return (f"another process of the job stopped ({who} sent no heartbeat for "
            f"--heartbeat-timeout {facts.get('heartbeat_timeout')} s: it died or hangs); "
            "stopping this one too. Rerun every process to resume from the last checkpoint")
  if "RegisterTask" in text or ("DEADLINE_EXCEEDED" in text and "connect" in text.lower()):
    return (f"the job did not form within --init-timeout {facts.get('init_timeout')} s: no "
            f"coordinator answered at --coordinator {facts.get('coordinator')}, or fewer than "
            f"--num-processes {facts.get('num_processes')} processes joined it")
  if "leader task" in text or "coordination service" in text.lower():
    return (f"lost the coordinator {facts.get('coordinator') or ''} (process 0 died, or the "
            "network failed); stopping this process. Rerun every process to resume from the "
            "last checkpoint").replace("  ", " ")
  first = " ".join(text.split())[:300]
  return f"the distributed runtime stopped this process: {first}"


def run(argv: list[str], command: str, facts: dict) -> int:
  """Runs `argv` (this same command line) as the worker and waits for it.

  Args:
    argv: the command line to run (sys.orig_argv: the interpreter, then the script or -m).
    command: the subcommand, for the error line (`medjax train: error: ...`).
    facts: what the error line may cite (see `explain`).
  Returns:
    The exit status for this process: the worker's, or 1 after a runtime fatal error.
  """
  child = subprocess.Popen(argv, env={**os.environ, WORKER_ENV: "1"}, stderr=subprocess.PIPE,
                           preexec_fn=_die_with_parent)
  forward = lambda signum, frame: child.send_signal(signum)
  prev = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  filt = _Filter(sys.stderr)
  try:
    while True:
      chunk = os.read(child.stderr.fileno(), 1 << 16)
      if not chunk:
        break
      filt.feed(chunk.decode("utf-8", "replace"))
    filt.close()
    rc = child.wait()
  finally:
    for s, h in prev.items():
      signal.signal(s, h)
  if filt.fatal is not None:
    if filt.error_line is None:  # else the worker already said what went wrong first
      print(f"medjax {command}: error: {explain(filt.fatal, facts)}", file=sys.stderr)
    return 1
  if rc < 0:
    name = signal.Signals(-rc).name
    print(f"medjax {command}: error: the worker process was killed by {name}", file=sys.stderr)
    return 128 - rc
  return rc
