"""var.data / var.digits_builder: tfds digits builder, folder and tfds-by-name sources, grain iterators."""

import collections

import grain
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from var import data, digits_builder


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  """The digits prepared once (the first-use preparation path) into a fresh data_dir."""
  return digits_builder.prepare(tmp_path_factory.mktemp("tfds"))


def _digits_cfg(digits_dir, **kw):
  return {**dict(name="digits", data_dir=digits_dir, resolution=16, batch_size=8, crop_scale=1.0), **kw}


# Distinct solid colours, one per image: each decoded pixel identifies its file.
COLORS = [(r, g, b) for r in (0, 120, 250) for g in (10, 130) for b in (40, 200)]  # 12 colours


@pytest.fixture()
def image_folder(tmp_path):
  """root/<class>/<i>.png: 3 classes x 4 images of 20x30 (w x h) solid colours (the last class in grey)."""
  root = tmp_path / "images"
  for c, name in enumerate(["cat", "ant", "bee"]):  # sorted: ant=0, bee=1, cat=2
    (root / name).mkdir(parents=True)
    for i in range(4):
      color = COLORS[4 * c + i]
      img = Image.new("RGB", (20, 30), color)
      if name == "bee":
        img = img.convert("L")  # greyscale files must come out RGB too
      img.save(root / name / f"{i}.png")
  (root / "ant" / "notes.txt").write_text("not an image")
  return root


def _folder_cfg(root, **kw):
  base = dict(name="folder", data_dir=str(root), resolution=8, batch_size=4, crop_scale=1.0)
  return {**base, **kw}


def _pixel_ids(batch):
  """The (r, g, b) of each solid image in a [-1, 1] batch."""
  rgb = np.round((batch["image"][:, 4, 4] + 1) * 127.5).astype(int)
  return [tuple(v) for v in rgb]


# ---------------------------------------------------------------------------------------------------------------
# digits builder


def test_digits_builder_stratified_heldout_split(digits_dir):
  images, labels = digits_builder.load_digits_arrays()
  assert images.shape == (1797, 8, 8) and images.max() == 16
  train = digits_builder.split_indices(labels, "train")
  test = digits_builder.split_indices(labels, "test")
  assert (len(train), len(test)) == (1438, 359)
  assert not set(train) & set(test) and len(set(train) | set(test)) == 1797
  per_class = np.bincount(labels[test], minlength=10) / np.bincount(labels, minlength=10)
  np.testing.assert_allclose(per_class, 0.2, atol=0.01)  # stratified

  source = tfds.data_source("uci_digits", split="test", data_dir=digits_dir, download=False)
  assert len(source) == 359
  got = sorted((source[i]["image"].tobytes(), int(source[i]["label"])) for i in range(len(source)))
  want = sorted((images[i].tobytes(), int(labels[i])) for i in test)
  assert got == want  # the stored test split is exactly the held-out digits


def test_digits_upsampling_nearest_and_bilinear():
  levels = np.arange(64, dtype=np.uint8).reshape(8, 8) % 17
  near = data.upsample_digit(levels, 16, "nearest")
  assert near.shape == (16, 16, 3) and near.dtype == np.uint8
  grey = np.round(levels.astype(np.float64) * 255 / 16).astype(np.uint8)
  np.testing.assert_array_equal(near[:, :, 0], np.kron(grey, np.ones((2, 2), np.uint8)))
  np.testing.assert_array_equal(near[:, :, 0], near[:, :, 2])
  assert near.max() == 255 and near.min() == 0
  bil = data.upsample_digit(levels, 16, "bilinear")
  assert bil.shape == (16, 16, 3) and not np.array_equal(bil, near)
  assert np.abs(bil[:, :, 0].astype(int) - near[:, :, 0]).mean() < 60  # same picture, smoother


def test_digits_train_batches(digits_dir):
  it = data.make_train_iterator(_digits_cfg(digits_dir), seed=0, process_index=0, process_count=1)
  batch = next(it)
  assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
  assert batch["image"].min() == -1.0 and batch["image"].max() == 1.0
  assert set(batch) == {"image", "label"}
  # with crop_scale=1 the images are exactly the upsampled training digits
  train_images, train_labels = data.digits_images("train", 16)
  train_set = {(im.tobytes(), int(lb)) for im, lb in zip(train_images, train_labels, strict=True)}
  as_uint8 = np.round((batch["image"] + 1) * 127.5).astype(np.uint8)
  assert all((im.tobytes(), int(lb)) in train_set for im, lb in zip(as_uint8, batch["label"], strict=True))


def test_train_iterator_deterministic_and_restorable(digits_dir):
  cfg = _digits_cfg(digits_dir, crop_scale=1.125)  # random crops: augmentation must be reproducible too
  first = data.make_train_iterator(cfg, seed=3, process_index=0, process_count=1)
  a = [next(first) for _ in range(6)]
  second = data.make_train_iterator(cfg, seed=3, process_index=0, process_count=1)
  b = [next(second) for _ in range(6)]
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  other = next(data.make_train_iterator(cfg, seed=4, process_index=0, process_count=1))
  assert not np.array_equal(other["label"], a[0]["label"])

  # Restore after N=2 batches: the next batches are the same.
  it = data.make_train_iterator(cfg, seed=3, process_index=0, process_count=1)
  next(it), next(it)
  state = it.get_state()
  resumed = data.make_train_iterator(cfg, seed=3, process_index=0, process_count=1)
  resumed.set_state(state)
  for want in a[2:]:
    got = next(resumed)
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])


def test_train_iterator_checkpoints_with_grain_orbax_handler(digits_dir, tmp_path):
  cfg = _digits_cfg(digits_dir)
  it = data.make_train_iterator(cfg, seed=0, process_index=0, process_count=1)
  for _ in range(5):
    next(it)
  handler = grain.checkpoint.CheckpointHandler()
  handler.save(epath.Path(tmp_path), args=grain.checkpoint.CheckpointSave(it))
  want = [next(it) for _ in range(2)]
  fresh = data.make_train_iterator(cfg, seed=0, process_index=0, process_count=1)
  restored = handler.restore(epath.Path(tmp_path), args=grain.checkpoint.CheckpointRestore(fresh))
  for w in want:
    np.testing.assert_array_equal(next(restored)["image"], w["image"])


def test_epochs_reshuffled(image_folder):
  it = data.make_train_iterator(_folder_cfg(image_folder, batch_size=6), seed=0, process_index=0, process_count=1)
  epoch1 = _pixel_ids(next(it)) + _pixel_ids(next(it))
  epoch2 = _pixel_ids(next(it)) + _pixel_ids(next(it))
  assert sorted(epoch1) == sorted(epoch2) == sorted(set(epoch1)) and len(epoch1) == 12  # each image once per epoch
  assert epoch1 != epoch2


def test_hosts_read_disjoint_shards(image_folder):
  cfg = _folder_cfg(image_folder, batch_size=4)  # 2 per host
  seen = []
  for host in range(2):
    it = data.make_train_iterator(cfg, seed=0, process_index=host, process_count=2)
    epoch = sum((_pixel_ids(next(it)) for _ in range(3)), [])  # 6 images = one epoch of the host's shard
    assert len(set(epoch)) == 6
    seen.append(set(epoch))
  assert not seen[0] & seen[1]
  assert len(seen[0] | seen[1]) == 12
  with pytest.raises(ValueError, match="batch_size=5 is not divisible by process_count=2"):
    data.make_train_iterator(_folder_cfg(image_folder, batch_size=5), seed=0, process_index=0, process_count=2)


# ---------------------------------------------------------------------------------------------------------------
# eval


def test_eval_iterator_one_pass_center_crop_with_padding(digits_dir):
  cfg = _digits_cfg(digits_dir, batch_size=16, eval_batch_size=20, crop_scale=1.125)
  images, labels = data.digits_images("test", 16)
  want = data.EvalResizeCrop(16, 1.125)
  counts = []
  got = collections.Counter()
  for host in range(2):
    batches = list(data.make_eval_iterator(cfg, process_index=host, process_count=2))
    counts.append(len(batches))
    for b in batches:
      assert b["image"].shape == (10, 16, 16, 3) and b["mask"].dtype == bool
      for im, lb in zip(b["image"][b["mask"]], b["label"][b["mask"]], strict=True):
        got[(np.round((im + 1) * 127.5).astype(np.uint8).tobytes(), int(lb))] += 1
  assert counts[0] == counts[1] == 18  # ceil(180 / 10) on both hosts
  expected = collections.Counter(
    (want.map({"image": im, "label": lb})["image"].tobytes(), int(lb)) for im, lb in zip(images, labels, strict=True))
  assert got == expected  # every held-out digit exactly once, centre-cropped
  assert len(data.make_eval_dataset(cfg, process_index=0, process_count=1)) == 18  # ceil(359 / 20)


# ---------------------------------------------------------------------------------------------------------------
# folder source


def test_folder_source_classes_and_decoding(image_folder):
  source = data.FolderSource(image_folder)
  assert source.class_names == ["ant", "bee", "cat"]
  assert len(source) == 12  # notes.txt is skipped
  assert [int(source[i]["label"]) for i in range(12)] == [0] * 4 + [1] * 4 + [2] * 4
  ex = source[4]  # a greyscale file
  assert ex["image"].shape == (30, 20, 3) and ex["image"].dtype == np.uint8
  assert np.all(ex["image"] == ex["image"][:, :, :1])
  info = data.dataset_info(_folder_cfg(image_folder))
  assert (info.num_classes, info.num_train, info.num_eval) == (3, 12, 12)


def test_folder_uses_split_subfolders(image_folder, tmp_path):
  root = tmp_path / "split_root"
  root.mkdir()
  image_folder.rename(root / "train")
  (root / "val" / "x").mkdir(parents=True)
  Image.new("RGB", (9, 9), (1, 2, 3)).save(root / "val" / "x" / "a.png")
  cfg = _folder_cfg(root)
  assert data.dataset_info(cfg).num_train == 12 and data.dataset_info(cfg).num_eval == 1
  batch = next(data.make_eval_iterator(cfg, process_index=0, process_count=1))
  assert batch["mask"].tolist() == [True, False, False, False]
  assert _pixel_ids(batch)[0] == (1, 2, 3)


def test_official_augmentation_geometry():
  image = np.random.default_rng(0).integers(0, 256, (30, 20, 3), dtype=np.uint8)  # portrait: w=20 is shorter
  resized = data.resize_shorter_side(image, 18)
  assert resized.shape == (27, 18, 3)  # torchvision Resize(18): long side int(18 * 30 / 20)
  assert data.resize_shorter_side(image.transpose(1, 0, 2), 18).shape == (18, 27, 3)
  assert data.center_crop(resized, 16).shape == (16, 16, 3)
  np.testing.assert_array_equal(data.center_crop(resized, 16), resized[6:22, 1:17])  # round(5.5)=6, round(1)=1
  aug = data.TrainAugment(16, 1.125, hflip=True)
  outs = [aug.random_map({"image": image, "label": np.int32(0)}, np.random.default_rng(s))["image"]
          for s in range(24)]
  assert all(o.shape == (16, 16, 3) for o in outs)
  crops = {o.tobytes() for o in outs}
  assert len(crops) > 12  # random offsets and flips
  flipped = data.TrainAugment(16, 1.125, hflip=False).random_map({"image": image[:, ::-1], "label": 0},
                                                                  np.random.default_rng(0))["image"]
  assert flipped.shape == (16, 16, 3)
  batch = data.ToModelInput().map({"image": np.array([[0, 255]], np.uint8), "label": np.array([3])})
  np.testing.assert_array_equal(batch["image"], [[-1.0, 1.0]])
  assert batch["label"].dtype == np.int32


def _lanczos_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) weights of a Lanczos-3 resize with antialiasing, from the formula (PIL's convention: pixel
  centres at i + 0.5, the kernel stretched by the downscale factor, each row normalised)."""
  scale = in_size / out_size
  stretch = max(scale, 1.0)
  support = 3.0 * stretch
  out = np.zeros((out_size, in_size))
  for i in range(out_size):
    centre = (i + 0.5) * scale
    lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), in_size)
    x = (np.arange(lo, hi) - centre + 0.5) / stretch
    w = np.sinc(x) * np.sinc(x / 3) * (np.abs(x) < 3)
    out[i, lo:hi] = w / w.sum()
  return out


def _lanczos_reference(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """Separable numpy Lanczos-3: horizontal pass rounded to 8 bits, then vertical (PIL's order)."""
  x = np.einsum("ow,hwc->hoc", _lanczos_matrix(image.shape[1], out_w), image.astype(np.float64))
  x = np.clip(np.round(x), 0, 255)
  x = np.einsum("oh,hwc->owc", _lanczos_matrix(image.shape[0], out_h), x)
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


def test_official_augmentation_values_against_independent_references():
  """LANCZOS shorter-side resize against a numpy Lanczos-3 from the formula; the whole training augmentation
  (flip, resize, crop) against the same steps spelled with PIL's own operations and the same draws."""
  from PIL import Image, ImageOps

  rng = np.random.default_rng(1)
  smooth = np.cumsum(np.cumsum(rng.integers(0, 3, (30, 20, 3)), 0), 1)  # natural-ish gradients + noise
  image = np.clip(smooth * 255 // smooth.max() + rng.integers(0, 40, smooth.shape), 0, 255).astype(np.uint8)
  for img, size in [(image, 18), (image.transpose(1, 0, 2), 18), (image, 9), (image, 27)]:  # down and up
    img = np.ascontiguousarray(img)
    got = data.resize_shorter_side(img, size)
    want = _lanczos_reference(img, *got.shape[:2])
    np.testing.assert_array_equal(got, want, err_msg=f"{img.shape} -> {size}")  # identical, pixel for pixel
  aug = data.TrainAugment(16, 1.125, hflip=True)
  flips = 0
  for seed in range(12):
    got = aug.random_map({"image": image, "label": np.int32(0)}, np.random.default_rng(seed))["image"]
    draws = np.random.default_rng(seed)
    pil = Image.fromarray(image)
    if draws.random() < 0.5:
      pil, flips = ImageOps.mirror(pil), flips + 1
    pil = pil.resize((18, 27), Image.Resampling.LANCZOS)  # shorter side round(1.125 * 16) = 18
    top, left = int(draws.integers(0, 27 - 16 + 1)), int(draws.integers(0, 18 - 16 + 1))
    want = np.asarray(pil.crop((left, top, left + 16, top + 16)))
    np.testing.assert_array_equal(got, want, err_msg=f"seed {seed}")
  assert 3 <= flips <= 9  # both branches ran
  # hflip=False never flips and draws no coin: the crop offsets are the first two draws
  got = data.TrainAugment(16, 1.125, hflip=False).random_map({"image": image, "label": 0},
                                                             np.random.default_rng(0))["image"]
  draws = np.random.default_rng(0)
  top, left = int(draws.integers(0, 27 - 16 + 1)), int(draws.integers(0, 18 - 16 + 1))
  resized = np.asarray(Image.fromarray(image).resize((18, 27), Image.Resampling.LANCZOS))
  np.testing.assert_array_equal(got, resized[top:top + 16, left:left + 16])


# ---------------------------------------------------------------------------------------------------------------
# any tfds dataset by name


class VarTestShapes(tfds.core.GeneratorBasedBuilder):
  """A tiny tfds image-classification dataset (non-square RGB Tensor images), preparable without TensorFlow."""

  VERSION = tfds.core.Version("1.0.0")
  code_path = epath.Path(__file__)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
      "picture": tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding="zlib"),
      "label": tfds.features.ClassLabel(num_classes=3)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(6), "validation": self._generate_examples(3)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"picture": np.full((24 + 4 * i, 18, 3), 20 * i, np.uint8), "label": i % 3}


def test_tfds_dataset_by_name(tmp_path):
  data_dir = str(tmp_path / "tfds")
  VarTestShapes(data_dir=data_dir, file_format="array_record").download_and_prepare(
    download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  cfg = dict(name="var_test_shapes", data_dir=data_dir, image_key="picture", resolution=16, batch_size=3)
  info = data.dataset_info(cfg)
  assert (info.num_classes, info.num_train, info.num_eval, info.eval_split) == (3, 6, 3, "validation")
  batch = next(data.make_train_iterator(cfg, seed=0, process_index=0, process_count=1))
  assert batch["image"].shape == (3, 16, 16, 3)
  levels = np.round((batch["image"] + 1) * 127.5)
  for img, lb in zip(levels, batch["label"], strict=True):
    assert np.all(img == img[0, 0, 0]) and img[0, 0, 0] % 20 == 0 and (img[0, 0, 0] // 20) % 3 == lb
  ev = list(data.make_eval_iterator(cfg, process_index=0, process_count=1))
  assert len(ev) == 1 and ev[0]["mask"].all()
  with pytest.raises(ValueError, match=r"no feature 'image'.*picture"):
    data.make_train_iterator({**cfg, "image_key": "image"}, seed=0, process_index=0, process_count=1)
  with pytest.raises(ValueError, match=r"no split 'val'.*'train', 'validation'"):
    data.make_eval_iterator({**cfg, "eval_split": "val"}, process_index=0, process_count=1)


def test_imagenet2012_by_name_decodes_jpeg_without_tensorflow():
  # mock_data(USE_CODE) serves random JPEG-encoded images of random sizes through tfds.data_source, the same
  # read path as a real imagenet2012 prepared as ArrayRecord (pillow decodes; TensorFlow is not installed).
  cfg = dict(name="imagenet2012", resolution=16, batch_size=4, hflip=True)
  with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE):
    assert data.dataset_info(cfg).num_classes == 1000
    batch = next(data.make_train_iterator(cfg, seed=0, process_index=0, process_count=1))
    evals = list(data.make_eval_iterator(cfg, process_index=0, process_count=1))
  assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.float32
  assert -1.0 <= batch["image"].min() < batch["image"].max() <= 1.0
  assert batch["label"].dtype == np.int32 and np.all((batch["label"] >= 0) & (batch["label"] < 1000))
  assert len(evals) == 2 and all(b["mask"].all() for b in evals)


# ---------------------------------------------------------------------------------------------------------------
# errors


def test_clear_errors(tmp_path, image_folder):
  with pytest.raises(ValueError, match="neither 'digits', 'folder' nor a tfds dataset"):
    data.make_train_iterator(dict(name="no_such_dataset_xyz", data_dir=str(tmp_path)), seed=0)
  with pytest.raises(FileNotFoundError, match="data_dir='/no/such/dir' does not exist"):
    data.make_train_iterator(dict(name="mnist", data_dir="/no/such/dir"), seed=0)
  with pytest.raises(FileNotFoundError, match=r"'mnist' is not prepared.*tfds build mnist"):
    data.make_train_iterator(dict(name="mnist", data_dir=str(tmp_path)), seed=0)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.make_train_iterator(dict(name="folder", data_dir=str(tmp_path / "missing")), seed=0)
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="has no class sub-folders"):
    data.make_train_iterator(dict(name="folder", data_dir=str(tmp_path / "empty")), seed=0)
  (tmp_path / "empty" / "cls").mkdir()
  with pytest.raises(ValueError, match="but no images"):
    data.make_train_iterator(dict(name="folder", data_dir=str(tmp_path / "empty")), seed=0)
  for bad in (0, -32, 16.5):
    with pytest.raises(ValueError, match=f"resolution={bad!r} must be a positive integer"):
      data.make_train_iterator(_folder_cfg(image_folder, resolution=bad), seed=0)
  with pytest.raises(ValueError, match=r"unknown input config keys \['resoluton'\]"):
    data.input_config({"resoluton": 32})
  assert data.input_config(ml_collections.ConfigDict({"resolution": 64})).resolution == 64
  with pytest.raises(ValueError, match="crop_scale=0.9 must be >= 1"):
    data.input_config({"crop_scale": 0.9})
