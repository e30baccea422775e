"""var.eval.digits_quality: the judge of generated digits used by `make demo`."""

import numpy as np
import pytest

from var import data
from var.eval import digits_quality as dq

R = 16


@pytest.fixture(scope="module")
def judge():
  return dq.DigitsJudge.train(R, seed=0)


@pytest.fixture(scope="module")
def real():
  test_images, test_labels = data.digits_images("test", R)
  train_images, _ = data.digits_images("train", R)
  return test_images.astype(np.float32) / 127.5 - 1.0, test_labels, train_images.astype(np.float32) / 255.0


def test_judge_is_accurate_on_real_heldout_digits(judge, real):
  images, labels, _ = real
  assert judge.test_accuracy >= 0.95
  assert judge.accuracy(images, labels) == pytest.approx(judge.test_accuracy)
  # NHWC with 1 channel and [0, 1] values read the same
  assert judge.accuracy((images[..., :1] + 1) / 2, labels) == pytest.approx(judge.test_accuracy)


def test_shuffled_labels_give_chance_accuracy(judge, real):
  images, labels, _ = real
  shuffled = np.random.default_rng(0).permutation(labels)
  assert 0.03 < judge.accuracy(images, shuffled) < 0.2


def test_frechet_distance_separates_real_from_noise(judge, real):
  images, _, train01 = real
  fd_real = judge.frechet_distance(train01)  # real training digits ([0, 1]) vs real held-out
  noise = np.random.default_rng(0).uniform(-1, 1, images.shape).astype(np.float32)
  fd_noise = judge.frechet_distance(noise)
  assert fd_real < 5.0
  assert fd_noise > 50 * fd_real
  assert judge.frechet_distance(images) == pytest.approx(0.0, abs=1e-6)  # held-out vs itself


def test_judge_matches_the_generators_crop_view_and_is_deterministic():
  # A generator trained with crop_scale=1.125 learns randomly cropped, enlarged digits: real held-out digits seen
  # that way (other crops than the judge's reference) must score as real data does.
  a = dq.DigitsJudge.train(R, seed=1, crop_scale=1.125, epochs=40)
  b = dq.DigitsJudge.train(R, seed=1, crop_scale=1.125, epochs=40)
  np.testing.assert_array_equal(a.test_features, b.test_features)
  assert a.test_accuracy == b.test_accuracy >= 0.9
  images, labels = data.digits_images("test", R)
  crop, rng = data.TrainAugment(R, 1.125), np.random.default_rng(123)
  views = np.stack([crop.random_map({"image": im, "label": 0}, rng)["image"] for im in images])
  report = a.report(views, labels)
  assert report["crop_scale"] == 1.125
  assert report["accuracy"] >= 0.9
  assert report["fd"] < 2 * report["fd_real_same_n"]


def test_report(judge, real):
  images, labels, _ = real
  good = judge.report(images[:120], labels[:120])
  assert good["num_images"] == 120 and good["resolution"] == R
  assert good["accuracy"] >= 0.9 and good["judge_test_accuracy"] == judge.test_accuracy
  assert len(good["per_class_accuracy"]) == 10
  # a subset of the held-out set sits at the distance of an equally large real sample, far below noise
  assert good["fd"] < 2 * good["fd_real_same_n"]
  assert good["fd_real_train"] < good["fd_real_same_n"]  # more samples, less FD bias
  blurred = np.full_like(images[:120], images[:120].mean())
  bad = judge.report(blurred, labels[:120])
  assert bad["fd"] > 10 * good["fd"] and bad["accuracy"] < 0.3


def test_frechet_distance_formula():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(4000, 3))
  b = rng.normal(size=(4000, 3)) * 2.0 + 1.0
  # N(0, I) vs N(1, 4I): |mu|^2 = 3, trace term 3 * (1 + 4 - 2 * 2) = 3
  assert dq.frechet_distance_from_stats(*dq.gaussian_stats(a), *dq.gaussian_stats(b)) == pytest.approx(6.0, rel=0.05)
  s = np.diag([1.0, 0.0, 2.0])  # singular covariances take the regularised path
  assert dq.frechet_distance_from_stats(np.zeros(3), s, np.zeros(3), s) == pytest.approx(0.0, abs=1e-4)


def test_input_errors(judge, real):
  images, labels, _ = real
  with pytest.raises(ValueError, match="trained at 16x16"):
    judge.accuracy(np.zeros((2, 32, 32, 3), np.float32), [0, 1])
  with pytest.raises(ValueError, match="pass the right value_range"):
    judge.accuracy(images[:4] * 127.5 + 127.5, labels[:4], value_range="[-1,1]")
  with pytest.raises(ValueError, match="not NHWC"):
    judge.accuracy(images[:4, :, :, 0], labels[:4])
  with pytest.raises(ValueError, match="4 images but 3 labels"):
    judge.accuracy(images[:4], labels[:3])
  with pytest.raises(ValueError, match="multiple of 8"):
    dq.DigitsJudge.train(12)


# ------------------------------------------------------------------------------------------------------------
# The plain quality functions, against independent numpy / scipy references
# ------------------------------------------------------------------------------------------------------------


def test_to_grid8_is_the_area_average_in_grey_levels():
  rng = np.random.default_rng(0)
  images = rng.uniform(0, 1, (3, 16, 16, 3)).astype(np.float32)  # the judge's own input precision
  ref = np.zeros((3, 8, 8))
  for n in range(3):  # explicit loops over the 2x2 blocks and the channels
    for i in range(8):
      for j in range(8):
        ref[n, i, j] = images[n, 2 * i:2 * i + 2, 2 * j:2 * j + 2, :].astype(np.float64).sum() / 12.0 * 16.0
  np.testing.assert_allclose(dq.to_grid8(images), ref.reshape(3, 64), rtol=1e-6)  # float32 inputs
  # the real digits, nearest-upsampled to 32px and stored as uint8, come back as their UCI grey levels
  # (to within the uint8 rounding of level * 255 / 16)
  images, _ = data.digits_images("test", 32)
  levels, _ = dq.real_grid8("test")
  np.testing.assert_allclose(dq.to_grid8(images, "uint8"), levels, atol=16 / 255 / 2 + 1e-9)
  with pytest.raises(ValueError, match="multiple of 8"):
    dq.to_grid8(np.zeros((1, 12, 12, 3)))


def test_frechet_distance_matches_an_eigenvalue_reference():
  rng = np.random.default_rng(1)
  a = rng.normal(size=(300, 5)) @ rng.normal(size=(5, 5))
  b = rng.normal(size=(200, 5)) @ rng.normal(size=(5, 5)) + 0.5
  mu_a, mu_b = a.sum(0) / len(a), b.sum(0) / len(b)
  cov_a = (a - mu_a).T @ (a - mu_a) / (len(a) - 1)
  cov_b = (b - mu_b).T @ (b - mu_b) / (len(b) - 1)
  # tr((S_a S_b)^(1/2)) = sum of the square roots of the (real, non-negative) eigenvalues of S_a S_b
  tr_sqrt = np.sqrt(np.clip(np.linalg.eigvals(cov_a @ cov_b).real, 0, None)).sum()
  ref = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_sqrt
  assert dq.frechet_distance(a, b) == pytest.approx(ref, rel=1e-9)
  assert dq.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_grid_frechet_distances_of_the_real_digits():
  train, _ = dq.real_grid8("train")
  test, _ = dq.real_grid8("test")
  assert train.shape == (1438, 64) and test.shape == (359, 64)
  full = dq.real_grid_frechet_distance(len(train))
  assert full == pytest.approx(dq.frechet_distance(train, test), rel=1e-12)
  images, _ = data.digits_images("train", 16)
  # (the uint8 images hold the levels to within 16 / 510: the distance moves by ~0.05%)
  assert dq.grid_frechet_distance(images / 255.0) == pytest.approx(full, rel=2e-3)
  # FD is biased upwards at small N: 100 real digits sit further from the held-out set than all 1,438
  assert dq.real_grid_frechet_distance(100) > full
  with pytest.raises(ValueError, match="must be in"):
    dq.real_grid_frechet_distance(5000)


def test_psnr_matches_numpy():
  rng = np.random.default_rng(2)
  a = rng.uniform(0, 1, (4, 16, 16, 3))
  b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1)
  ref = np.mean([10 * np.log10(1.0 / np.mean((x - y) ** 2)) for x, y in zip(a, b, strict=True)])
  assert dq.psnr(b, a) == pytest.approx(ref, rel=1e-6)
  c = np.full((2, 8, 8, 3), 0.25)
  assert dq.psnr(c + 0.1, c) == pytest.approx(20.0, rel=1e-6)  # error 0.1 of a peak of 1: 20 dB
  assert dq.psnr(c * 2 - 1 + 0.2, c * 2 - 1, value_range="[-1,1]") == pytest.approx(20.0, rel=1e-6)


def test_judge_accuracy_and_report_read_blur(judge, real):
  images, labels, _ = real
  x01 = (images + 1) / 2
  assert dq.judge_accuracy(x01, labels, judge=judge) == pytest.approx(judge.test_accuracy)
  # a 3x3 box blur keeps most digits recognisable but moves them far away on the 8x8 grid
  blurred = np.stack([np.mean([np.roll(np.roll(x01, dy, 1), dx, 2) for dy in (-1, 0, 1) for dx in (-1, 0, 1)],
                              axis=0)])[0]
  sharp, soft = judge.report(x01[:200], labels[:200]), judge.report(blurred[:200], labels[:200])
  assert soft["accuracy"] > 0.7
  assert sharp["fd"] < 2 * sharp["fd_real_same_n"]
  assert soft["fd"] > 3 * soft["fd_real_same_n"]


def test_a_short_tokenizer_run_on_the_digits_learns(tmp_path):
  """Smoke check of learning (not a wall-clock test): 60 steps of the demo tokenizer recipe cut the held-out
  reconstruction error (mean |rec - x| in [0, 1], through the tokens) of the untrained model by 4x or more."""
  from flax import nnx

  from configs import digits_tokenizer
  from tokenizer.vqvae import VQVAE
  from var import train_lib
  from var.digits_builder import prepare
  from var.pretrained import load_tokenizer

  config = digits_tokenizer.get_config("steps=60,batch=32")
  config.input.data_dir = prepare(tmp_path / "tfds")
  config.ckpt.every_steps = 60
  config.log_every_steps = 60
  images, _ = data.digits_images("test", R)
  target = images / 255.0
  with nnx.use_eager_sharding(False):
    untrained = VQVAE(train_lib.tokenizer_config_from(config), rngs=nnx.Rngs(config.seed))
  before = np.abs(dq.reconstruct(untrained, images)[0] - target).mean()
  result = train_lib.train_and_evaluate(config, tmp_path / "tok")
  after = np.abs(dq.reconstruct(load_tokenizer(result["model_dir"])[0], images)[0] - target).mean()
  assert after < before / 4, (before, after)
