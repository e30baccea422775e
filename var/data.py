"""Input pipelines: tfds data sources / image folders -> grain -> per-host numpy batches.

Three kinds of dataset, chosen by `InputConfig.name`:

* "digits" (the embedded default): the UCI handwritten digits shipped with scikit-learn, prepared on first use
  as a tfds ArrayRecord dataset in `data_dir` (no network, no TensorFlow; see var/digits_builder.py) and upsampled
  from 8x8 to the resolution when read (grey levels 0..16 -> 0..255, grey replicated to RGB).
* "folder": `data_dir` holds one sub-folder of images per class (class ids = sorted folder names); when
  `data_dir/<split>` exists it is used for that split (e.g. root/train, root/val), else `data_dir` itself.
* any other name: a prepared tfds image-classification dataset read with `tfds.data_source` (ArrayRecord;
  decoding JPEG/PNG needs pillow only), e.g. "imagenet2012" prepared once with TensorFlow installed.

Every image then gets the official VAR augmentation: resize the shorter side to round(crop_scale * R) with
LANCZOS, crop R x R (random for training, centred for evaluation), optional horizontal flip, x / 255 * 2 - 1.
Batches are dicts {"image": float32 (b, R, R, 3) in [-1, 1], "label": int32 (b,)} holding this host's share
b = batch_size / process_count of the global batch; `var.sharding.shard_batch` makes them global arrays.

The train iterator is a grain `DatasetIterator`: shuffled, repeated (reshuffled every epoch), each host reading
a disjoint contiguous shard, deterministic given the seed, and checkpointable with `get_state` / `set_state`
(or `grain.checkpoint.CheckpointSave/CheckpointRestore` in an orbax CheckpointManager).
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np
from PIL import Image

from var import digits_builder

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")
_UPSAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR}


@dataclasses.dataclass(frozen=True)
class InputConfig:
  """What to read and how to augment it (the `config.input` block of a training config).

  Attributes:
    name: "digits", "folder", or a tfds dataset name ("imagenet2012", "imagenet2012:5.1.0").
    data_dir: tfds data_dir (digits: prepared there on first use; default $TFDS_DATA_DIR or
      ~/tensorflow_datasets), or the root of the class folders for "folder".
    train_split: split read by `make_train_iterator`.
    eval_split: split read by `make_eval_iterator`; None picks "test" (digits), "val" (folder), or "validation"
      / "test" (tfds, whichever exists).
    resolution: output side R in pixels.
    batch_size: global training batch over all hosts (each host gets batch_size / process_count).
    eval_batch_size: global eval batch; None uses batch_size.
    crop_scale: the shorter side is resized to round(crop_scale * R) before the R x R crop (VAR: 1.125).
    hflip: random horizontal flips while training (VAR's --hflip, default off).
    upsample: "nearest" or "bilinear": how digits go from 8x8 to R.
    image_key, label_key: feature names of tfds datasets.
    workers: grain worker processes (0: decode in this process, with `read_threads` threads).
    read_threads: threads per process that read and augment elements.
    tokens_dir: VAR stages only: read the training split's token pyramids from this directory (written once by
      `python -m var.tokenize_dataset`, var/token_data.py) instead of tokenising images in every step; the eval
      split is still read as images. None: images (the default).
  """

  name: str = "digits"
  data_dir: str | None = None
  train_split: str = "train"
  eval_split: str | None = None
  resolution: int = 32
  batch_size: int = 64
  eval_batch_size: int | None = None
  crop_scale: float = 1.125
  hflip: bool = False
  upsample: str = "nearest"
  image_key: str = "image"
  label_key: str = "label"
  workers: int = 0
  read_threads: int = 2
  tokens_dir: str | None = None

  def __post_init__(self):
    if isinstance(self.resolution, bool) or not isinstance(self.resolution, (int, np.integer)) or \
        self.resolution <= 0:
      raise ValueError(f"input resolution={self.resolution!r} must be a positive integer (e.g. 32 or 256)")
    for field in ("batch_size", "eval_batch_size"):
      value = getattr(self, field)
      if value is not None and (not isinstance(value, (int, np.integer)) or value <= 0):
        raise ValueError(f"input {field}={value!r} must be a positive integer")
    if not self.crop_scale >= 1.0:
      raise ValueError(f"input crop_scale={self.crop_scale!r} must be >= 1 (the shorter side is resized to "
                       "round(crop_scale * resolution) before cropping; VAR uses 1.125)")
    if self.upsample not in _UPSAMPLE:
      raise ValueError(f"input upsample={self.upsample!r} must be one of {sorted(_UPSAMPLE)}")
    if self.workers < 0 or self.read_threads < 0:
      raise ValueError(f"input workers={self.workers} and read_threads={self.read_threads} must be >= 0")
    if self.name == "folder" and not self.data_dir:
      raise ValueError("input name='folder' needs data_dir=<root of the class sub-folders>")


def input_config(cfg: Any) -> InputConfig:
  """An `InputConfig` from an InputConfig, a mapping or an ml_collections ConfigDict (unknown keys are errors)."""
  if isinstance(cfg, InputConfig):
    return cfg
  if hasattr(cfg, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict
    cfg = cfg.to_dict()
  elif dataclasses.is_dataclass(cfg):
    cfg = dataclasses.asdict(cfg)
  if not isinstance(cfg, Mapping):
    raise TypeError(f"input config of type {type(cfg).__name__} is not supported: pass an InputConfig, a dict or "
                    "a ConfigDict")
  known = {f.name for f in dataclasses.fields(InputConfig)}
  unknown = sorted(set(cfg) - known)
  if unknown:
    raise ValueError(f"unknown input config keys {unknown}; valid keys: {sorted(known)}")
  return InputConfig(**cfg)


# ---------------------------------------------------------------------------------------------------------------
# Image operations (numpy / PIL, uint8 HWC RGB)


def to_rgb(image: np.ndarray) -> np.ndarray:
  """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8 -> (H, W, 3) uint8 (grey replicated, alpha dropped)."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[:, :, None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise ValueError(f"image of shape {image.shape} is not (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)")
  if image.dtype != np.uint8:
    raise ValueError(f"image dtype {image.dtype} is not uint8: decode images to uint8 0..255")
  if image.shape[-1] == 1:
    return np.repeat(image, 3, axis=-1)
  return np.ascontiguousarray(image[:, :, :3])


def resize_shorter_side(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes so the shorter side is `size` with LANCZOS (torchvision `Resize(size)` on a PIL image)."""
  h, w = image.shape[:2]
  if min(h, w) == size:
    return image
  if w <= h:
    new_w, new_h = size, int(size * h / w)  # torchvision truncates the longer side
  else:
    new_w, new_h = int(size * w / h), size
  return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.LANCZOS))


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """The centred size x size crop (torchvision `CenterCrop` offsets)."""
  h, w = image.shape[:2]
  top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  return image[top:top + size, left:left + size]


def upsample_digit(levels: np.ndarray, resolution: int, method: str = "nearest") -> np.ndarray:
  """(8, 8) grey levels 0..16 -> (R, R, 3) uint8 0..255, resized with `method` ("nearest" or "bilinear")."""
  grey = np.round(np.asarray(levels, np.float32) * (255.0 / digits_builder.MAX_LEVEL)).astype(np.uint8)
  if grey.shape != (resolution, resolution):
    grey = np.asarray(Image.fromarray(grey).resize((resolution, resolution), _UPSAMPLE[method]))
  return np.repeat(grey[:, :, None], 3, axis=-1)


def digits_images(split: str, resolution: int, upsample: str = "nearest") -> tuple[np.ndarray, np.ndarray]:
  """A whole digits split in memory, upsampled as the pipelines read it (before the crop augmentation).

  Returns images (N, R, R, 3) uint8 and labels (N,) int32 (the same split as the prepared tfds dataset;
  no data_dir needed).
  """
  if resolution <= 0:
    raise ValueError(f"resolution={resolution} must be positive")
  levels, labels = digits_builder.load_digits_arrays()
  idx = digits_builder.split_indices(labels, split)
  images = np.stack([upsample_digit(levels[i], resolution, upsample) for i in idx])
  return images, labels[idx].astype(np.int32)


# ---------------------------------------------------------------------------------------------------------------
# grain transforms (module level, picklable, so they also run in worker processes)


def _with_mask(out: dict, element: Mapping) -> dict:
  if "mask" in element:  # eval padding flag travels with the example
    out["mask"] = element["mask"]
  return out


@dataclasses.dataclass(frozen=True)
class DecodeExample(grain.transforms.Map):
  """A tfds / folder example -> {"image": (H, W, 3) uint8, "label": int32}."""

  image_key: str = "image"
  label_key: str = "label"

  def map(self, element):
    out = {"image": to_rgb(element[self.image_key]), "label": np.int32(element[self.label_key])}
    return _with_mask(out, element)


@dataclasses.dataclass(frozen=True)
class DigitToImage(grain.transforms.Map):
  """A digits example (8x8 levels 0..16) -> {"image": (R, R, 3) uint8, "label": int32}."""

  resolution: int
  method: str = "nearest"

  def map(self, element):
    out = {"image": upsample_digit(element["image"], self.resolution, self.method),
           "label": np.int32(element["label"])}
    return _with_mask(out, element)


@dataclasses.dataclass(frozen=True)
class TrainAugment(grain.transforms.RandomMap):
  """VAR training augmentation: [hflip], shorter side -> round(crop_scale * R) (LANCZOS), random R x R crop."""

  resolution: int
  crop_scale: float = 1.125
  hflip: bool = False

  def random_map(self, element, rng: np.random.Generator):
    image = element["image"]
    if self.hflip and rng.random() < 0.5:
      image = image[:, ::-1]
    image = resize_shorter_side(np.ascontiguousarray(image), round(self.crop_scale * self.resolution))
    h, w = image.shape[:2]
    top = int(rng.integers(0, h - self.resolution + 1))
    left = int(rng.integers(0, w - self.resolution + 1))
    image = image[top:top + self.resolution, left:left + self.resolution]
    return _with_mask({"image": np.ascontiguousarray(image), "label": element["label"]}, element)


@dataclasses.dataclass(frozen=True)
class EvalResizeCrop(grain.transforms.Map):
  """VAR evaluation transform: shorter side -> round(crop_scale * R) (LANCZOS), centred R x R crop."""

  resolution: int
  crop_scale: float = 1.125

  def map(self, element):
    image = resize_shorter_side(element["image"], round(self.crop_scale * self.resolution))
    image = np.ascontiguousarray(center_crop(image, self.resolution))
    return _with_mask({"image": image, "label": element["label"]}, element)


class ToModelInput(grain.transforms.Map):
  """A uint8 batch -> {"image": float32 in [-1, 1], "label": int32} (+ "mask": bool for eval batches)."""

  def map(self, batch):
    out = {"image": batch["image"].astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0),
           "label": batch["label"].astype(np.int32)}
    if "mask" in batch:
      out["mask"] = batch["mask"].astype(bool)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Sources


class FolderSource(grain.sources.RandomAccessDataSource):
  """Images in class sub-folders (`root/<class>/*.png|jpg|...`), decoded with PIL to RGB uint8.

  Class ids are the positions of the folder names in sorted order; files are sorted, so the order is stable.
  """

  def __init__(self, root: str | os.PathLike):
    root = pathlib.Path(root)
    if not root.is_dir():
      raise FileNotFoundError(f"image folder {str(root)!r} does not exist: pass data_dir=<folder with one "
                              "sub-folder of images per class>")
    self.class_names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not self.class_names:
      raise ValueError(f"image folder {str(root)!r} has no class sub-folders: put the images of each class in "
                       "their own sub-folder (root/<class>/<image>.png)")
    self.files: list[str] = []
    self.labels: list[int] = []
    for label, name in enumerate(self.class_names):
      for path in sorted((root / name).rglob("*")):
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
          self.files.append(str(path))
          self.labels.append(label)
    if not self.files:
      raise ValueError(f"image folder {str(root)!r} has class folders {self.class_names[:5]} but no images "
                       f"({', '.join(IMAGE_EXTENSIONS)}) in them")
    self.root = str(root)

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> dict:
    with Image.open(self.files[index]) as image:
      rgb = np.asarray(image.convert("RGB"))
    return {"image": rgb, "label": np.int32(self.labels[index])}

  def __repr__(self) -> str:
    return f"FolderSource(root={self.root!r}, classes={len(self.class_names)}, images={len(self.files)})"


class _EvalShard(grain.sources.RandomAccessDataSource):
  """Examples [start, stop) of `source`, padded to `length` with masked copies of one real example."""

  def __init__(self, source, start: int, stop: int, length: int):
    self.source, self.start, self.stop, self.length = source, start, stop, length

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, index: int) -> dict:
    real = index < self.stop - self.start
    example = self.source[self.start + index if real else min(self.start, len(self.source) - 1)]
    return {**example, "mask": np.bool_(real)}


def _eval_split_for(cfg: InputConfig, available: list[str] | None = None) -> str:
  if cfg.eval_split is not None:
    return cfg.eval_split
  if cfg.name == "digits":
    return "test"
  if cfg.name == "folder":
    return "val"
  for split in ("validation", "test"):
    if available is None or split in available:
      return split
  raise ValueError(f"tfds dataset {cfg.name!r} has neither a 'validation' nor a 'test' split (it has "
                   f"{available}): set input.eval_split")


def _check_data_dir(cfg: InputConfig) -> None:
  if cfg.data_dir is not None and not os.path.isdir(cfg.data_dir):
    raise FileNotFoundError(f"input data_dir={cfg.data_dir!r} does not exist: pass the tfds data_dir the dataset "
                            "was prepared in (or, for name='folder', the root of the class folders)")


def _not_prepared(cfg: InputConfig, builder) -> FileNotFoundError:
  return FileNotFoundError(
    f"tfds dataset {cfg.name!r} is not prepared in data_dir={builder.data_dir!r}: prepare it once with "
    f"TensorFlow installed, e.g. `pip install tensorflow-cpu && tfds build {cfg.name.split(':')[0]} "
    f"--data_dir=<dir> --file_format=array_record` (see README), then pass that data_dir")


def _tfds_builder(cfg: InputConfig):
  import tensorflow_datasets as tfds  # imported here: tfds costs ~1 s and the folder source does not need it

  _check_data_dir(cfg)
  try:
    builder = tfds.builder(cfg.name, data_dir=cfg.data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"input name={cfg.name!r} is neither 'digits', 'folder' nor a tfds dataset (registered or "
                     f"prepared in data_dir={cfg.data_dir!r}); check the spelling or the data_dir") from e
  return builder


def make_source(cfg: Any, split: str) -> tuple[Any, grain.transforms.Map, int]:
  """The random-access source of `split`, its decode transform and the number of classes.

  Decoded elements are {"image": (H, W, 3) uint8, "label": int32}.

  Raises:
    FileNotFoundError: a data_dir or folder that does not exist, or a tfds dataset that is not prepared.
    ValueError: an unknown dataset name or split, an empty folder.
  """
  cfg = input_config(cfg)
  if cfg.name == "digits":
    import tensorflow_datasets as tfds

    if split.split("[")[0] not in ("train", "test"):  # tfds slicing ("train[:50%]") is allowed
      raise ValueError(f"digits split {split!r} does not exist: use 'train' or 'test'")
    data_dir = digits_builder.prepare(cfg.data_dir)
    source = tfds.data_source(digits_builder.NAME, split=split, data_dir=data_dir, download=False)
    return source, DigitToImage(cfg.resolution, cfg.upsample), digits_builder.NUM_CLASSES
  if cfg.name == "folder":
    root = pathlib.Path(cfg.data_dir)
    if not root.is_dir():
      raise FileNotFoundError(f"input data_dir={cfg.data_dir!r} does not exist: pass the root of the class folders")
    source = FolderSource(root / split if (root / split).is_dir() else root)
    return source, DecodeExample("image", "label"), len(source.class_names)
  import tensorflow_datasets as tfds

  builder = _tfds_builder(cfg)
  if builder.is_prepared():  # (under tfds.testing.mock_data nothing is prepared, yet data_source works)
    splits = list(builder.info.splits.keys())
    if split.split("[")[0] not in splits:  # tfds slicing syntax ("train[:10%]") is allowed
      raise ValueError(f"tfds dataset {cfg.name!r} has no split {split!r}; its splits are {splits}")
  features = builder.info.features
  for key in (cfg.image_key, cfg.label_key):
    if key not in features:
      raise ValueError(f"tfds dataset {cfg.name!r} has no feature {key!r}; its features are {list(features)}: "
                       "set input.image_key / input.label_key")
  try:
    source = tfds.data_source(cfg.name, split=split, data_dir=cfg.data_dir, download=False)
  except Exception as e:
    if not builder.is_prepared():
      raise _not_prepared(cfg, builder) from e
    raise
  num_classes = getattr(features[cfg.label_key], "num_classes", None)
  if num_classes is None:
    raise ValueError(f"feature {cfg.label_key!r} of tfds dataset {cfg.name!r} is not a ClassLabel")
  return source, DecodeExample(cfg.image_key, cfg.label_key), int(num_classes)


@dataclasses.dataclass(frozen=True)
class DataInfo:
  """Facts about a configured dataset that the model and the training loop need."""

  num_classes: int
  num_train: int
  num_eval: int
  eval_split: str


def dataset_info(cfg: Any) -> DataInfo:
  """Number of classes and of train / eval examples (over all hosts) of the configured dataset."""
  cfg = input_config(cfg)
  train, _, num_classes = make_source(cfg, cfg.train_split)
  eval_split = _eval_split_for(cfg, _available_splits(cfg))
  evals, _, _ = make_source(cfg, eval_split)
  return DataInfo(num_classes=num_classes, num_train=len(train), num_eval=len(evals), eval_split=eval_split)


def _available_splits(cfg: InputConfig) -> list[str] | None:
  if cfg.name in ("digits", "folder"):
    return None
  builder = _tfds_builder(cfg)
  return list(builder.info.splits.keys()) if builder.is_prepared() else None


# ---------------------------------------------------------------------------------------------------------------
# Iterators


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
  return process_index, process_count


def _per_host(batch_size: int, process_count: int, what: str) -> int:
  if batch_size % process_count:
    raise ValueError(f"input {what}={batch_size} is not divisible by process_count={process_count}: use a "
                     f"multiple of {process_count}")
  return batch_size // process_count


def _shard_bounds(n: int, process_index: int, process_count: int) -> tuple[int, int]:
  """Contiguous, disjoint, near-equal shards covering [0, n) (as tfds.even_splits does)."""
  return n * process_index // process_count, n * (process_index + 1) // process_count


def _read_options(cfg: InputConfig, per_host_batch: int) -> grain.ReadOptions:
  # grain's default buffer is 500 elements; a few batches are enough and keep 256 px pipelines small.
  return grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=max(2 * per_host_batch, 8))


def make_train_iterator(cfg: Any, *, seed: int, process_index: int | None = None,
                        process_count: int | None = None) -> grain.DatasetIterator:
  """The infinite, shuffled, augmented training iterator of this host.

  Args:
    cfg: an `InputConfig` (or dict / ConfigDict with its fields).
    seed: shuffling and augmentation seed; the same seed gives the same batches.
    process_index, process_count: this host and the number of hosts (default: jax's); each host reads the
      contiguous shard [n * i / p, n * (i + 1) / p) of the training split.

  Returns:
    A grain `DatasetIterator` of {"image": float32 (b, R, R, 3) in [-1, 1], "label": int32 (b,)} with
    b = batch_size / process_count. Save its position with `it.get_state()` and resume with `it.set_state(s)`.
    With `tokens_dir` set: {"tokens": int32 (b, L), "label": int32 (b,)} (var/token_data.py).
  """
  cfg = input_config(cfg)
  if cfg.tokens_dir:
    from var import token_data

    return token_data.make_train_iterator(cfg, seed=seed, process_index=process_index,
                                          process_count=process_count)
  process_index, process_count = _process(process_index, process_count)
  per_host = _per_host(cfg.batch_size, process_count, "batch_size")
  source, decode, _ = make_source(cfg, cfg.train_split)
  start, stop = _shard_bounds(len(source), process_index, process_count)
  if stop <= start:
    raise ValueError(f"split {cfg.train_split!r} of {cfg.name!r} has {len(source)} examples, fewer than "
                     f"process_count={process_count}: host {process_index} would read nothing")
  # Hosts shuffle different shards; folding the host into the seed also decorrelates their augmentations.
  host_seed = int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0])
  ds = (grain.MapDataset.source(source)[start:stop]
        .seed(host_seed)
        .shuffle()
        .map(decode)
        .random_map(TrainAugment(cfg.resolution, cfg.crop_scale, cfg.hflip))
        .repeat())  # each epoch is reshuffled and re-augmented (grain reseeds per epoch)
  ds = (ds.to_iter_dataset(_read_options(cfg, per_host))
        .batch(per_host, drop_remainder=True)
        .map(ToModelInput()))
  if cfg.workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.workers))
  return iter(ds)


def make_eval_dataset(cfg: Any, *, split: str | None = None, process_index: int | None = None,
                      process_count: int | None = None) -> grain.MapDataset:
  """One pass over the eval split as a grain MapDataset of batches (`len()` = number of batches).

  Every host gets the same number of full batches (collectives in a jitted eval step need that): each host's
  contiguous shard is padded with copies of a real example whose "mask" is False. Batches are
  {"image": float32 (b, R, R, 3), "label": int32 (b,), "mask": bool (b,)}, centre-cropped, not shuffled.
  """
  cfg = input_config(cfg)
  process_index, process_count = _process(process_index, process_count)
  split = split or _eval_split_for(cfg, _available_splits(cfg))
  per_host = _per_host(cfg.eval_batch_size or cfg.batch_size, process_count, "eval_batch_size")
  source, decode, _ = make_source(cfg, split)
  n = len(source)
  if n == 0:
    raise ValueError(f"split {split!r} of {cfg.name!r} is empty")
  start, stop = _shard_bounds(n, process_index, process_count)
  num_batches = math.ceil(math.ceil(n / process_count) / per_host)
  shard = _EvalShard(source, start, stop, num_batches * per_host)
  return (grain.MapDataset.source(shard)
          .map(decode)
          .map(EvalResizeCrop(cfg.resolution, cfg.crop_scale))
          .batch(per_host, drop_remainder=False)
          .map(ToModelInput()))


def make_eval_iterator(cfg: Any, *, split: str | None = None, process_index: int | None = None,
                       process_count: int | None = None) -> grain.DatasetIterator:
  """An iterator over `make_eval_dataset` (one pass; count valid examples with batch["mask"])."""
  cfg = input_config(cfg)
  ds = make_eval_dataset(cfg, split=split, process_index=process_index, process_count=process_count)
  per_host = (cfg.eval_batch_size or cfg.batch_size) // _process(process_index, process_count)[1]
  return iter(ds.to_iter_dataset(_read_options(cfg, per_host)))
