"""The embedded default dataset as a tfds builder: UCI handwritten digits (1,797 real 8x8 images, 10 classes).

The images ship inside scikit-learn (`sklearn/datasets/data/digits.csv.gz`, the test set of E. Alpaydin and
C. Kaynak's "Optical Recognition of Handwritten Digits", UCI, CC BY 4.0), so preparing needs neither a network
nor TensorFlow: the features are a `Tensor` (8, 8) uint8 of grey levels 0..16 and a `ClassLabel`, written as
ArrayRecord and read back with `tfds.data_source`. The held-out split is stratified and fixed (seeded numpy PCG64
permutation per class), so every machine gets the same 1,438 train / 359 test images.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

NAME = "uci_digits"
NUM_CLASSES = 10
SIZE = 8  # source images are SIZE x SIZE
MAX_LEVEL = 16  # grey levels 0..16 (counts of set pixels in 4x4 blocks of the 32x32 scans)
TEST_FRACTION = 0.2
SPLIT_SEED = 0

_CITATION = """@misc{alpaydin1998digits,
  author = {Alpaydin, E. and Kaynak, C.},
  title = {Optical Recognition of Handwritten Digits},
  year = {1998},
  howpublished = {UCI Machine Learning Repository},
  note = {DOI: 10.24432/C50P49}
}"""


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  """All 1,797 digits from the copy inside scikit-learn: (images (N, 8, 8) uint8 levels 0..16, labels (N,) int64)."""
  from sklearn.datasets import load_digits  # imported here: scikit-learn is only needed to prepare

  digits = load_digits()
  return digits.images.astype(np.uint8), digits.target.astype(np.int64)


def split_indices(labels: np.ndarray, split: str) -> np.ndarray:
  """Sorted indices of `split` ("train" or "test"): per class, a fixed permutation; its first 20% are "test"."""
  if split not in ("train", "test"):
    raise ValueError(f"digits split {split!r} does not exist: use 'train' or 'test'")
  rng = np.random.default_rng(SPLIT_SEED)
  test = []
  for c in range(NUM_CLASSES):
    members = np.flatnonzero(labels == c)
    members = members[rng.permutation(len(members))]
    test.append(members[: round(TEST_FRACTION * len(members))])
  is_test = np.zeros(len(labels), bool)
  is_test[np.concatenate(test)] = True
  return np.flatnonzero(is_test if split == "test" else ~is_test)


class UciDigits(tfds.core.GeneratorBasedBuilder):
  """UCI handwritten digits, 8x8 grey levels 0..16, stratified train (1,438) / test (359) splits."""

  VERSION = tfds.core.Version("1.0.0")
  # tfds finds a builder's checksum file through `code_path`, whose default probes `importlib_resources` (not a
  # dependency here); this builder downloads nothing, so point it at this file directly.
  code_path = epath.Path(__file__)
  RELEASE_NOTES = {"1.0.0": "Stratified 80/20 train/test split of the 1,797 digits shipped with scikit-learn."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="UCI Optical Recognition of Handwritten Digits (the copy shipped in scikit-learn): 8x8 images "
      "of grey levels 0..16, 10 classes.",
      features=tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(SIZE, SIZE), dtype=np.uint8),
        "label": tfds.features.ClassLabel(names=[str(i) for i in range(NUM_CLASSES)]),
      }),
      supervised_keys=("image", "label"),
      homepage="https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits",
      citation=_CITATION,
      license="CC BY 4.0",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: the data ships with scikit-learn
    return {split: self._generate_examples(split) for split in ("train", "test")}

  def _generate_examples(self, split: str):
    images, labels = load_digits_arrays()
    for i in split_indices(labels, split):
      yield int(i), {"image": images[i], "label": int(labels[i])}


def default_data_dir() -> str:
  """Where datasets are prepared when no data_dir is given: $TFDS_DATA_DIR or ~/tensorflow_datasets."""
  return os.environ.get("TFDS_DATA_DIR", os.path.join(os.path.expanduser("~"), "tensorflow_datasets"))


def prepare(data_dir: str | os.PathLike | None = None) -> str:
  """Writes the digits into `data_dir` as ArrayRecord unless already there (no network); returns data_dir."""
  data_dir = os.fspath(data_dir) if data_dir is not None else default_data_dir()
  builder = UciDigits(data_dir=data_dir, file_format="array_record")
  if not builder.is_prepared():
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return data_dir
