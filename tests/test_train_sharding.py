"""One train step on a (2, 2, 2) mesh of 8 fake CPU devices equals the same step on 1 device (both stages),
and the large VAR kernels (and their Adam moments) are really sharded by the logical axis rules."""

import jax
import numpy as np
import pytest
import train_testlib as tl
from flax import nnx
from jax.sharding import PartitionSpec as P

from var import sharding as shd
from var.train_lib import load_tokenizer_config, make_setup


@pytest.fixture(autouse=True, scope="module")
def fast_compiles():
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", False)


# Adam's first step is lr * g / (|g| + eps) = lr * sign(g) wherever |g| >> eps, so gradients that are
# mathematically zero (a conv bias followed by GroupNorm) turn their reduction-order noise (~1e-9) into full
# lr-sized updates. eps = 1e-3 keeps the update proportional to g there, so the comparison tests the sharded
# computation instead of the sign of rounding noise.
WELL_CONDITIONED = {"input.batch_size": 8, "optim.eps": 1e-3}


def _one_step(config, mesh, batch, tok_config=None):
  setup = make_setup(config, mesh, tok_config=tok_config)
  setup.initial_params = jax.device_get(nnx.to_pure_dict(setup.state["model"]))  # the state is donated below
  with jax.set_mesh(mesh):
    args = (setup.state, shd.shard_batch(batch, mesh))
    if config.stage == "var":
      args += (np.int32(-1), np.float32(1.0))
    state, metrics = setup.train_step(*args)
  return setup, state, jax.device_get(metrics)


def test_tokenizer_step_sharded_equals_single_device(tmp_path):
  config = tl.tokenizer_config(tmp_path, **WELL_CONDITIONED)
  batch = tl.synthetic_batch(8, 8)
  one = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  eight = shd.make_mesh((2, 2, 2))
  setup1, s1, m1 = _one_step(config, one, batch)
  _, s8, m8 = _one_step(config, eight, batch)
  assert abs(m1["loss"] - m8["loss"]) < 1e-5, (m1["loss"], m8["loss"])
  assert abs(m1["grad_norm"] - m8["grad_norm"]) < 1e-5 * m1["grad_norm"], (m1["grad_norm"], m8["grad_norm"])
  assert tl.max_abs_diff(nnx.to_pure_dict(s1["model"]), nnx.to_pure_dict(s8["model"])) < 1e-5
  assert tl.max_abs_diff(nnx.to_pure_dict(s1["opt"]), nnx.to_pure_dict(s8["opt"])) < 1e-5
  # the parameters really moved (a step that changes nothing would pass the comparison trivially)
  assert tl.max_abs_diff(setup1.initial_params, nnx.to_pure_dict(s1["model"])) > 1e-4


def test_var_step_sharded_equals_single_device_and_kernels_are_sharded(tmp_path):
  tok_dir = tl.write_tokenizer_dir(tmp_path / "tok")
  config = tl.var_config(tmp_path, tok_dir, **WELL_CONDITIONED)
  tok_config = load_tokenizer_config(config)
  batch = tl.synthetic_batch(8, 8)
  one = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  eight = shd.make_mesh((2, 2, 2))
  setup1, s1, m1 = _one_step(config, one, batch, tok_config)
  setup8, s8, m8 = _one_step(config, eight, batch, tok_config)
  assert abs(m1["loss"] - m8["loss"]) < 1e-5, (m1["loss"], m8["loss"])
  assert abs(m1["grad_norm"] - m8["grad_norm"]) < 1e-5 * m1["grad_norm"], (m1["grad_norm"], m8["grad_norm"])
  assert tl.max_abs_diff(nnx.to_pure_dict(s1["model"]), nnx.to_pure_dict(s8["model"])) < 1e-5
  assert tl.max_abs_diff(nnx.to_pure_dict(s1["opt"]), nnx.to_pure_dict(s8["opt"])) < 1e-5
  assert tl.max_abs_diff(setup1.initial_params, nnx.to_pure_dict(s1["model"])) > 1e-4

  # Large kernels: (layers, C, 3C) qkv -> (None, fsdp, tensor); FFN, head, AdaLN likewise; Adam moments
  # follow.
  model = s8["model"]
  expect = {("blocks", "attn", "mat_qkv", "kernel"): P(None, "fsdp", "tensor"),
            ("blocks", "ffn", "fc1", "kernel"): P(None, "fsdp", "tensor"),
            ("blocks", "ffn", "fc2", "kernel"): P(None, "tensor", "fsdp"),
            ("blocks", "ada_lin", "kernel"): P(None, "fsdp", "tensor"),
            ("head", "kernel"): P("fsdp", "tensor")}
  for path, spec in expect.items():
    leaf = model
    for k in path:
      leaf = leaf[k]
    assert leaf[...].sharding.spec == spec, (path, leaf[...].sharding.spec)
    shard = leaf[...].addressable_shards[0].data.shape
    assert np.prod(shard) * 4 == np.prod(leaf[...].shape), (path, shard)  # really split 4 ways
  mu = s8["opt"]["opt_state"]
  specs = {x.sharding.spec for x in jax.tree.leaves(mu) if getattr(x, "ndim", 0) == 3}
  assert {P(None, "fsdp", "tensor"), P(None, "tensor", "fsdp")} <= specs, specs
  # the batch is split over data x fsdp
  assert shd.batch_sharding(eight).spec == P(("data", "fsdp"))
  del setup8
