"""The same-run comparison with the official PyTorch code refuses what it cannot run, before any model is built."""

import subprocess
import sys

import pytest

from benchmarks import bench_official

DRIVER = bench_official.DRIVER


def test_refuses_a_directory_that_is_not_the_official_repository(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    bench_official.main(["--official_repo", str(tmp_path), "--official_python", sys.executable])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert str(tmp_path) in err and "no models/var.py" in err and "FoundationVision/VAR" in err


def test_refuses_an_interpreter_without_torch(tmp_path, capsys):
  (tmp_path / "models").mkdir()
  (tmp_path / "models" / "var.py").write_text("")
  fake = tmp_path / "python"  # an "interpreter" whose `import torch` fails the way a torch-less one does
  fake.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'torch'\" >&2\nexit 1\n")
  fake.chmod(0o755)
  with pytest.raises(SystemExit) as e:
    bench_official.main(["--official_repo", str(tmp_path), "--official_python", str(fake), "--what", "sample"])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert str(fake) in err and "cannot import torch" in err and "No module named 'torch'" in err


def test_refuses_an_unknown_part(tmp_path, capsys):
  with pytest.raises(SystemExit):
    bench_official.main(["--official_repo", str(tmp_path), "--official_python", sys.executable, "--what", "decode"])
  assert "--what 'decode'" in capsys.readouterr().err


def test_driver_refuses_a_directory_that_is_not_the_official_repository(tmp_path):
  # the driver imports no JAX and no var-jax: it runs under the user's torch interpreter
  proc = subprocess.run([sys.executable, DRIVER, "--repo", str(tmp_path), "--what", "sample"], capture_output=True,
                        text=True, timeout=60)
  assert proc.returncode == 2
  assert str(tmp_path) in proc.stderr and "no models/var.py" in proc.stderr
