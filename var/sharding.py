"""Device mesh, logical axis rules and the shardings of parameters and batches.

Parameters are annotated with *logical* axis names (`nnx.with_partitioning(init, ("embed", "mlp"))`); the rules
below map them onto the mesh axes ("data", "fsdp", "tensor"). Modules are built under
`nnx.use_eager_sharding(False)` so that only the names are recorded; the caller then places the state with the
shardings from `state_shardings` (jit `out_shardings` or `jax.device_put`). The mesh uses `AxisType.Auto` axes
(GSPMD propagation), which is what the logical-rules style needs: `jax.make_mesh` defaults to Explicit axes.

Typical use::

  mesh = make_mesh((-1, 1, 1))                       # all devices on "data"
  with nnx.use_eager_sharding(False):
    model = VAR(cfg, rngs=nnx.Rngs(0))               # names recorded, nothing placed
  graphdef, state = nnx.split(model)
  shardings = state_shardings(state, mesh)
  state = jax.device_put(state, shardings)
  batch = shard_batch(next(train_iter), mesh)        # per-host numpy -> global arrays
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or axes, or None = replicated). Names missing here also resolve to None.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
  ("batch", ("data", "fsdp")),  # activations and batches: split over every data-parallel axis
  ("embed", "fsdp"),  # transformer width C: the FSDP axis (ZeRO-3 style parameter sharding)
  ("mlp", "tensor"),  # 4C hidden of the FFN
  ("heads", "tensor"),  # qkv / attention output
  ("adaln", "tensor"),  # 6C / 2C AdaLN modulation outputs
  ("vocab", "tensor"),  # token-logit head (V = 4096)
  # Conv kernels (HWIO = (None, None, "conv_in", "conv_out")) stay replicated: the tokenizer is small, frozen
  # while the VAR trains, and some of its convs have 3 output channels, which no fsdp size > 1 divides.
  ("conv_out", None),
  ("conv_in", None),
  ("layers", None),  # the stacked-layer axis is scanned over, never split
  ("length", None),
  ("classes", None),
  ("codebook", None),
  ("latent", None),
)

_DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS",)


def make_mesh(
  shape: Sequence[int] = (-1, 1, 1),
  axis_names: Sequence[str] = MESH_AXES,
  *,
  devices: Sequence[jax.Device] | None = None,
) -> jax.sharding.Mesh:
  """A device mesh with `AxisType.Auto` axes.

  Args:
    shape: size of each mesh axis; at most one entry may be -1, which takes the remaining devices.
    axis_names: one name per entry of `shape`.
    devices: devices to lay out (default: all of `jax.devices()`).

  Raises:
    ValueError: naming the shape and the device count when they do not match.
  """
  shape, axis_names = tuple(int(s) for s in shape), tuple(axis_names)
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if len(shape) != len(axis_names):
    raise ValueError(f"mesh shape {shape} has {len(shape)} entries but axis_names {axis_names} has "
                     f"{len(axis_names)}: give one size per axis name")
  if len(set(axis_names)) != len(axis_names):
    raise ValueError(f"mesh axis_names {axis_names} repeat a name: give each axis its own name")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh shape {shape} is invalid: sizes must be positive, with at most one -1 "
                     "(the -1 axis takes the remaining devices)")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if n % known:
      raise ValueError(f"mesh shape {shape} does not fit jax.device_count()={n}: the fixed axes need a multiple "
                       f"of {known} devices; pick sizes whose product divides {n}")
    shape = tuple(n // known if s == -1 else s for s in shape)
  elif known != n:
    raise ValueError(f"mesh shape {shape} has {known} devices but jax.device_count()={n}: make the product "
                     f"equal {n}, or use -1 for one axis to take the remaining devices")
  return jax.make_mesh(shape, axis_names, axis_types=(AxisType.Auto,) * len(shape), devices=devices)


def rules_for_mesh(mesh: jax.sharding.Mesh, rules=LOGICAL_AXIS_RULES) -> tuple:
  """`rules` with mesh axes that `mesh` lacks dropped (so a ("data",)-only mesh can use the project rules)."""

  def keep(target):
    if target is None:
      return None
    if isinstance(target, str):
      return target if target in mesh.axis_names else None
    kept = tuple(t for t in target if t in mesh.axis_names)
    return kept if len(kept) > 1 else (kept[0] if kept else None)

  return tuple((name, keep(target)) for name, target in rules)


def logical_to_spec(logical_names: Sequence[str | None], mesh: jax.sharding.Mesh, rules=LOGICAL_AXIS_RULES):
  """The PartitionSpec of an array whose axes carry `logical_names` (e.g. a KV cache or an activation)."""
  return nn.logical_to_mesh_axes(tuple(logical_names), rules_for_mesh(mesh, rules))


def named_sharding(logical_names: Sequence[str | None], mesh: jax.sharding.Mesh, rules=LOGICAL_AXIS_RULES):
  """NamedSharding for an array whose axes carry `logical_names`."""
  return NamedSharding(mesh, logical_to_spec(logical_names, mesh, rules))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  """A fully replicated sharding on `mesh` (scalars, small tables, RNG keys)."""
  return NamedSharding(mesh, PartitionSpec())


def state_shardings(state: Any, mesh: jax.sharding.Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
  """NamedShardings for an nnx state (or any tree of nnx Variables) built with eager sharding off.

  Variables annotated with logical names (`nnx.with_partitioning` / `out_sharding=`) are mapped through `rules`;
  variables without names, and plain arrays, are replicated. The result has the structure of `state`, so it can be
  passed as `out_shardings` of a jitted init or to `jax.device_put(state, shardings)`.

  Raises:
    ValueError: naming the variable, its shape and spec, when a sharded dimension is not divisible by the mesh
      axes it is split over.
  """
  # Read the raw logical names: an enclosing `nnx.logical_axis_rules` context would otherwise translate them
  # first, and translating mesh-axis names a second time would drop them.
  with nnx.logical_axis_rules(()):
    logical = nnx.get_partition_spec(state)
  specs = nn.logical_to_mesh(logical, rules_for_mesh(mesh, rules))

  def to_sharding(path, spec, leaf):
    if spec is None:  # not an array (e.g. a static field in a plain pytree)
      return None
    _check_divisible(jax.tree_util.keystr(path), tuple(getattr(leaf, "shape", ())), spec, mesh)
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(to_sharding, specs, state, is_leaf=lambda x: x is None)


def _check_divisible(where: str, shape: tuple[int, ...], spec: PartitionSpec, mesh: jax.sharding.Mesh) -> None:
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=False):
    if axes is None:
      continue
    size = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
    if dim % size:
      raise ValueError(f"{where}: shape {shape} with sharding {spec} on mesh {dict(mesh.shape)}: dimension {dim} "
                       f"is not divisible by {size}; change the model width or the mesh shape, or map that "
                       "logical axis to None in the rules")


def batch_axes(mesh: jax.sharding.Mesh, rules=LOGICAL_AXIS_RULES) -> tuple[str, ...]:
  """The mesh axes that the leading (batch) dimension of inputs is split over."""
  spec = logical_to_spec(("batch",), mesh, rules)
  axes = spec[0] if len(spec) else None
  return () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))


def batch_sharding(mesh: jax.sharding.Mesh, rules=LOGICAL_AXIS_RULES) -> NamedSharding:
  """Sharding of a global batch: leading axis over the "batch" mesh axes, the other axes replicated."""
  axes = batch_axes(mesh, rules)
  return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def check_batch_divisible(batch: int | Any, mesh: jax.sharding.Mesh, rules=LOGICAL_AXIS_RULES) -> int:
  """Checks that a global batch splits evenly over the batch axes of `mesh`; returns the global batch size.

  Args:
    batch: the global batch size (int), or a per-host batch (a tree of arrays with a common leading dimension;
      the global size is that times `jax.process_count()`).
    mesh: the device mesh.

  Raises:
    ValueError: naming the batch size and the mesh when they do not fit, with the nearest valid sizes.
  """
  if isinstance(batch, (int, np.integer)):
    global_size = int(batch)
  else:
    sizes = {np.shape(x)[0] for x in jax.tree.leaves(batch)}
    if len(sizes) != 1:
      raise ValueError(f"batch leaves have different leading sizes {sorted(sizes)}: every array in a batch "
                       "needs the same batch dimension")
    global_size = sizes.pop() * jax.process_count()
  axes = batch_axes(mesh, rules)
  ways = math.prod(mesh.shape[a] for a in axes)
  if global_size <= 0 or global_size % ways:
    lower, upper = (global_size // ways) * ways, (global_size // ways + 1) * ways
    raise ValueError(f"global batch size {global_size} is not divisible by the {ways} batch shards of mesh "
                     f"{dict(mesh.shape)} (axes {axes}): use a multiple of {ways}, e.g. "
                     f"{lower if lower > 0 else upper} or {upper}")
  return global_size


def shard_batch(batch_np: Any, mesh: jax.sharding.Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
  """Per-host numpy batch (tree of arrays, leading axis = per-host batch) -> global jax arrays on `mesh`.

  Each host passes its own disjoint slice; `jax.make_array_from_process_local_data` assembles the global array
  of size per_host_batch * process_count, split over the batch axes.
  """
  check_batch_divisible(batch_np, mesh, rules)
  sharding = batch_sharding(mesh, rules)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch_np)


def maybe_initialize_distributed(flag: bool | None = None, environ: Mapping[str, str] | None = None) -> bool:
  """Calls `jax.distributed.initialize()` for multi-host runs; returns whether it did.

  It runs when `flag` is True, or when `flag` is None and the environment names a coordinator
  (JAX_COORDINATOR_ADDRESS). jax reads the address itself; JAX_NUM_PROCESSES and JAX_PROCESS_ID, which jax
  does not read, are passed on from here, so a plain cluster (or localhost) is launched with three variables
  and the same command on every host. On Cloud TPU pods, SLURM and other clusters jax detects everything
  itself: pass flag=True (`--config.distributed=True`). Must run before anything touches a JAX backend.
  """
  environ = os.environ if environ is None else environ
  if flag is None:
    flag = any(environ.get(k) for k in _DISTRIBUTED_ENV)
  if not flag:
    return False
  if jax.distributed.is_initialized():
    return False
  kwargs = {}
  for key, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
    if environ.get(key):
      try:
        kwargs[arg] = int(environ[key])
      except ValueError:
        raise ValueError(f"{key}={environ[key]!r} must be an integer ({arg} of jax.distributed.initialize)") from None
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed initialized: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
  return True
