"""Frechet distance, Inception Score and precision/recall against fixtures/fid (torch-fid / torch-fidelity)."""

import warnings

import numpy as np
import pytest
import scipy.linalg

from var.eval import metrics

CASES = ["wellcond", "identical", "rankdef", "tinyn"]


@pytest.fixture(scope="module")
def frechet(shared_dir):
  with np.load(shared_dir / "fixtures" / "fid" / "frechet.npz") as z:
    return {k: z[k] for k in z.files}


@pytest.mark.parametrize("case", CASES)
def test_statistics_match_numpy_reference(frechet, case):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # rankdef / tinyn have N <= D (tested below)
    mu, sigma = metrics.feature_statistics(frechet[f"{case}_feats1"])
  np.testing.assert_allclose(mu, frechet[f"{case}_mu1"], rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(sigma, frechet[f"{case}_sigma1"], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("case", CASES)
def test_frechet_distance_matches_pytorch_fid(frechet, case):
  c = {k: frechet[f"{case}_{k}"] for k in ("mu1", "sigma1", "mu2", "sigma2")}
  fd = metrics.frechet_distance(c["mu1"], c["sigma1"], c["mu2"], c["sigma2"])
  want = float(frechet[f"{case}_fid"])
  if case == "identical":
    # True value 0; both implementations return float64 round-off (fixture 1.9e-11) of terms of size tr(S) ~ 1e2.
    scale = np.trace(c["sigma1"]) + np.trace(c["sigma2"])
    assert abs(fd - want) <= 1e-6 * 1e-6 * scale, (fd, want, scale)
  else:
    assert abs(fd - want) <= 1e-6 * abs(want), (fd, want)


def test_frechet_eps_retry_when_sqrtm_not_finite(frechet, monkeypatch):
  calls = []
  real_sqrtm = scipy.linalg.sqrtm

  def flaky_sqrtm(a, *args, **kw):  # first call non-finite, as on a singular product
    calls.append(a.copy())
    return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a, *args, **kw)

  monkeypatch.setattr(scipy.linalg, "sqrtm", flaky_sqrtm)
  c = {k: frechet[f"wellcond_{k}"] for k in ("mu1", "sigma1", "mu2", "sigma2")}
  with pytest.warns(UserWarning, match="adding 1e-06 to diagonal"):
    fd = metrics.frechet_distance(c["mu1"], c["sigma1"], c["mu2"], c["sigma2"])
  eye = np.eye(len(c["mu1"])) * 1e-6
  np.testing.assert_allclose(calls[1], (c["sigma1"] + eye) @ (c["sigma2"] + eye), rtol=1e-15)
  # As in TTUR/ADM: covmean from the offset matrices, but the traces of the ORIGINAL covariances.
  monkeypatch.setattr(scipy.linalg, "sqrtm", real_sqrtm)
  want = metrics.frechet_distance(c["mu1"], c["sigma1"] + eye, c["mu2"], c["sigma2"] + eye) - 2 * np.trace(eye)
  assert fd == pytest.approx(want, rel=1e-9)


def test_frechet_complex_sqrtm():
  # sqrtm(-I) = iI: an imaginary diagonal far above 1e-3 must raise, not be silently dropped.
  with pytest.raises(ValueError, match="imaginary component"):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), -np.eye(3))


def test_frechet_rejects_mismatched_dims():
  with pytest.raises(ValueError, match="different lengths"):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_singular_covariance_warns_but_computes(frechet):
  with pytest.warns(UserWarning, match="covariance is singular"):
    mu, sigma = metrics.feature_statistics(frechet["tinyn_feats1"])
  assert np.isfinite(sigma).all() and np.linalg.matrix_rank(sigma) == 4


@pytest.fixture(scope="module")
def isc(shared_dir):
  with np.load(shared_dir / "fixtures" / "fid" / "inception_score.npz") as z:
    return {k: z[k] for k in z.files}


def test_inception_score_adm(isc):
  mean, std = metrics.inception_score(isc["logits"], split_size=40)
  np.testing.assert_allclose(mean, isc["is_split40_mean"], rtol=1e-10)
  np.testing.assert_allclose(std, isc["is_split40_std"], rtol=1e-10)


@pytest.mark.parametrize("shuffle", [None, 2020])
def test_inception_score_torch_fidelity(isc, shuffle):
  name = "shuffle2020" if shuffle else "noshuffle"
  mean, std = metrics.inception_score(isc["logits"], split_size=None, splits=5, shuffle_seed=shuffle)
  np.testing.assert_allclose(mean, isc[f"torchfidelity_splits5_{name}_mean"], rtol=1e-10)
  np.testing.assert_allclose(std, isc[f"torchfidelity_splits5_{name}_std"], rtol=1e-10)


def test_inception_score_survives_underflow():
  logits = np.zeros((4, 10))
  logits[:, 0] = 2000.0  # p = exp(-2000) underflows to 0 in the other classes: a naive p*log p gives NaN
  mean, _ = metrics.inception_score(logits, split_size=5000)
  assert mean == pytest.approx(1.0)


@pytest.fixture(scope="module")
def pr(shared_dir):
  with np.load(shared_dir / "fixtures" / "fid" / "precision_recall.npz") as z:
    return {k: z[k] for k in z.files}


@pytest.mark.parametrize("block", [10000, 64])  # one block, and several padded row/column blocks
def test_manifold_radii(pr, block):
  np.testing.assert_allclose(metrics.manifold_radii(pr["ref"], block=block), pr["radii_ref"], rtol=1e-5)
  np.testing.assert_allclose(metrics.manifold_radii(pr["sample"], block=block), pr["radii_sample"], rtol=1e-5)


@pytest.mark.parametrize("block", [10000, 37])
def test_precision_recall(pr, block):
  precision, recall = metrics.precision_recall(pr["ref"], pr["sample"], block=block)
  assert precision == pytest.approx(float(pr["precision"]), abs=1e-12)  # 0.128 = 32 / 250
  assert recall == pytest.approx(float(pr["recall"]), abs=1e-12)  # 0.99 = 297 / 300
  # Swapping the sets swaps the roles.
  assert metrics.precision_recall(pr["sample"], pr["ref"], block=block) == pytest.approx((recall, precision))
