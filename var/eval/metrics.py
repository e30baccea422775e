"""FID, sFID, Inception Score and precision/recall from Inception features, with the ADM evaluator's semantics.

Statistics and the Frechet distance run on the host in numpy/scipy float64 (specs/FID.md section 5), exactly the
TTUR / pytorch-fid / ADM function including its sqrtm edge cases. Precision/recall (Kynkaanniemi et al. 2019, k=3,
ADM's ManifoldEstimator) run blockwise in jitted JAX so 50k x 50k distance matrices never exist at once.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
import scipy.special

__all__ = [
  "feature_statistics",
  "frechet_distance",
  "inception_score",
  "manifold_radii",
  "precision_recall",
]


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(N, D) features -> (mu (D,), sigma (D, D)), float64, unbiased covariance (np.cov, N-1).

  Warns when N <= D: the covariance is then singular (rank < D). The FID is still computed (as ADM and
  pytorch-fid do) but is biased and not comparable with a 50k-sample FID.
  """
  features = np.asarray(features, np.float64)
  if features.ndim != 2:
    raise ValueError(f"features must be (N, D), got shape {features.shape}")
  n, d = features.shape
  if n < 2:
    raise ValueError(f"need at least 2 feature vectors for a covariance, got {n}")
  if n <= d:
    warnings.warn(f"only {n} samples for {d}-dimensional features: the covariance is singular (rank <= {n - 1}); "
                  "the FID is still computed, but use >= 10k (standard: 50k) samples for meaningful numbers",
                  stacklevel=2)
  return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr(sqrtm(S1 S2)), in float64 (the TTUR / ADM / pytorch-fid function).

  Edge cases as in the reference: if sqrtm yields non-finite values, retry with `eps` added to both diagonals;
  a complex result is accepted (real part kept) only if its diagonal's imaginary part is within 1e-3. The result
  is not clamped, so it can be slightly negative for identical statistics.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape:
    raise ValueError(f"mean vectors have different lengths: {mu1.shape} vs {mu2.shape} (different feature types?)")
  if sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f"covariances {sigma1.shape}, {sigma2.shape} do not match the means {mu1.shape}")
  diff = mu1 - mu2
  covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates",
                  stacklevel=2)
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      m = np.max(np.abs(covmean.imag))
      raise ValueError(f"sqrtm(sigma1 @ sigma2) has a large imaginary component {m}: the statistics are "
                       "numerically broken (NaN/inf features or far too few samples)")
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits, split_size: int | None = 5000, splits: int | None = None,
                    shuffle_seed: int | None = None) -> tuple[float, float]:
  """Inception Score (mean, std over splits) from the classifier logits WITHOUT bias (`logits_unbiased`).

  Default = ADM: consecutive chunks of `split_size` rows (50k -> 10 chunks; the last may be shorter), each scored
  exp(mean_x KL(p(y|x) || p(y))), IS = mean over chunks. torch-fidelity's variant: `split_size=None, splits=10,
  shuffle_seed=2020` (rows permuted by np.random.RandomState(seed), chunk i = rows [i*N//splits, (i+1)*N//splits)).
  Computed with log-softmax in float64, so underflowing probabilities give 0 * finite instead of NaN.
  """
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2 or logits.shape[0] == 0:
    raise ValueError(f"logits must be a non-empty (N, classes) array, got shape {logits.shape}")
  n = logits.shape[0]
  if shuffle_seed is not None:
    logits = logits[np.random.RandomState(shuffle_seed).permutation(n)]
  if (split_size is None) == (splits is None):
    raise ValueError(f"give exactly one of split_size (ADM) and splits (torch-fidelity), got {split_size}, {splits}")
  if splits is not None:
    bounds = [(i * n // splits, (i + 1) * n // splits) for i in range(splits)]
  else:
    bounds = [(b, min(b + split_size, n)) for b in range(0, n, split_size)]
  log_p = scipy.special.log_softmax(logits, axis=1)  # (N, classes)
  scores = []
  for b, e in bounds:
    lp = log_p[b:e]
    log_py = scipy.special.logsumexp(lp, axis=0) - np.log(e - b)  # log of the marginal p(y) over the chunk
    kl = np.sum(np.exp(lp) * (lp - log_py), axis=1)  # (chunk,)
    scores.append(np.exp(np.mean(kl)))
  return float(np.mean(scores)), float(np.std(scores))


# ---------------------------------------------------------------------------------------------------------------
# Precision / recall: k-NN manifolds, blockwise.


@functools.partial(jax.jit, static_argnames=("dtype",))
def _sq_dists(a, b, dtype):
  """Squared Euclidean distances (A, B) = max(|a|^2 - 2 a.b + |b|^2, 0), as ADM computes them."""
  a, b = a.astype(dtype), b.astype(dtype)
  ab = jnp.dot(a, b.T, precision=jax.lax.Precision.HIGHEST)
  return jnp.maximum(jnp.sum(a * a, 1)[:, None] - 2 * ab + jnp.sum(b * b, 1)[None, :], 0)


@functools.partial(jax.jit, static_argnames=("k", "dtype"))
def _block_smallest(rows, cols, valid, best, k, dtype):
  """Merge the k+1 smallest distances from rows to this column block (invalid padding columns = +inf)."""
  d = jnp.where(valid[None, :], _sq_dists(rows, cols, dtype), jnp.inf)
  neg, _ = jax.lax.top_k(-jnp.concatenate([best, d], axis=1), k + 1)
  return -neg


@functools.partial(jax.jit, static_argnames=("dtype",))
def _block_inside(rows, cols, valid, col_radii, dtype):
  """For each row: is it within (<=) the radius of some valid column point."""
  d = _sq_dists(rows, cols, dtype)
  return jnp.any((d <= col_radii[None, :]) & valid[None, :], axis=1)


def _blocks(x: np.ndarray, block: int):
  """Yield (start, padded block (block, D), valid mask (block,)) so every jitted call has one shape."""
  for s in range(0, len(x), block):
    part = x[s:s + block]
    valid = np.zeros((block,), bool)
    valid[:len(part)] = True
    if len(part) < block:
      part = np.concatenate([part, np.zeros((block - len(part), x.shape[1]), x.dtype)])
    yield s, part, valid


def _center(*sets):
  # Distances are translation invariant; centering keeps |a|^2 - 2ab + |b|^2 from cancelling badly in float32.
  mean = np.mean(sets[0], axis=0, dtype=np.float64)
  return [np.asarray(s, np.float64) - mean for s in sets]


def manifold_radii(features: np.ndarray, k: int = 3, block: int = 10000, dtype=jnp.float32,
                   _centered: bool = False) -> np.ndarray:
  """Squared distance of every point to its k-th nearest neighbour in its own set (the point itself is index 0).

  Memory is O(block * block): rows and columns are processed in blocks, keeping a running k+1 smallest per row.
  """
  features = np.asarray(features)
  n = len(features)
  if n <= k:
    raise ValueError(f"need more than k={k} points for k-NN radii, got {n}")
  if not _centered:
    (features,) = _center(features)
  block = min(block, n)
  feats = features.astype(np.dtype(dtype))
  radii = np.empty((n,), np.float64)
  for rs, rows, _ in _blocks(feats, block):
    best = jnp.full((block, k + 1), jnp.inf, dtype)
    for _, cols, valid in _blocks(feats, block):
      best = _block_smallest(rows, cols, valid, best, k, dtype)
    radii[rs:rs + block] = np.asarray(best[:, k])[:min(block, n - rs)]
  return radii


def _inside_any(points, balls, ball_radii, block, dtype) -> np.ndarray:
  points, balls = points.astype(np.dtype(dtype)), balls.astype(np.dtype(dtype))
  radii = ball_radii.astype(np.dtype(dtype))
  block_r, block_c = min(block, len(points)), min(block, len(balls))
  status = np.zeros((len(points),), bool)
  for rs, rows, _ in _blocks(points, block_r):
    hit = jnp.zeros((block_r,), bool)
    for cs, cols, valid in _blocks(balls, block_c):
      r = np.zeros((block_c,), radii.dtype)
      r[:valid.sum()] = radii[cs:cs + block_c]
      hit = hit | _block_inside(rows, cols, valid, r, dtype)
    status[rs:rs + block_r] = np.asarray(hit)[:min(block_r, len(points) - rs)]
  return status


def precision_recall(ref_features: np.ndarray, sample_features: np.ndarray, k: int = 3, block: int = 10000,
                     dtype=jnp.float32) -> tuple[float, float]:
  """Improved precision and recall (k-NN manifolds, ADM's ManifoldEstimator with nhood 3).

  precision = fraction of samples inside some reference ball; recall = fraction of reference points inside some
  sample ball. A ball is centred on a point with the squared distance to its k-th neighbour as radius ("<=").
  ADM computes distances in float16 (with a float32 retry); here float32 by default on centred features.
  """
  ref, sample = _center(np.asarray(ref_features), np.asarray(sample_features))
  if ref.shape[1] != sample.shape[1]:
    raise ValueError(f"feature dims differ: ref {ref.shape} vs samples {sample.shape}")
  radii_ref = manifold_radii(ref, k, block, dtype, _centered=True)
  radii_sample = manifold_radii(sample, k, block, dtype, _centered=True)
  precision = _inside_any(sample, ref, radii_ref, block, dtype).mean()
  recall = _inside_any(ref, sample, radii_sample, block, dtype).mean()
  return float(precision), float(recall)
