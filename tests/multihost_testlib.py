"""Launch real multi-process JAX runs on 127.0.0.1 (not a test module itself).

`launch(args)` starts `num_processes` copies of `python <args>` wired to one `jax.distributed` coordinator on
a free local port, through the environment variables that `jax.distributed.initialize()` reads
(JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), with `local_devices` CPU devices per process
and gloo CPU collectives. So the processes run exactly what a user runs on a cluster (`--config.distributed`
or the env), and together they form one global mesh. Every process gets its own session (process group); on
a failure or the timeout all groups are killed and the logs of every process are in the error.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on right now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def child_env(process_id: int | None = None, num_processes: int = 1, port: int | None = None,
              local_devices: int = 4, extra: dict | None = None) -> dict:
  """Environment of one worker: CPU only, `local_devices` devices, gloo collectives, and (when `port` is
  given) the coordinator address / process count / id that jax.distributed.initialize() reads."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(local_devices),
             JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", JAX_DEFAULT_MATMUL_PRECISION="highest",
             PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")]),
             XLA_FLAGS=env.get("XLA_FLAGS", ""), TF_CPP_MIN_LOG_LEVEL="2")
  if port is not None:
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num_processes),
               JAX_PROCESS_ID=str(process_id))
  env.update(extra or {})
  return env


@dataclasses.dataclass
class Result:
  returncode: int
  log: str


def _tail(text: str, n: int = 4000) -> str:
  return text if len(text) <= n else "..." + text[-n:]


def _kill_group(proc: subprocess.Popen) -> None:
  if proc.poll() is None:
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  proc.wait()


def launch(args: list[str], log_dir: pathlib.Path, *, num_processes: int = 2, local_devices: int = 4,
           timeout: float = 240.0, extra_env: dict | None = None, check: bool = True) -> list[Result]:
  """Runs `python args...` as `num_processes` processes of one jax.distributed job; waits for all.

  Raises AssertionError (with every process's log tail) when one fails (check=True) or the timeout passes;
  all process groups are killed before raising.
  """
  log_dir = pathlib.Path(log_dir)
  log_dir.mkdir(parents=True, exist_ok=True)
  port = free_port()
  procs, logs, timed_out = [], [], True
  try:
    for i in range(num_processes):
      log = log_dir / f"process_{i}.log"
      logs.append(log)
      with log.open("w") as f:
        procs.append(subprocess.Popen(
            [sys.executable, *args], cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
            env=child_env(i, num_processes, port, local_devices, extra_env)))
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
      # one dead process leaves the others blocked in a collective: stop early instead of at the timeout
      if check and any(p.poll() not in (None, 0) for p in procs):
        break
      if time.monotonic() > deadline:
        break
      time.sleep(0.2)
    timed_out = time.monotonic() > deadline
    if timed_out:  # the workers register faulthandler on SIGUSR1: their stacks show where they hang
      for p in procs:
        if p.poll() is None:
          os.kill(p.pid, signal.SIGUSR1)
      time.sleep(2)
  finally:
    for p in procs:
      _kill_group(p)
  results = [Result(p.returncode, log.read_text()) for p, log in zip(procs, logs, strict=True)]
  if timed_out or (check and any(r.returncode for r in results)):
    detail = "\n".join(f"--- process {i} (rc {r.returncode}) ---\n{_tail(r.log)}" for i, r in enumerate(results))
    what = f"timed out after {timeout:.0f} s" if timed_out else "failed"
    raise AssertionError(f"multi-process run {args} {what}:\n{detail}")
  return results


def run_single(args: list[str], log_path: pathlib.Path, *, local_devices: int = 8, timeout: float = 240.0,
               extra_env: dict | None = None) -> Result:
  """Runs `python args...` as one plain process (no coordinator) with `local_devices` CPU devices."""
  log_path = pathlib.Path(log_path)
  log_path.parent.mkdir(parents=True, exist_ok=True)
  with log_path.open("w") as f:
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                            start_new_session=True, env=child_env(local_devices=local_devices, extra=extra_env))
  try:
    proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    pass
  finally:
    timed_out = proc.poll() is None
    _kill_group(proc)
  result = Result(proc.returncode, log_path.read_text())
  if timed_out:
    raise AssertionError(f"run {args} timed out after {timeout:.0f} s:\n{_tail(result.log)}")
  return result
