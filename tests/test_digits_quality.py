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
