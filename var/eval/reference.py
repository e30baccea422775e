"""ADM-style batches: reading image sets (.npz arr_0, image folders, tfds splits) and reference statistics.

An ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz) is an .npz with
  arr_0    uint8 (N, H, W, 3)   images (ADM uses them only for precision/recall; 10k in the ImageNet batch)
  mu       (2048,)              pool3 mean           (FID)
  sigma    (2048, 2048)         pool3 covariance
  mu_s     (2023,)              spatial-feature mean (sFID)
  sigma_s  (2023, 2023)         spatial covariance
A batch with only arr_0 is also valid: its statistics are then computed from the images. Sample batches are the
same format with only arr_0 (what sample.py writes). Images are streamed in batches, never loaded at once.
"""

from __future__ import annotations

import abc
import dataclasses
import itertools
import os
import pathlib
import zipfile
from collections.abc import Iterator

import numpy as np

from var.eval.preprocess import validate_images

__all__ = [
  "STAT_KEYS",
  "FolderImages",
  "ImageSource",
  "NpzImages",
  "ReferenceBatch",
  "TfdsImages",
  "center_crop_arr",
  "load_reference",
  "open_images",
  "save_reference",
]

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


class ImageSource(abc.ABC):
  """A sized collection of same-shape uint8 RGB images, read in batches (npz, folder and tfds subclasses)."""

  name: str
  num_images: int
  image_shape: tuple[int, int, int]  # (H, W, 3)

  @abc.abstractmethod
  def read(self, start: int, stop: int) -> np.ndarray:  # (stop - start, H, W, 3) uint8
    """Images [start, stop) as one uint8 array."""

  def batches(self, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
    """Consecutive (<= batch_size, H, W, 3) uint8 batches over the first `limit` (default all) images."""
    n = self.num_images if limit is None else min(limit, self.num_images)
    for start in range(0, n, batch_size):
      batch = self.read(start, min(start + batch_size, n))
      validate_images(batch, f"{self.name}[{start}:{start + len(batch)}]")
      yield batch


def _check_image_shape(name: str, shape: tuple, dtype) -> None:
  # Validate the header's shape and dtype before reading any image: one dummy image carries the dtype check.
  if len(shape) == 4 and shape[0] > 0:
    validate_images(np.empty((1, *shape[1:]), dtype), name)
  else:
    validate_images(np.empty(shape, dtype), name)


class NpzImages(ImageSource):
  """arr_0 of an .npz, streamed from the archive member (works for 50k-image batches, compressed or not)."""

  def __init__(self, path: str | os.PathLike, key: str = "arr_0"):
    self.path, self.key, self.name = pathlib.Path(path), key, f"{path}:{key}"
    with zipfile.ZipFile(self.path) as zf:
      member = f"{key}.npy"
      if member not in zf.namelist():
        keys = sorted(n.removesuffix(".npy") for n in zf.namelist())
        raise KeyError(f"{path} has no {key!r} array (keys: {keys}); images must be stored as {key}, uint8 NHWC")
      with zf.open(member) as f:
        shape, fortran, dtype = _read_npy_header(f)
        self._offset = f.tell()
    if fortran:
      raise ValueError(f"{self.name} is stored in Fortran order; save it C-contiguous (np.ascontiguousarray)")
    _check_image_shape(self.name, shape, dtype)
    self.num_images, self.image_shape, self.dtype = shape[0], tuple(shape[1:]), dtype
    self._zip = None

  def read(self, start: int, stop: int) -> np.ndarray:
    # Sequential reads keep one open member stream; a backwards seek reopens it (zip members only seek forward).
    item = int(np.prod(self.image_shape)) * self.dtype.itemsize
    if self._zip is None or self._pos != start:
      self._zip = zipfile.ZipFile(self.path)
      self._member = self._zip.open(f"{self.key}.npy")
      self._member.seek(self._offset + start * item)
    raw = self._member.read((stop - start) * item)
    self._pos = stop
    return np.frombuffer(raw, self.dtype).reshape(stop - start, *self.image_shape)


def _read_npy_header(f):
  version = np.lib.format.read_magic(f)
  if version == (1, 0):
    return np.lib.format.read_array_header_1_0(f)
  return np.lib.format.read_array_header_2_0(f)


class FolderImages(ImageSource):
  """All PNG/JPEG files of a folder (sorted by name), converted to RGB; all must have the same size."""

  def __init__(self, folder: str | os.PathLike, center_crop: int | None = None):
    from PIL import Image

    self._image = Image
    self.folder, self.name, self.center_crop = pathlib.Path(folder), str(folder), center_crop
    self.files = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not self.files:
      raise ValueError(f"{folder}: empty input, no {'/'.join(IMAGE_EXTENSIONS)} files found")
    first = self._load(self.files[0])
    self.num_images, self.image_shape = len(self.files), first.shape

  def _load(self, path) -> np.ndarray:
    with self._image.open(path) as im:
      im = im.convert("RGB")
      arr = center_crop_arr(im, self.center_crop) if self.center_crop else np.asarray(im)
    return np.asarray(arr, np.uint8)

  def read(self, start: int, stop: int) -> np.ndarray:
    out = np.empty((stop - start, *self.image_shape), np.uint8)
    for i, path in enumerate(self.files[start:stop]):
      arr = self._load(path)
      if arr.shape != self.image_shape:
        raise ValueError(f"{path} is {arr.shape[1]}x{arr.shape[0]} but {self.files[0].name} is "
                         f"{self.image_shape[1]}x{self.image_shape[0]}: all images must have one size "
                         "(pass --center_crop SIZE to crop them to a common square)")
      out[i] = arr
    return out


class TfdsImages(ImageSource):
  """The 'image' feature of a tfds split read through `tfds.data_source` (ArrayRecord; no TensorFlow needed)."""

  def __init__(self, name: str, split: str, data_dir: str | None = None, center_crop: int | None = None,
               image_key: str = "image"):
    import tensorflow_datasets as tfds
    from PIL import Image

    self._image, self.center_crop, self.image_key = Image, center_crop, image_key
    self.name = f"tfds:{name}/{split}"
    self.source = tfds.data_source(name, split=split, data_dir=data_dir)
    self.num_images = len(self.source)
    if self.num_images == 0:
      raise ValueError(f"{self.name}: empty input (the split has no examples)")
    self.image_shape = self._get(0).shape

  def _get(self, i: int) -> np.ndarray:
    arr = np.asarray(self.source[i][self.image_key])
    if arr.ndim == 3 and arr.shape[-1] == 1:
      arr = np.repeat(arr, 3, axis=-1)
    if self.center_crop:
      arr = center_crop_arr(self._image.fromarray(arr), self.center_crop)
    return np.asarray(arr, np.uint8)

  def read(self, start: int, stop: int) -> np.ndarray:
    out = [self._get(i) for i in range(start, stop)]
    bad = [start + i for i, a in enumerate(out) if a.shape != self.image_shape]
    if bad:
      raise ValueError(f"{self.name}: example {bad[0]} has shape {out[bad[0] - start].shape}, example 0 has "
                       f"{self.image_shape}; pass --center_crop SIZE to bring all images to one size")
    return np.stack(out)


def center_crop_arr(pil_image, image_size: int) -> np.ndarray:
  """ADM's reference-batch crop (guided-diffusion `center_crop_arr`): BOX halvings, BICUBIC, centre crop."""
  from PIL import Image

  while min(*pil_image.size) >= 2 * image_size:
    pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
  scale = image_size / min(*pil_image.size)
  pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
  arr = np.asarray(pil_image)
  y, x = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
  return arr[y:y + image_size, x:x + image_size]


def open_images(spec: str, data_dir: str | None = None, center_crop: int | None = None) -> ImageSource:
  """'path.npz' (arr_0), a folder of PNG/JPEG files, or 'tfds:name/split' -> an ImageSource."""
  if spec.startswith("tfds:"):
    name, sep, split = spec.removeprefix("tfds:").rpartition("/")
    if not sep or not name or not split:
      raise ValueError(f"bad tfds spec {spec!r}: expected 'tfds:name/split', e.g. 'tfds:imagenet2012/validation'")
    return TfdsImages(name, split, data_dir, center_crop)
  path = pathlib.Path(spec)
  if path.is_dir():
    return FolderImages(path, center_crop)
  if not path.is_file():
    raise FileNotFoundError(f"{spec} does not exist (expected an .npz with arr_0, an image folder or tfds:name/split)")
  if center_crop:
    raise ValueError(f"--center_crop applies to folders and tfds splits, not to the .npz {spec}")
  return NpzImages(path)


@dataclasses.dataclass
class ReferenceBatch:
  """Reference statistics (None when they must be computed from `images`) and the reference images."""

  path: str
  mu: np.ndarray | None = None
  sigma: np.ndarray | None = None
  mu_s: np.ndarray | None = None
  sigma_s: np.ndarray | None = None
  images: ImageSource | None = None

  @property
  def has_stats(self) -> bool:
    return self.mu is not None


def load_reference(path: str | os.PathLike, pool3_dim: int = 2048, spatial_dim: int = 2023) -> ReferenceBatch:
  """Read an ADM reference batch (or a file written by `save_reference`), checking keys and shapes.

  Valid files hold all of mu, sigma, mu_s, sigma_s and/or arr_0. With stats present they are used as is (as ADM
  does); arr_0 is needed for precision/recall only.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"reference batch {path} does not exist")
  with np.load(path, allow_pickle=False) as z:
    keys = set(z.files)
    present = [k for k in STAT_KEYS if k in keys]
    if (present and len(present) < len(STAT_KEYS)) or (not present and "arr_0" not in keys):
      missing = [k for k in STAT_KEYS if k not in keys] + ([] if "arr_0" in keys else ["arr_0"])
      raise KeyError(f"reference batch {path} is missing key(s) {missing} (has {sorted(keys)}); an ADM reference "
                     "batch needs mu, sigma, mu_s, sigma_s (and arr_0 for precision/recall), or at least arr_0. "
                     "Create one with `python -m var.eval.fid --samples IMAGES --save_stats OUT.npz`")
    ref = ReferenceBatch(str(path))
    if present:
      want = {"mu": (pool3_dim,), "sigma": (pool3_dim, pool3_dim), "mu_s": (spatial_dim,),
              "sigma_s": (spatial_dim, spatial_dim)}
      bad = [f"{k} {z[k].shape} (expected {want[k]})" for k in STAT_KEYS if z[k].shape != want[k]]
      if bad:
        raise ValueError(f"reference batch {path} has wrong shapes: {', '.join(bad)}")
      for k in STAT_KEYS:
        setattr(ref, k, np.asarray(z[k], np.float64))
  if "arr_0" in keys:
    ref.images = NpzImages(path)
  return ref


def save_reference(path: str | os.PathLike, mu, sigma, mu_s, sigma_s, images: Iterator[np.ndarray] | None = None,
                   num_images: int = 0) -> None:
  """Write an ADM-format reference batch. `images` (batches, `num_images` in total) are streamed into arr_0.

  The archive is uncompressed like ADM's, and written member by member so arr_0 never has to fit in memory.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
    for key, value in zip(STAT_KEYS, (mu, sigma, mu_s, sigma_s), strict=True):
      with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array(f, np.asarray(value, np.float64))
    if images is None:
      return
    images = iter(images)
    first = next(images)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (num_images, *first.shape[1:])}
    written = 0
    with zf.open("arr_0.npy", "w", force_zip64=True) as f:
      np.lib.format.write_array_header_2_0(f, header)
      for batch in itertools.chain([first], images):
        f.write(np.ascontiguousarray(batch, np.uint8).tobytes())
        written += len(batch)
    if written != num_images:
      raise ValueError(f"save_reference: got {written} images, but num_images={num_images}")
