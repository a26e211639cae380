"""Launches two CPU worker processes (2 fake devices each) joined by `jax.distributed`, for the multi-host tests."""
import os
import pathlib
import socket
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def launch_two_workers(worker_code: str, workdir) -> list[subprocess.Popen]:
  """Starts `python -c worker_code PID PORT WORKDIR` twice; REPO / TESTS in the code become the repo / tests paths."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  code = worker_code.replace("REPO", repr(str(REPO))).replace("TESTS", repr(str(REPO / "tests")))
  # 2 fake devices each; the test session's other XLA flags (conftest.py: code generation level) are kept.
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env = dict(os.environ, XLA_FLAGS=" ".join(["--xla_force_host_platform_device_count=2", *flags]), JAX_PLATFORMS="cpu")
  return [subprocess.Popen([sys.executable, "-c", code, str(i), str(port), str(workdir)], cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]


def wait_workers(procs: list[subprocess.Popen], expect: str, timeout: float = 600) -> None:
  """Waits for the workers; asserts each exited 0 and printed `expect`."""
  outs = [p.communicate(timeout=timeout) for p in procs]
  for p, (o, e) in zip(procs, outs):
    assert p.returncode == 0, e[-3000:]
    assert expect in o
