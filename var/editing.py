"""Zero-shot in-painting, out-painting and class-conditional editing (VAR.md section 5, `demo_zero_shot_edit`).

The sampler is given the tokens of a real image and a keep mask on the P x P latent grid (1 = keep the image's
tokens, 0 = generate). After sampling scale si the mask is resized to pn x pn with torch's bilinear interpolation
(align_corners=False), thresholded at > 0.5 (scales with pn^2 <= 3 keep everything), and the kept positions take
the given tokens (and their embeddings), so they teacher-force every later scale. The label picks the mode:
num_classes (the null class) = pure in/out-painting, 0..num_classes-1 = class-conditional editing.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def box_mask(size: int, box: Sequence[float], keep_inside: bool = True) -> np.ndarray:
  """(size, size) float32 mask from a box (y0, x0, y1, x1) in [0, 1] image fractions (the notebook's helper:
  rows round(y0 P)..round(y1 P), cols round(x0 P)..round(x1 P) set to 1); keep_inside=False inverts it."""
  y0, x0, y1, x1 = (float(v) for v in box)
  if not (0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1):
    raise ValueError(f"box {tuple(box)} must be (y0, x0, y1, x1) with 0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1")
  m = np.zeros((size, size), np.float32)
  m[round(y0 * size):round(y1 * size), round(x0 * size):round(x1 * size)] = 1.0
  return m if keep_inside else 1.0 - m


def outpaint_mask(size: int, box: Sequence[float]) -> np.ndarray:
  """Keep the image inside the box, generate around it."""
  return box_mask(size, box, keep_inside=True)


def inpaint_mask(size: int, box: Sequence[float]) -> np.ndarray:
  """Generate inside the box, keep the rest of the image."""
  return box_mask(size, box, keep_inside=False)


@functools.cache
def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) torch `F.interpolate(mode='bilinear', align_corners=False)` weights along one axis
  (source index (o + 0.5) n_in / n_out - 0.5, clamped at 0; right tap clamped to n_in - 1)."""
  mat = np.zeros((n_out, n_in), np.float64)
  scale = n_in / n_out
  for o in range(n_out):
    src = max((o + 0.5) * scale - 0.5, 0.0)
    i0 = min(int(np.floor(src)), n_in - 1)
    i1 = min(i0 + 1, n_in - 1)
    w1 = src - i0
    mat[o, i0] += 1.0 - w1
    mat[o, i1] += w1
  return mat.astype(np.float32)


def scale_keep_mask(mask: jax.Array, pn: int) -> jax.Array:
  """(B, P, P) keep mask -> (B, pn, pn) bool for scale side pn (all True when pn^2 <= 3, as in the notebook)."""
  b, p = mask.shape[0], mask.shape[-1]
  if pn * pn <= 3:
    return jnp.ones((b, pn, pn), bool)
  mat = jnp.asarray(bilinear_matrix(p, pn))
  resized = jnp.einsum("oh,bhw,pw->bop", mat, mask.astype(jnp.float32), mat, precision=jax.lax.Precision.HIGHEST)
  return resized > 0.5


@nnx.jit
def _tokenize(vae, images: jax.Array) -> jax.Array:
  return jnp.concatenate(vae.img_to_idx(images), axis=1)  # (B, L)


def edit_inputs(vae, images: jax.Array, mask: np.ndarray) -> dict[str, jax.Array]:
  """Sampler edit inputs from images (B, H, W, 3) in [-1, 1] and a mask (P, P) or (B, P, P):
  {'tokens': (B, L) int32 (the image's multi-scale tokens), 'mask': (B, P, P) float32}."""
  tokens = _tokenize(vae, images)
  b, p = images.shape[0], vae.config.patch_nums[-1]
  mask = np.asarray(mask, np.float32)
  if mask.shape[-2:] != (p, p):
    raise ValueError(f"edit mask must be (P, P) = ({p}, {p}) latent cells (or (B, P, P)), got {mask.shape}")
  return {"tokens": tokens.astype(jnp.int32), "mask": jnp.asarray(np.broadcast_to(mask, (b, p, p)))}
