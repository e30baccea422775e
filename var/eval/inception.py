"""The FID Inception-v3 (pytorch-fid's `fid_inception_v3`, i.e. the TF 2015-12-05 graph) as Flax NNX modules.

This is the network behind every published FID: torchvision's Inception3 with the four patches pytorch-fid applies
so that it computes what the TensorFlow graph computes (specs/FID.md section 3):
  * the average pools in the A, C and E blocks ignore padding (`count_include_pad=False`, TF "SAME" avg-pool);
  * the last E block (Mixed_7c) pools its pool branch with a 3x3 stride-1 MAX pool (a quirk of the TF graph);
  * the classifier is 1008-way (1000 ImageNet classes + 8 unused), no aux head, no input transform.
BatchNorm runs in inference form with eps=1e-3 and is fused into a per-channel scale/shift at call time.

Layout is NHWC; kernels are HWIO. Module attribute names equal the PyTorch module names, so a state-dict key such
as `Mixed_6d.branch7x7_2.conv.weight` maps to the module path `Mixed_6d/branch7x7_2/conv/kernel`.

Outputs (dict): `pool3` (B, 2048), `logits_unbiased` (B, 1008) = pool3 @ W (what ADM's Inception Score uses),
`logits` (B, 1008) = with the fc bias, `spatial` (B, 2023) = the sFID feature (ADM's `mixed_6/conv`:
Mixed_6d.branch1x1 after ReLU, channels [:7], flattened in (h, w, c) order).

Weights: the standard pytorch-fid file `pt_inception-2015-12-05-6726825d.pth` (read without torch by
`tokenizer.torch_pth.load_pth`), or a `.npz` of the same state dict. Nothing is downloaded: the path comes from the
caller, a `--inception_weights` flag, or the VARJAX_INCEPTION_WEIGHTS environment variable.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
  "WEIGHTS_ENV_VAR",
  "InceptionV3FID",
  "abstract_inception",
  "check_weights_hash",
  "expected_state_dict_shapes",
  "load_inception",
  "load_inception_state_dict",
  "resolve_weights_path",
  "state_dict_to_model",
]

WEIGHTS_ENV_VAR = "VARJAX_INCEPTION_WEIGHTS"
WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_SHA256_PREFIX = "6726825d"  # torch-hub convention: the hex in the file name starts its sha256
WEIGHTS_ORIGIN = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILENAME
BN_EPS = 1e-3  # TF's batch-norm epsilon, kept by pytorch-fid (torchvision's BasicConv2d uses 0.001 too)
POOL3_DIM, NUM_LOGITS, SPATIAL_CHANNELS = 2048, 1008, 7


def _precision(dtype) -> jax.lax.Precision:
  # float32 parity needs true fp32 convolutions (no TF32 on GPUs); reduced-precision compute takes the fast path.
  full = jnp.dtype(dtype) in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64))
  return jax.lax.Precision.HIGHEST if full else jax.lax.Precision.DEFAULT


class BatchNormInference(nnx.Module):
  """BatchNorm2d with running statistics, applied as one fused per-channel scale and shift (in float32)."""

  def __init__(self, features: int, eps: float = BN_EPS):
    self.eps = eps
    names = ("conv_out",)
    self.scale = nnx.Param(jnp.ones((features,), jnp.float32), out_sharding=names)
    self.bias = nnx.Param(jnp.zeros((features,), jnp.float32), out_sharding=names)
    self.mean = nnx.BatchStat(jnp.zeros((features,), jnp.float32), out_sharding=names)
    self.var = nnx.BatchStat(jnp.ones((features,), jnp.float32), out_sharding=names)

  def __call__(self, x):
    acc = jnp.promote_types(x.dtype, jnp.float32)  # float32, or float64 when the network runs in float64
    scale = self.scale[...].astype(acc) * jax.lax.rsqrt(self.var[...].astype(acc) + self.eps)
    shift = self.bias[...].astype(acc) - self.mean[...].astype(acc) * scale
    return (x.astype(acc) * scale + shift).astype(x.dtype)


class BasicConv2d(nnx.Module):
  """Conv (no bias) -> BatchNorm (eps 1e-3, inference) -> ReLU. Padding is symmetric per axis, as in torch."""

  def __init__(self, in_ch: int, out_ch: int, kernel, stride: int = 1, padding=0, *, dtype, rngs: nnx.Rngs):
    kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
    padding = (padding, padding) if isinstance(padding, int) else tuple(padding)
    init = nnx.with_partitioning(nnx.initializers.he_normal(), (None, None, "conv_in", "conv_out"))
    self.conv = nnx.Conv(in_ch, out_ch, kernel, strides=stride, padding=tuple((p, p) for p in padding),
                         use_bias=False, dtype=dtype, param_dtype=jnp.float32, precision=_precision(dtype),
                         kernel_init=init, rngs=rngs)
    self.bn = BatchNormInference(out_ch)

  def __call__(self, x):
    return jax.nn.relu(self.bn(self.conv(x)))


def max_pool_3x3(x, stride: int, padding: int = 0):
  """3x3 max pool; padding counts as -inf (torch's max_pool2d and TF's SAME max-pool)."""
  pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  return jax.lax.reduce_window(x, jnp.array(-jnp.inf, x.dtype), jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1),
                               pad)


def avg_pool_3x3_exclude_pad(x):
  """3x3 stride-1 pad-1 average pool that divides by the number of real pixels (count_include_pad=False)."""
  _, h, w, _ = x.shape
  pad = ((0, 0), (1, 1), (1, 1), (0, 0))
  acc = jnp.promote_types(x.dtype, jnp.float32)  # sum bf16 activations in float32
  total = jax.lax.reduce_window(x.astype(acc), jnp.array(0, acc), jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)

  def count(n):  # valid taps per output position along one axis: 2 at the borders, 3 inside
    c = np.full((n,), 3.0, np.float32)
    c[0] -= 1
    c[-1] -= 1
    return c if n > 1 else np.ones((1,), np.float32)

  counts = count(h)[:, None] * count(w)[None, :]  # (H, W), static
  return (total / counts[None, :, :, None].astype(acc)).astype(x.dtype)


class FIDInceptionA(nnx.Module):
  """Mixed_5b/5c/5d: 35x35 block with 1x1, 5x5, double-3x3 and (padding-excluding) avg-pool branches."""

  def __init__(self, in_ch: int, pool_features: int, *, dtype, rngs):
    kw = dict(dtype=dtype, rngs=rngs)
    self.branch1x1 = BasicConv2d(in_ch, 64, 1, **kw)
    self.branch5x5_1 = BasicConv2d(in_ch, 48, 1, **kw)
    self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, **kw)
    self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1, **kw)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, **kw)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, **kw)
    self.branch_pool = BasicConv2d(in_ch, pool_features, 1, **kw)

  def __call__(self, x):
    b1 = self.branch1x1(x)
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = self.branch_pool(avg_pool_3x3_exclude_pad(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
  """Mixed_6a: 35x35 -> 17x17 reduction (stride-2 3x3, double 3x3, max pool of the raw input)."""

  def __init__(self, in_ch: int, *, dtype, rngs):
    kw = dict(dtype=dtype, rngs=rngs)
    self.branch3x3 = BasicConv2d(in_ch, 384, 3, stride=2, **kw)
    self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1, **kw)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, **kw)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, **kw)

  def __call__(self, x):
    b3 = self.branch3x3(x)
    bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([b3, bd, max_pool_3x3(x, stride=2)], axis=-1)


class FIDInceptionC(nnx.Module):
  """Mixed_6b..6e: 17x17 block with factorised 7x7 branches. Also returns branch1x1 (Mixed_6d's is the sFID map)."""

  def __init__(self, in_ch: int, c7: int, *, dtype, rngs):
    kw = dict(dtype=dtype, rngs=rngs)
    self.branch1x1 = BasicConv2d(in_ch, 192, 1, **kw)
    self.branch7x7_1 = BasicConv2d(in_ch, c7, 1, **kw)
    self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), **kw)
    self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), **kw)
    self.branch7x7dbl_1 = BasicConv2d(in_ch, c7, 1, **kw)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), **kw)
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), **kw)
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), **kw)
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), **kw)
    self.branch_pool = BasicConv2d(in_ch, 192, 1, **kw)

  def __call__(self, x):
    b1 = self.branch1x1(x)
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = self.branch7x7dbl_1(x)
    for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
      bd = layer(bd)
    bp = self.branch_pool(avg_pool_3x3_exclude_pad(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(nnx.Module):
  """Mixed_7a: 17x17 -> 8x8 reduction."""

  def __init__(self, in_ch: int, *, dtype, rngs):
    kw = dict(dtype=dtype, rngs=rngs)
    self.branch3x3_1 = BasicConv2d(in_ch, 192, 1, **kw)
    self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, **kw)
    self.branch7x7x3_1 = BasicConv2d(in_ch, 192, 1, **kw)
    self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), **kw)
    self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), **kw)
    self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, **kw)

  def __call__(self, x):
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return jnp.concatenate([b3, b7, max_pool_3x3(x, stride=2)], axis=-1)


class FIDInceptionE(nnx.Module):
  """Mixed_7b (avg-pool branch, padding excluded) and Mixed_7c (max-pool branch, the TF graph's quirk)."""

  def __init__(self, in_ch: int, pool: str, *, dtype, rngs):
    if pool not in ("avg", "max"):
      raise ValueError(f"pool={pool!r}: expected 'avg' (Mixed_7b) or 'max' (Mixed_7c)")
    kw = dict(dtype=dtype, rngs=rngs)
    self.pool = pool
    self.branch1x1 = BasicConv2d(in_ch, 320, 1, **kw)
    self.branch3x3_1 = BasicConv2d(in_ch, 384, 1, **kw)
    self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), **kw)
    self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), **kw)
    self.branch3x3dbl_1 = BasicConv2d(in_ch, 448, 1, **kw)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, **kw)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), **kw)
    self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), **kw)
    self.branch_pool = BasicConv2d(in_ch, 192, 1, **kw)

  def __call__(self, x):
    b1 = self.branch1x1(x)
    b3 = self.branch3x3_1(x)
    b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
    pooled = avg_pool_3x3_exclude_pad(x) if self.pool == "avg" else max_pool_3x3(x, stride=1, padding=1)
    return jnp.concatenate([b1, b3, bd, self.branch_pool(pooled)], axis=-1)


class InceptionV3FID(nnx.Module):
  """The FID Inception-v3. Call on x299 (B, 299, 299, 3) float in [-1, 1] (see var.eval.preprocess).

  Args:
    compute_dtype: dtype of convolutions and activations (float32 for parity, bfloat16 for speed; float64 under
      jax x64 for exactness checks). Parameters are always float32; BatchNorm, the average pools, pool3 and the
      classifier run in at least float32, and all outputs are float32 (float64 with float64 compute).
  """

  def __init__(self, *, compute_dtype=jnp.float32, rngs: nnx.Rngs):
    dt = jnp.dtype(compute_dtype)
    self.compute_dtype = dt
    kw = dict(dtype=dt, rngs=rngs)
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, **kw)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, **kw)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, **kw)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, **kw)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, **kw)
    self.Mixed_5b = FIDInceptionA(192, 32, **kw)
    self.Mixed_5c = FIDInceptionA(256, 64, **kw)
    self.Mixed_5d = FIDInceptionA(288, 64, **kw)
    self.Mixed_6a = InceptionB(288, **kw)
    self.Mixed_6b = FIDInceptionC(768, 128, **kw)
    self.Mixed_6c = FIDInceptionC(768, 160, **kw)
    self.Mixed_6d = FIDInceptionC(768, 160, **kw)
    self.Mixed_6e = FIDInceptionC(768, 192, **kw)
    self.Mixed_7a = InceptionD(768, **kw)
    self.Mixed_7b = FIDInceptionE(1280, "avg", **kw)
    self.Mixed_7c = FIDInceptionE(2048, "max", **kw)
    self.fc = nnx.Linear(POOL3_DIM, NUM_LOGITS, param_dtype=jnp.float32, precision=jax.lax.Precision.HIGHEST,
                         kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "classes")),
                         bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("classes",)), rngs=rngs)

  def __call__(self, x) -> dict[str, jax.Array]:
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"InceptionV3FID expects NHWC (B, H, W, 3) input, got shape {x.shape}")
    x = x.astype(self.compute_dtype)
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 147, 147, 64)
    x = max_pool_3x3(x, stride=2)  # (B, 73, 73, 64): pytorch-fid block 0
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = max_pool_3x3(x, stride=2)  # (B, 35, 35, 192): block 1
    x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B, 35, 35, 288)
    x = self.Mixed_6a(x)  # (B, 17, 17, 768)
    x, _ = self.Mixed_6b(x)
    x, _ = self.Mixed_6c(x)
    x, spatial = self.Mixed_6d(x)  # spatial: (B, 17, 17, 192), ADM's mixed_6/conv
    x, _ = self.Mixed_6e(x)  # block 2
    x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (B, 8, 8, 2048)
    acc = jnp.promote_types(self.compute_dtype, jnp.float32)  # outputs: float32 (float64 for x64 checks)
    pool3 = jnp.mean(x.astype(acc), axis=(1, 2))  # (B, 2048): block 3
    logits_unbiased = jnp.dot(pool3, self.fc.kernel[...].astype(acc), precision=jax.lax.Precision.HIGHEST)
    # (h, w, c) flattening of the first 7 channels, exactly as ADM reshapes the NHWC TF tensor.
    spatial = spatial[..., :SPATIAL_CHANNELS].astype(acc).reshape(spatial.shape[0], -1)  # (B, 2023)
    return {"pool3": pool3, "logits_unbiased": logits_unbiased,  # (B, 1008)
            "logits": logits_unbiased + self.fc.bias[...].astype(acc), "spatial": spatial}


# ---------------------------------------------------------------------------------------------------------------
# Weights: pytorch-fid state dict <-> module state.

_BN_NAMES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
_BN_NAMES_INV = {v: k for k, v in _BN_NAMES.items()}


def abstract_inception(compute_dtype=jnp.float32) -> InceptionV3FID:
  """The module with shape-only variables (no random init, no mesh needed); fill it with `state_dict_to_model`."""
  with nnx.use_eager_sharding(False):
    return nnx.eval_shape(lambda: InceptionV3FID(compute_dtype=compute_dtype, rngs=nnx.Rngs(0)))


def _torch_key(path: tuple) -> str:
  """Module-state path -> pytorch-fid state-dict key (the inverse of the naming convention above)."""
  *module, leaf = (str(p) for p in path)
  if module[-1] == "conv" and leaf == "kernel":
    return ".".join(module) + ".weight"
  if module[-1] == "bn":
    return ".".join(module) + "." + _BN_NAMES_INV[leaf]
  if module == ["fc"]:
    return "fc." + {"kernel": "weight", "bias": "bias"}[leaf]
  raise KeyError(f"no state-dict name for module path {path}")


def _torch_layout(key: str, hwio_or_io_shape: tuple) -> tuple:
  if key.endswith("conv.weight"):  # HWIO -> OIHW
    h, w, i, o = hwio_or_io_shape
    return (o, i, h, w)
  if key == "fc.weight":  # (in, out) -> (out, in)
    return tuple(reversed(hwio_or_io_shape))
  return tuple(hwio_or_io_shape)


def expected_state_dict_shapes() -> dict[str, tuple]:
  """Every key of the pytorch-fid state dict (num_batches_tracked excluded) with its PyTorch-layout shape."""
  _, state = nnx.split(abstract_inception())
  return {_torch_key(path): _torch_layout(_torch_key(path), v.shape) for path, v in nnx.to_flat_state(state)}


def state_dict_to_model(state_dict: dict[str, np.ndarray], compute_dtype=jnp.float32,
                        source: str = "state dict") -> InceptionV3FID:
  """Build the network from a pytorch-fid state dict (PyTorch layouts), checking keys and shapes strictly.

  `*.num_batches_tracked` entries are ignored. Every missing key, unexpected key and shape mismatch is collected
  and reported in ONE ValueError, so a wrong file is diagnosed in one go.
  """
  graphdef, state = nnx.split(abstract_inception(compute_dtype))
  flat = list(nnx.to_flat_state(state))
  given = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
  problems, values = [], {}
  expected_keys = set()
  for path, var in flat:
    key = _torch_key(path)
    expected_keys.add(key)
    want = _torch_layout(key, var.shape)
    if key not in given:
      problems.append(f"missing key {key} (expected shape {want})")
      continue
    arr = np.asarray(given[key])
    if tuple(arr.shape) != want:
      problems.append(f"{key}: shape {tuple(arr.shape)}, expected {want}")
      continue
    if not np.issubdtype(arr.dtype, np.floating):
      problems.append(f"{key}: dtype {arr.dtype}, expected a float tensor")
      continue
    if key.endswith("conv.weight"):
      arr = arr.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    elif key == "fc.weight":
      arr = arr.T
    values[path] = arr.astype(np.float32)
  problems += [f"unexpected key {k} (shape {tuple(np.shape(given[k]))})" for k in sorted(set(given) - expected_keys)]
  if problems:
    raise ValueError(f"{source} is not a pytorch-fid FID Inception-v3 state dict "
                     f"({len(problems)} problem(s); expected the 472 keys of {WEIGHTS_FILENAME}):\n  "
                     + "\n  ".join(problems))
  for path, var in flat:
    var.set_value(jnp.asarray(values[path]))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def resolve_weights_path(path: str | os.PathLike | None = None) -> pathlib.Path:
  """The Inception weight file: `path` if given, else $VARJAX_INCEPTION_WEIGHTS. Never downloads."""
  path = path or os.environ.get(WEIGHTS_ENV_VAR)
  if not path:
    raise FileNotFoundError(
      f"no Inception weights given: pass --inception_weights=/path/to/{WEIGHTS_FILENAME} or set "
      f"{WEIGHTS_ENV_VAR}. Download it once by hand from {WEIGHTS_ORIGIN} (sha256 starts with 6726825d); "
      "this code never downloads.")
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise FileNotFoundError(f"Inception weights file {path} does not exist; pass --inception_weights or set "
                            f"{WEIGHTS_ENV_VAR} to the local copy of {WEIGHTS_FILENAME} ({WEIGHTS_ORIGIN})")
  return path


def load_inception_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Read the state dict from a `.pth` (zip or legacy torch container, optionally gzipped) or a `.npz`."""
  path = pathlib.Path(path)
  if path.suffix == ".npz":
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  from tokenizer.torch_pth import load_pth  # torch-free restricted unpickler

  return load_pth(path)


def check_weights_hash(path: str | os.PathLike) -> None:
  """Warn if a file named like the official weights does not have their sha256 prefix (6726825d)."""
  path = pathlib.Path(path)
  if path.name != WEIGHTS_FILENAME:
    return
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      digest.update(chunk)
  if not digest.hexdigest().startswith(WEIGHTS_SHA256_PREFIX):
    warnings.warn(f"{path}: sha256 {digest.hexdigest()[:16]}... does not start with {WEIGHTS_SHA256_PREFIX}; this "
                  f"is not the official pytorch-fid file ({WEIGHTS_ORIGIN}), FIDs will not be comparable",
                  stacklevel=2)


def load_inception(path: str | os.PathLike | None = None, compute_dtype=jnp.float32) -> InceptionV3FID:
  """Load the FID Inception-v3 from `path` (or $VARJAX_INCEPTION_WEIGHTS); see `state_dict_to_model`."""
  path = resolve_weights_path(path)
  check_weights_hash(path)
  return state_dict_to_model(load_inception_state_dict(path), compute_dtype, source=str(path))
