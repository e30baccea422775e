"""var.sharding on the 8 fake CPU devices of conftest.py."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from var import sharding


def _linear(din=4, dout=8):
  init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp"))
  return nnx.Linear(din, dout, kernel_init=init, rngs=nnx.Rngs(0))


def test_make_mesh_fills_minus_one_with_auto_axes():
  mesh = sharding.make_mesh((-1, 2, 1))
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  assert mesh.axis_types == (AxisType.Auto,) * 3
  assert sharding.make_mesh().devices.size == 8
  assert dict(sharding.make_mesh((2, 2, 2)).shape) == {"data": 2, "fsdp": 2, "tensor": 2}


@pytest.mark.parametrize("shape,match", [
  ((3, 1, 1), r"\(3, 1, 1\).*jax.device_count\(\)=8"),
  ((-1, 3, 1), r"\(-1, 3, 1\).*jax.device_count\(\)=8"),
  ((-1, -1, 1), "at most one -1"),
  ((0, 8, 1), "positive"),
  ((8, 1), "one size per axis name"),
])
def test_make_mesh_errors_name_shape_and_device_count(shape, match):
  with pytest.raises(ValueError, match=match):
    sharding.make_mesh(shape)


def test_rules_cover_every_project_logical_name():
  names = dict(sharding.LOGICAL_AXIS_RULES)
  assert names["batch"] == ("data", "fsdp")
  assert names["embed"] == "fsdp"
  for name in ("mlp", "heads", "adaln", "vocab"):
    assert names[name] == "tensor"
  for name in ("layers", "length", "classes", "codebook", "latent", "conv_in", "conv_out"):
    assert names[name] is None


def test_linear_kernel_sharded_fsdp_tensor_on_2x2x2_mesh():
  mesh = sharding.make_mesh((2, 2, 2))
  with nnx.use_eager_sharding(False):  # no mesh needed at construction: only the names are recorded
    model = _linear()
  state = nnx.state(model)
  shardings = sharding.state_shardings(state, mesh)
  assert shardings["kernel"].get_value() == NamedSharding(mesh, P("fsdp", "tensor"))
  assert shardings["bias"].get_value().spec == P()
  placed = jax.device_put(state, shardings)
  kernel = placed["kernel"][...]
  assert kernel.sharding.spec == P("fsdp", "tensor")
  # each device holds a (2, 4) block of the (4, 8) kernel, and the values are unchanged
  assert {s.data.shape for s in kernel.addressable_shards} == {(2, 4)}
  np.testing.assert_array_equal(np.asarray(kernel), np.asarray(model.kernel[...]))

  # An enclosing rules context must not translate the names twice.
  with nnx.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    assert sharding.state_shardings(state, mesh)["kernel"].get_value().spec == P("fsdp", "tensor")


def test_state_shardings_as_jit_out_shardings_and_on_abstract_state():
  mesh = sharding.make_mesh((2, 2, 2))

  def init():
    with nnx.use_eager_sharding(False):
      return nnx.state(_linear())

  abstract = jax.eval_shape(init)
  shardings = sharding.state_shardings(abstract, mesh)
  state = jax.jit(init, out_shardings=shardings)()
  assert state["kernel"][...].sharding.spec == P("fsdp", "tensor")


def test_modules_also_build_eagerly_sharded_under_a_mesh():
  mesh = sharding.make_mesh((2, 2, 2))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    model = _linear()
  assert model.kernel[...].sharding.spec == P("fsdp", "tensor")


def test_rules_drop_axes_missing_from_mesh():
  mesh = sharding.make_mesh((-1,), ("data",))
  with nnx.use_eager_sharding(False):
    state = nnx.state(_linear())
  assert sharding.state_shardings(state, mesh)["kernel"].get_value().spec == P(None, None)
  assert sharding.batch_sharding(mesh).spec == P("data")


def test_state_shardings_reports_indivisible_dimension():
  mesh = sharding.make_mesh((2, 2, 2))
  with nnx.use_eager_sharding(False):
    state = nnx.state(_linear(din=3, dout=8))
  with pytest.raises(ValueError, match=r"kernel.*\(3, 8\).*dimension 3 is not divisible by 2"):
    sharding.state_shardings(state, mesh)


def test_shard_batch_places_rows_on_data_and_fsdp():
  mesh = sharding.make_mesh((2, 2, 2))
  batch = {"image": np.arange(8 * 2 * 2 * 3, dtype=np.float32).reshape(8, 2, 2, 3),
           "label": np.arange(8, dtype=np.int32)}
  out = sharding.shard_batch(batch, mesh)
  assert out["image"].sharding.spec == P(("data", "fsdp"))
  assert out["image"].shape == (8, 2, 2, 3)
  np.testing.assert_array_equal(np.asarray(out["label"]), batch["label"])
  # 4 batch shards of 2 rows; the tensor axis holds replicas
  rows = sorted({tuple(np.asarray(s.data).tolist()) for s in out["label"].addressable_shards})
  assert rows == [(0, 1), (2, 3), (4, 5), (6, 7)]


def test_check_batch_divisible():
  mesh = sharding.make_mesh((2, 2, 2))
  assert sharding.check_batch_divisible(12, mesh) == 12
  with pytest.raises(ValueError, match=r"global batch size 6 is not divisible by the 4 batch shards.*4 or 8"):
    sharding.check_batch_divisible(6, mesh)
  with pytest.raises(ValueError, match="not divisible"):
    sharding.shard_batch({"label": np.zeros(6, np.int32)}, mesh)


def test_named_sharding_for_activations():
  mesh = sharding.make_mesh((2, 2, 2))
  assert sharding.named_sharding(("batch", "length", "heads"), mesh).spec == P(("data", "fsdp"), None, "tensor")


def test_maybe_initialize_distributed_off_without_flag_or_env():
  assert sharding.maybe_initialize_distributed(None, environ={}) is False
  assert sharding.maybe_initialize_distributed(False, environ={"JAX_COORDINATOR_ADDRESS": "h:1"}) is False


def test_maybe_initialize_distributed_from_env_or_flag(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
  assert sharding.maybe_initialize_distributed(None, environ={"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
  assert sharding.maybe_initialize_distributed(True, environ={})
  assert calls == [((), {}), ((), {})]
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
  assert sharding.maybe_initialize_distributed(None, environ=env)  # jax itself reads only the address
  assert calls[-1] == ((), {"num_processes": 4, "process_id": 3})
  with pytest.raises(ValueError, match="JAX_PROCESS_ID='x' must be an integer"):
    sharding.maybe_initialize_distributed(None, environ={**env, "JAX_PROCESS_ID": "x"})
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
  assert sharding.maybe_initialize_distributed(True, environ={}) is False  # never twice
  assert len(calls) == 3
