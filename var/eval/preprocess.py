"""Image preprocessing for the FID Inception: uint8 NHWC at any size -> float32 (B, 299, 299, 3) in about [-1, 1].

Two modes (specs/FID.md section 2), both plain bilinear without antialiasing, implemented as exact interpolation
matrices for the static sizes (two taps per output pixel, weights computed in float32 the way each library does):

  * "adm" (default; also called "tf1"): what the ADM evaluator's TF graph does, and so what published ImageNet FIDs
    use. TF1 legacy ResizeBilinear (align_corners=False, no half-pixel centres): src = i * float32(in/299), then
    (x - 128) / 128.
  * "pytorch_fid": pytorch-fid's pipeline. x/255 in float32 (ToTensor), F.interpolate(bilinear,
    align_corners=False): src = max((i + 0.5) * in/299 - 0.5, 0), then 2x - 1.

A 299x299 input is passed through unresized in both modes (both resizes are then the identity).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["INCEPTION_SIZE", "MODES", "canonical_mode", "preprocess", "resize_matrix", "validate_images"]

INCEPTION_SIZE = 299
MODES = ("adm", "pytorch_fid")
_ALIASES = {"adm": "adm", "tf1": "adm", "pytorch_fid": "pytorch_fid", "pytorch-fid": "pytorch_fid"}


def canonical_mode(mode: str) -> str:
  """'adm' / 'tf1' -> 'adm'; 'pytorch_fid' / 'pytorch-fid' -> 'pytorch_fid'; anything else is an error."""
  if mode not in _ALIASES:
    raise ValueError(f"unknown preprocessing mode {mode!r}: use 'adm' (TF1 resize, (x-128)/128; ADM evaluator "
                     "parity, the default) or 'pytorch_fid' (half-pixel bilinear on x/255, then 2x-1)")
  return _ALIASES[mode]


@functools.lru_cache(maxsize=32)
def resize_matrix(in_size: int, out_size: int, mode: str) -> np.ndarray:
  """(out_size, in_size) float32 bilinear interpolation matrix of one axis; row i holds the two taps of pixel i."""
  mode = canonical_mode(mode)
  i = np.arange(out_size, dtype=np.float32)
  scale = np.float32(in_size) / np.float32(out_size)  # both libraries compute the scale in float32
  if mode == "adm":
    src = i * scale  # TF1 legacy: no half-pixel offset, never negative
  else:
    src = np.maximum((i + np.float32(0.5)) * scale - np.float32(0.5), np.float32(0.0))
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  w1 = (src - i0.astype(np.float32)).astype(np.float32)
  w0 = (np.float32(1.0) - w1).astype(np.float32)
  m = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  np.add.at(m, (rows, i0), w0)
  np.add.at(m, (rows, i1), w1)
  return m


def validate_images(images, what: str = "images") -> None:
  """Raise a ValueError naming the problem unless `images` is a non-empty uint8 (N, H, W, 3) array."""
  shape, dtype = tuple(np.shape(images)), getattr(images, "dtype", None)
  if len(shape) != 4:
    raise ValueError(f"{what}: expected a uint8 NHWC array (N, H, W, 3), got shape {shape}")
  if shape[0] == 0:
    raise ValueError(f"{what}: empty input (shape {shape}); FID needs at least 2 images")
  if shape[-1] != 3:
    hint = " (looks like NCHW: transpose with x.transpose(0, 2, 3, 1))" if shape[1] == 3 else ""
    hint = hint or (" (grayscale/RGBA: convert to RGB first)" if shape[-1] in (1, 4) else "")
    raise ValueError(f"{what}: expected 3 RGB channels last (N, H, W, 3), got shape {shape}{hint}")
  if dtype != np.uint8:
    raise ValueError(f"{what}: expected dtype uint8 (0..255, as sample.py writes arr_0), got {dtype}; convert "
                     "floats in [-1, 1] with np.clip((x + 1) * 127.5, 0, 255).astype(np.uint8)")


def preprocess(images: jax.Array, mode: str = "adm") -> jax.Array:
  """uint8 (B, H, W, 3) -> float32 (B, 299, 299, 3) network input, in the given mode. Traceable under jit."""
  mode = canonical_mode(mode)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"expected NHWC (B, H, W, 3) images, got shape {images.shape}")
  x = images.astype(jnp.float32)  # (B, H, W, 3) in 0..255
  if mode == "pytorch_fid":
    x = x / jnp.float32(255.0)  # ToTensor: float32 division, before the resize
  _, h, w, _ = images.shape
  hi = jax.lax.Precision.HIGHEST  # two-tap weighted sums must stay exact float32
  if w != INCEPTION_SIZE:
    x = jnp.einsum("pw,bhwc->bhpc", resize_matrix(w, INCEPTION_SIZE, mode), x, precision=hi)
  if h != INCEPTION_SIZE:
    x = jnp.einsum("oh,bhpc->bopc", resize_matrix(h, INCEPTION_SIZE, mode), x, precision=hi)
  if mode == "pytorch_fid":
    return 2.0 * x - 1.0
  return (x - 128.0) * jnp.float32(1.0 / 128.0)  # the graph's Sub 128 then Mul 0.0078125 (exact)
