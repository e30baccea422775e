"""Exact torch `F.interpolate` resampling ('area' and 'bicubic') as static separable matrices.

The VQVAE quantizer moves feature maps between the latent side P and each scale pn with
`F.interpolate(mode='area')` (down) and `F.interpolate(mode='bicubic', align_corners=False)` (up).
`jax.image.resize` matches neither (different cubic coefficient and edge handling), so both are built here
as (n_out, n_in) matrices in float64 numpy for the static sizes and applied separably to NHWC maps with one
einsum.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

_CUBIC_A = -0.75  # torch's cubic-convolution coefficient (upsample_bicubic2d)


@functools.cache
def area_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) float64 matrix of torch 'area' resizing (= adaptive average pooling) along one axis.

  Output i averages inputs [floor(i * n_in / n_out), ceil((i + 1) * n_in / n_out)); windows overlap when
  n_in / n_out is not an integer.
  """
  _check_sizes(n_in, n_out)
  m = np.zeros((n_out, n_in), np.float64)
  for i in range(n_out):
    start = (i * n_in) // n_out
    end = -((-(i + 1) * n_in) // n_out)  # integer ceil, as torch's adaptive pooling index arithmetic
    m[i, start:end] = 1.0 / (end - start)
  m.setflags(write=False)
  return m


def _cubic_weights(t: float) -> tuple[float, float, float, float]:
  """The 4 tap weights of torch's cubic convolution (A = -0.75) at fractional offset t in [0, 1)."""
  a = _CUBIC_A
  x1 = t + 1.0
  w_m1 = ((a * x1 - 5.0 * a) * x1 + 8.0 * a) * x1 - 4.0 * a
  w_0 = ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0
  x2 = 1.0 - t
  w_1 = ((a + 2.0) * x2 - (a + 3.0)) * x2 * x2 + 1.0
  x3 = 2.0 - t
  w_2 = ((a * x3 - 5.0 * a) * x3 + 8.0 * a) * x3 - 4.0 * a
  return w_m1, w_0, w_1, w_2


@functools.cache
def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) float64 matrix of torch 'bicubic' resizing (align_corners=False) along one axis.

  Source coordinate s = (o + 0.5) * n_in / n_out - 0.5 (not clamped), taps floor(s) - 1 .. floor(s) + 2 with
  the A = -0.75 cubic weights; tap indices are clamped to [0, n_in - 1] (border replication), so clamped taps
  add up on the border row.
  """
  _check_sizes(n_in, n_out)
  m = np.zeros((n_out, n_in), np.float64)
  scale = n_in / n_out
  for o in range(n_out):
    s = (o + 0.5) * scale - 0.5
    i0 = math.floor(s)
    for k, w in zip(range(i0 - 1, i0 + 3), _cubic_weights(s - i0), strict=True):
      m[o, min(max(k, 0), n_in - 1)] += w
  m.setflags(write=False)
  return m


def _check_sizes(n_in: int, n_out: int):
  if int(n_in) != n_in or int(n_out) != n_out or n_in < 1 or n_out < 1:
    raise ValueError(f"resampling sizes must be positive integers, got n_in={n_in!r}, n_out={n_out!r}")


def _apply(x: jax.Array, mat: np.ndarray) -> jax.Array:
  """Applies the same (n_out, n_in) matrix along H and W of an NHWC map.

  Full precision: torch resamples in exact float32 arithmetic, and TF32/bf16 matmul passes (the GPU/TPU
  default) would perturb the quantizer's residuals enough to flip tokens. The maps are small, so this costs
  little.
  """
  m = jnp.asarray(mat, dtype=x.dtype)
  return jnp.einsum("oh,bhwc,pw->bopc", m, x, m, precision=jax.lax.Precision.HIGHEST)  # (B, n_out, n_out, C)


def _square_side(x: jax.Array) -> int:
  if x.ndim != 4 or x.shape[1] != x.shape[2]:
    raise ValueError(f"expected a square NHWC map (B, n, n, C), got shape {x.shape}")
  return x.shape[1]


def area_resize(x: jax.Array, size: int) -> jax.Array:
  """torch `F.interpolate(x, size=(size, size), mode='area')` on a square NHWC map (B, n, n, C).

  Identity (the same array) when size equals the input side, as in torch.
  """
  n = _square_side(x)
  if n == size:
    return x
  return _apply(x, area_matrix(n, size))


def bicubic_resize(x: jax.Array, size: int) -> jax.Array:
  """torch `F.interpolate(x, size=(size, size), mode='bicubic', align_corners=False)` on NHWC (B, n, n, C)."""
  n = _square_side(x)
  if n == size:
    return x
  return _apply(x, bicubic_matrix(n, size))
