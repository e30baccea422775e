"""The bundled evaluator (`python -m var.eval.fid`) end to end on the 4 fixture images, and its input handling."""

import json

import numpy as np
import pytest
from PIL import Image

from var.eval import fid, reference
from var.eval.metrics import inception_score


def _write_folder(folder, images):
  folder.mkdir()
  for i, img in enumerate(images):
    Image.fromarray(img).save(folder / f"{i:03d}.png")
  return folder


def test_script_end_to_end(tmp_path, fid_io, fid_dir, capsys, monkeypatch):
  images = fid_io["images_uint8"]  # (4, 64, 64, 3)
  samples = _write_folder(tmp_path / "samples", images)
  # Reference: the same images in arr_0 (so P/R = 1) and statistics of the torch pytorch-fid-mode features.
  ref_pool3, ref_spatial = fid_io["pfid_e2e_f64_pool3"], fid_io["pfid_e2e_f64_spatial_adm"]
  ref_stats = dict(mu=ref_pool3.mean(0), sigma=np.cov(ref_pool3, rowvar=False), mu_s=ref_spatial.mean(0),
                   sigma_s=np.cov(ref_spatial, rowvar=False))
  np.savez(tmp_path / "ref.npz", arr_0=images, **ref_stats)
  # A 2048x2048 sqrtm takes 10-50 s on 2 shared cores; frechet_distance itself is checked against the torch
  # fixtures in test_fid_metrics. Here we record what the script feeds it and return a cheap stand-in.
  fd_calls = []

  def recording_fd(mu1, sigma1, mu2, sigma2):
    fd_calls.append((mu1, sigma1, mu2, sigma2))
    return float(len(fd_calls))

  monkeypatch.setattr(fid.metrics, "frechet_distance", recording_fd)
  argv = ["--samples", str(samples), "--ref", str(tmp_path / "ref.npz"), "--batch_size", "4",
          "--inception_weights", str(fid_dir / "inception_random_state_dict.npz"),
          "--save_stats", str(tmp_path / "stats.npz"), "--no_progress"]
  compiled_before = fid._features._cache_size()
  with pytest.warns(UserWarning, match="covariance is singular"):
    result = fid.main(argv)
  # Samples and reference (4 images each, global batch 8 on 8 devices, padded): ONE executable for both passes.
  assert fid._features._cache_size() - compiled_before == 1
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 1 and json.loads(lines[0]) == result

  # The sample statistics must be those of the torch-fidelity (ADM-mode) float64 features of the same images.
  pool3, spatial = fid_io["tf1_e2e_f64_pool3"].astype(np.float64), fid_io["tf1_e2e_f64_spatial_adm"]
  (mu, sigma, mu_r, sigma_r), (mu_s, sigma_s, mu_sr, sigma_sr) = fd_calls
  assert (result["fid"], result["sfid"]) == (1.0, 2.0)
  np.testing.assert_allclose(mu, pool3.mean(0), atol=1e-3)
  np.testing.assert_allclose(sigma, np.cov(pool3, rowvar=False), atol=2e-3)
  np.testing.assert_allclose(mu_s, spatial.mean(0), atol=1e-3)
  np.testing.assert_allclose(sigma_s, np.cov(spatial, rowvar=False), atol=2e-3)
  for got, key in [(mu_r, "mu"), (sigma_r, "sigma"), (mu_sr, "mu_s"), (sigma_sr, "sigma_s")]:
    np.testing.assert_array_equal(got, ref_stats[key])  # stored reference stats are used as they are
  want_is, _ = inception_score(fid_io["tf1_e2e_f64_logits_unbiased"])
  assert result["inception_score"] == pytest.approx(want_is, rel=1e-4)
  assert (result["precision"], result["recall"]) == (1.0, 1.0)
  assert result["num_samples"] == 4 and result["num_ref_images"] == 4 and result["devices"] == 8
  assert result["preprocess"] == "adm" and result["compute_dtype"] == "float32"

  # --save_stats wrote an ADM reference batch of the samples.
  saved = reference.load_reference(tmp_path / "stats.npz")
  np.testing.assert_allclose(saved.mu, pool3.mean(0), atol=1e-3)
  np.testing.assert_allclose(saved.sigma, np.cov(pool3, rowvar=False), atol=2e-3)
  np.testing.assert_allclose(saved.mu_s, spatial.mean(0), atol=1e-3)
  np.testing.assert_array_equal(saved.images.read(0, 4), images)


def test_script_rejects_bad_inputs_before_work(tmp_path, fid_dir):
  weights = str(fid_dir / "inception_random_state_dict.npz")
  good = tmp_path / "good.npz"
  np.savez(good, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
  np.savez(tmp_path / "float.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
  np.savez(tmp_path / "nchw.npz", arr_0=np.zeros((4, 3, 8, 8), np.uint8))
  np.savez(tmp_path / "empty.npz", arr_0=np.zeros((0, 8, 8, 3), np.uint8))
  np.savez(tmp_path / "partial_ref.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8), mu=np.zeros(2048))
  np.savez(tmp_path / "no_keys.npz", foo=np.zeros(3))
  cases = [
    (["--samples", str(tmp_path / "float.npz"), "--ref", str(good)], ValueError, "uint8"),
    (["--samples", str(tmp_path / "nchw.npz"), "--ref", str(good)], ValueError, "NCHW"),
    (["--samples", str(tmp_path / "empty.npz"), "--ref", str(good)], ValueError, "empty"),
    (["--samples", str(good), "--ref", str(tmp_path / "partial_ref.npz")], KeyError, r"'sigma', 'mu_s', 'sigma_s'"),
    (["--samples", str(good), "--ref", str(tmp_path / "no_keys.npz")], KeyError, "missing key"),
    (["--samples", str(tmp_path / "no_keys.npz"), "--ref", str(good)], KeyError, "no 'arr_0'"),
    (["--samples", str(tmp_path / "nowhere"), "--ref", str(good)], FileNotFoundError, "does not exist"),
  ]
  for argv, exc, match in cases:
    with pytest.raises(exc, match=match):
      fid.main([*argv, "--inception_weights", weights])
  with pytest.raises(FileNotFoundError, match="nope.pth does not exist"):
    fid.main(["--samples", str(good), "--ref", str(good), "--inception_weights", str(tmp_path / "nope.pth")])
  with pytest.raises(SystemExit, match="nothing to do"):
    fid.main(["--samples", str(good), "--inception_weights", weights])


def test_reference_shapes_checked(tmp_path):
  np.savez(tmp_path / "r.npz", mu=np.zeros(2048), sigma=np.zeros((2048, 2048)), mu_s=np.zeros(64),
           sigma_s=np.zeros((64, 64)))
  with pytest.raises(ValueError, match=r"mu_s \(64,\) \(expected \(2023,\)\)"):
    reference.load_reference(tmp_path / "r.npz")


def test_save_and_load_reference_streaming(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (10, 5, 6, 3), dtype=np.uint8)
  mu, sigma, mu_s, sigma_s = rng.normal(size=4), rng.normal(size=(4, 4)), rng.normal(size=3), rng.normal(size=(3, 3))
  path = tmp_path / "ref.npz"
  reference.save_reference(path, mu, sigma, mu_s, sigma_s, images=(images[i:i + 3] for i in range(0, 10, 3)),
                           num_images=10)
  with np.load(path) as z:  # a plain npz for numpy (and so for ADM's evaluator)
    assert sorted(z.files) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
    np.testing.assert_array_equal(z["arr_0"], images)
  ref = reference.load_reference(path, pool3_dim=4, spatial_dim=3)
  np.testing.assert_array_equal(ref.sigma_s, sigma_s)
  assert ref.images.num_images == 10 and ref.images.image_shape == (5, 6, 3)
  got = np.concatenate(list(ref.images.batches(4)))
  np.testing.assert_array_equal(got, images)
  np.testing.assert_array_equal(ref.images.read(7, 9), images[7:9])  # backwards seek reopens the member
  np.testing.assert_array_equal(ref.images.read(2, 3), images[2:3])


def test_npz_images_compressed_and_limit(tmp_path):
  images = np.random.default_rng(1).integers(0, 256, (7, 4, 4, 3), dtype=np.uint8)
  np.savez_compressed(tmp_path / "c.npz", arr_0=images)
  src = reference.open_images(str(tmp_path / "c.npz"))
  batches = list(src.batches(3, limit=5))
  assert [len(b) for b in batches] == [3, 2]
  np.testing.assert_array_equal(np.concatenate(batches), images[:5])


def test_folder_images(tmp_path):
  images = np.random.default_rng(2).integers(0, 256, (3, 6, 5, 3), dtype=np.uint8)
  folder = _write_folder(tmp_path / "f", images)
  (folder / "notes.txt").write_text("ignored")
  src = reference.open_images(str(folder))
  np.testing.assert_array_equal(src.read(0, 3), images)
  Image.fromarray(np.zeros((7, 5, 3), np.uint8)).save(folder / "zzz.png")
  with pytest.raises(ValueError, match="all images must have one size"):
    reference.open_images(str(folder)).read(0, 4)
  with pytest.raises(ValueError, match="empty input"):
    reference.open_images(str(_write_folder(tmp_path / "e", [])))


def test_center_crop_matches_adm_definition():
  img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 90, 3), dtype=np.uint8))
  out = reference.center_crop_arr(img, 16)
  # 90x40 -> one BOX halving (min side 40 >= 32) -> 45x20 -> BICUBIC to 36x16 -> centre 16x16 crop.
  want = np.asarray(img.resize((45, 20), Image.BOX).resize((36, 16), Image.BICUBIC))[:, 10:26]
  np.testing.assert_array_equal(out, want)


def test_tfds_split_source():
  import tensorflow_datasets as tfds

  with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
    src = reference.open_images("tfds:mnist/train")
    raw = np.asarray(src.source[3]["image"])  # (28, 28, 1) grayscale
    assert src.num_images == 5 and src.image_shape == (28, 28, 3)
    batches = list(src.batches(4))
    assert [b.shape for b in batches] == [(4, 28, 28, 3), (1, 28, 28, 3)]
    np.testing.assert_array_equal(batches[0][3], np.repeat(raw, 3, axis=-1))
    cropped = reference.open_images("tfds:mnist/train", center_crop=16)
    assert cropped.read(0, 2).shape == (2, 16, 16, 3)
  with pytest.raises(ValueError, match="tfds:name/split"):
    reference.open_images("tfds:mnist")


def test_evaluate_from_features():
  from var.eval import metrics

  rng = np.random.default_rng(4)

  def feats(n, shift):
    return {"pool3": rng.normal(shift, 1, (n, 8)), "spatial": rng.normal(shift, 1, (n, 5)),
            "logits_unbiased": rng.normal(0, 3, (n, 10))}

  samples, ref_feats = feats(40, 0.5), feats(30, 0.0)
  ref = reference.ReferenceBatch("in-memory")  # no stored stats: computed from the reference features
  out = fid.evaluate(samples, ref, ref_feats)
  want_fid = metrics.frechet_distance(*metrics.feature_statistics(samples["pool3"]),
                                      *metrics.feature_statistics(ref_feats["pool3"]))
  want_sfid = metrics.frechet_distance(*metrics.feature_statistics(samples["spatial"]),
                                       *metrics.feature_statistics(ref_feats["spatial"]))
  assert out["fid"] == pytest.approx(want_fid, rel=1e-12) and out["fid"] > 1.0  # shifted by 0.5 in 8 dims
  assert out["sfid"] == pytest.approx(want_sfid, rel=1e-12)
  assert (out["precision"], out["recall"]) == metrics.precision_recall(ref_feats["pool3"], samples["pool3"])
  assert out["inception_score"] == pytest.approx(metrics.inception_score(samples["logits_unbiased"])[0])
  tf_is = fid.evaluate(samples, None, None, is_variant="torch_fidelity")
  want_tf = metrics.inception_score(samples["logits_unbiased"], split_size=None, splits=10, shuffle_seed=2020)
  assert (tf_is["inception_score"], tf_is["fid"]) == (want_tf[0], None)
  with pytest.warns(UserWarning, match="precision/recall need more than 3"):
    few = fid.evaluate(feats(3, 0.0), ref, ref_feats)
  assert few["precision"] is None and few["fid"] is not None
