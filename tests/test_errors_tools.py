"""The PyTorch interop CLIs report a bad checkpoint / backbone / flag in one line with exit 2 (issue #19 item 10)."""
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _cli(module, *args):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.mark.parametrize("module,args,expect", [
    ("muse_jax.tools.import_torch", ["--checkpoint", "{bad}", "--out", "{tmp}/w"], "not a PyTorch checkpoint"),
    ("muse_jax.tools.import_torch", ["--checkpoint", "{tmp}/missing.pth", "--out", "{tmp}/w"], "missing.pth"),
    ("muse_jax.tools.export_torch", ["--backbone", "{tmp}/nothing", "--out", "{tmp}/y.pth"], "no such directory"),
    ("muse_jax.tools.export_torch", ["--layout", "x"], "command line"),
])
def test_interop_cli_user_errors_are_one_line_exit_2(module, args, expect, tmp_path):
  bad = tmp_path / "bad.pth"
  bad.write_bytes(b"garbage\n")
  proc = _cli(module, *[a.format(bad=bad, tmp=tmp_path) for a in args])
  lines = [x for x in proc.stderr.splitlines() if x.strip()]
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], proc.stderr[-2000:]
  assert not (tmp_path / "w").exists()
