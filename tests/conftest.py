"""Test setup: 8 fake CPU devices (sharding is tested on a fake mesh), float32 at highest matmul precision."""

import os
import pathlib

import jax
import pytest

# Must run before anything touches a JAX backend.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")

SHARED = pathlib.Path(os.environ.get("VARJAX_SHARED", pathlib.Path(__file__).resolve().parents[2] / "shared"))
FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
  """../shared (specs and large golden fixtures); CI sets VARJAX_SHARED to it."""
  if not (SHARED / "fixtures").is_dir():
    pytest.fail(f"shared fixtures not found at {SHARED}; set VARJAX_SHARED to the shared/ folder")
  return SHARED


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
  """tests/fixtures: small golden files copied from ../shared/fixtures."""
  return FIXTURES


@pytest.fixture(scope="session")
def fid_dir(shared_dir) -> pathlib.Path:
  """../shared/fixtures/fid: the FID Inception parity fixtures."""
  return shared_dir / "fixtures" / "fid"


@pytest.fixture(scope="session")
def fid_io(fid_dir) -> dict:
  """inception_io.npz: test images, preprocessed inputs and the reference network outputs."""
  import numpy as np

  with np.load(fid_dir / "inception_io.npz") as z:
    return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def fast_compile():
  """Most XLA optimisation passes off for one test module: compiling whole samplers several times is the slow part
  on 2 CPU cores. Modules opt in with `pytestmark = pytest.mark.usefixtures("fast_compile")`; the CLI tests and
  tests/test_sampler_optimized.py check parity fully optimised."""
  prev = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", prev)


@pytest.fixture(scope="session")
def t1(shared_dir):
  """The official fixture T1 (tiny VAR + the shared VQVAE, 4 scales) -> (var, vae, io: the golden outputs)."""
  import numpy as np

  from tokenizer import VQVAEConfig, load_official_vqvae
  from var import model as var_model
  from var import official

  root = shared_dir / "fixtures" / "var"
  var = official.load_state_dict(var_model.build(var_model.preset("tiny")), dict(np.load(root / "T1" / "var.npz")))
  vae = load_official_vqvae(dict(np.load(root / "vae_shared.npz")), VQVAEConfig.preset("t1"))
  return var, vae, dict(np.load(root / "T1" / "io.npz"))
