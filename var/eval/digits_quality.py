"""Quality of generated digits, judged by a small classifier trained only on the real digits training split.

`make demo` trains a class-conditional VAR on the embedded UCI digits; this module says how good its samples are
without any downloaded network: a small MLP on the images area-pooled to the digits' native 8x8 (a few seconds
on a CPU, deterministic given the seed) is trained
on the real training split at the demo resolution and then reports

* its own accuracy on the real held-out split (how far the judge can be trusted: >= 0.9),
* the class accuracy of generated digits against the labels they were requested with,
* the Frechet distance between generated and real held-out digits on the digits' native 8x8 grid (area
  average, grey levels 0..16: a space that shows blur) and in the judge's penultimate (64-d) features (FID's
  formula, float64 numpy / scipy sqrtm), each next to the distance of an equally large sample of real training
  digits, so a reader can tell a good score from a bad one (FD is biased upwards at small N).

Usage::

  judge = DigitsJudge.train(resolution=16, seed=0)  # crop_scale / upsample as config.input of the generator
  print(judge.report(images, labels))   # images (N, 16, 16, 3 or 1) in [-1, 1] or [0, 1]; labels (N,)

The same measures as plain functions on (N, H, W, 3) images in [0, 1] (what a benchmark calls):
`to_grid8`, `frechet_distance`, `grid_frechet_distance`, `real_grid_frechet_distance`, `psnr`,
`judge_accuracy`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.linalg
from flax import nnx

from var import data, digits_builder

NUM_CLASSES = 10
FEATURE_DIM = 64
NATIVE = 8  # the digits' own resolution
MAX_LEVEL = digits_builder.MAX_LEVEL  # grey levels 0..16


class DigitsNet(nnx.Module):
  """Area-pool to the digits' native 8x8, then an MLP; its 64-d second hidden layer is the feature space.

  The real digits hold no detail finer than 8x8 (they are upsampled from it), so pooling loses nothing of
  theirs and keeps the judge a few seconds' work on a CPU at any resolution.
  """

  def __init__(self, resolution: int, *, rngs: nnx.Rngs):
    if resolution % NATIVE:
      raise ValueError(f"resolution={resolution} must be a multiple of {NATIVE} (the digits are {NATIVE}x{NATIVE})")
    self.pool = resolution // NATIVE
    self.hidden = nnx.Linear(NATIVE * NATIVE * 3, 256, rngs=rngs)
    self.feature = nnx.Linear(256, FEATURE_DIM, rngs=rngs)
    self.head = nnx.Linear(FEATURE_DIM, NUM_CLASSES, rngs=rngs)

  def features(self, x):  # (B, R, R, 3) in [-1, 1] -> (B, 64)
    b, r = x.shape[0], x.shape[1]
    x = x.reshape(b, r // self.pool, self.pool, r // self.pool, self.pool, 3).mean(axis=(2, 4))  # (B, 8, 8, 3)
    x = jax.nn.gelu(self.hidden(x.reshape(b, -1)))
    return jax.nn.gelu(self.feature(x))

  def __call__(self, x):  # -> logits (B, 10)
    return self.head(self.features(x))


def _shift(images, key, max_shift: int):
  """Random translations by up to max_shift pixels (background -1 fills in): makes the judge robust to the
  small offsets of VAR's crop augmentation in generated digits."""
  b, r = images.shape[0], images.shape[1]
  padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)), constant_values=-1.0)
  offsets = jax.random.randint(key, (b, 2), 0, 2 * max_shift + 1)
  crop = lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (r, r, im.shape[-1]))
  return jax.vmap(crop)(padded, offsets)


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "batch_size", "max_shift", "learning_rate"))
def _fit(params, images, labels, key, *, graphdef, steps: int, batch_size: int, max_shift: int,
         learning_rate: float):
  """All training steps in one jitted fori_loop: epoch-wise permutations, translation augmentation, Adam."""
  tx = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
  n = images.shape[0]
  steps_per_epoch = n // batch_size
  perm_key, shift_key = jax.random.split(key)

  def loss_fn(p, x, y):
    logits = nnx.merge(graphdef, p)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(i, carry):
    p, opt_state = carry
    perm = jax.random.permutation(jax.random.fold_in(perm_key, i // steps_per_epoch), n)
    idx = jax.lax.dynamic_slice(perm, ((i % steps_per_epoch) * batch_size,), (batch_size,))
    x = _shift(images[idx], jax.random.fold_in(shift_key, i), max_shift)
    grads = jax.grad(loss_fn)(p, x, labels[idx])
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state

  params, _ = jax.lax.fori_loop(0, steps, step, (params, tx.init(params)))
  return params


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _apply(params, images, *, graphdef):
  model = nnx.merge(graphdef, params)
  feats = model.features(images)
  return model.head(feats), feats


def to_model_range(images, value_range: str = "auto") -> np.ndarray:
  """Images (N, R, R, 3 or 1) -> float32 (N, R, R, 3) in [-1, 1].

  value_range: "[-1,1]", "[0,1]", "uint8" (0..255), or "auto": uint8 arrays are 0..255, float arrays with a
  negative value are [-1, 1], others [0, 1] (pass the range explicitly for batches that could be either).
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"images of shape {images.shape} are not NHWC with 1 or 3 channels")
  if value_range == "auto":
    value_range = "uint8" if images.dtype == np.uint8 else ("[-1,1]" if images.min() < 0 else "[0,1]")
  x = images.astype(np.float32)
  if value_range == "uint8":
    x = x / 127.5 - 1.0
  elif value_range == "[0,1]":
    x = x * 2.0 - 1.0
  elif value_range != "[-1,1]":
    raise ValueError(f"value_range={value_range!r} must be 'auto', '[-1,1]', '[0,1]' or 'uint8'")
  lo, hi = float(x.min()), float(x.max())
  if lo < -1.5 or hi > 1.5:
    raise ValueError(f"images span [{lo:.3g}, {hi:.3g}] after mapping {value_range} to [-1, 1]: pass the right "
                     "value_range ('[-1,1]', '[0,1]' or 'uint8')")
  x = np.clip(x, -1.0, 1.0)  # decoders overshoot a little; the training data never leaves [-1, 1]
  return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and covariance (float64) of (N, D) features."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"need (N >= 2, D) features for a covariance, got shape {f.shape}")
  return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64 (the FID formula of pytorch-fid)."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  diff = mu1 - mu2
  with warnings.catch_warnings():  # a singular product is expected (e.g. collapsed samples) and handled below
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # regularise, as pytorch-fid does
      offset = np.eye(sigma1.shape[0]) * eps
      covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  covmean = np.real(covmean)  # numerical noise can leave tiny imaginary parts
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


# ------------------------------------------------------------------------------------------------------------
# Plain quality functions on (N, H, W, 3) images in [0, 1] (what a benchmark calls)
# ------------------------------------------------------------------------------------------------------------


def to_grid8(images, value_range: str = "[0,1]") -> np.ndarray:
  """Images (N, R, R, 3 or 1) -> (N, 64) float64 grey levels 0..16 on the digits' native 8x8 grid.

  The area average of R / 8 x R / 8 blocks (and of the channels), scaled to the UCI grey levels: the real digits
  come back exactly as they ship (they are nearest-upsampled 8x8 images), so any blur, ringing or shift of a
  generator shows up in this 64-d space as a change of grey levels. R must be a multiple of 8.
  """
  x = (to_model_range(images, value_range).astype(np.float64) + 1.0) / 2.0  # (N, R, R, 3) in [0, 1]
  n, r = x.shape[0], x.shape[1]
  if r % NATIVE or x.shape[2] != r:
    raise ValueError(f"images are {r}x{x.shape[2]}: the 8x8 grid needs square images with a side that is a "
                     f"multiple of {NATIVE} (8, 16, 32, ...)")
  k = r // NATIVE
  grid = x.mean(axis=-1).reshape(n, NATIVE, k, NATIVE, k).mean(axis=(2, 4))
  return grid.reshape(n, NATIVE * NATIVE) * MAX_LEVEL


def frechet_distance(features_a, features_b) -> float:
  """Frechet distance between Gaussian fits of two feature sets (N, D) and (M, D) (FID's formula, float64)."""
  return frechet_distance_from_stats(*gaussian_stats(features_a), *gaussian_stats(features_b))


@functools.cache
def real_grid8(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
  """The real digits of `split` ("train": 1,438, "test": 359) on the 8x8 grid: ((N, 64) float64 levels, labels)."""
  levels, labels = digits_builder.load_digits_arrays()
  idx = digits_builder.split_indices(labels, split)
  return levels[idx].reshape(len(idx), -1).astype(np.float64), labels[idx]


def grid_frechet_distance(images, value_range: str = "[0,1]", reference: np.ndarray | None = None) -> float:
  """Frechet distance of `images` to the real held-out digits (or `reference` (M, 64) levels) on the 8x8 grid."""
  ref = real_grid8("test")[0] if reference is None else reference
  return frechet_distance(to_grid8(images, value_range), ref)


def real_grid_frechet_distance(n: int, seed: int = 0, draws: int = 5) -> float:
  """What a perfect generator scores with `grid_frechet_distance` at N = n: the mean over `draws` seeded random
  samples of n real training digits of their 8x8-grid distance to the real held-out digits (FD is biased
  upwards at small N, so always read a distance beside this value at the same N)."""
  train = real_grid8("train")[0]
  if not 2 <= n <= len(train):
    raise ValueError(f"n={n} must be in [2, {len(train)}] (the real training digits)")
  rng = np.random.default_rng(seed)
  test = real_grid8("test")[0]
  return float(np.mean([frechet_distance(train[rng.choice(len(train), n, replace=False)], test)
                        for _ in range(draws if n < len(train) else 1)]))


def psnr(images, reference, value_range: str = "[0,1]") -> float:
  """Mean over images of the PSNR (dB) of `images` against `reference` (both (N, H, W, C), the same range).

  Peak-to-peak is the full range (1 for [0, 1], 2 for [-1, 1], 255 for uint8), so the figure is the same in
  any range; values are clipped to that range first (decoders overshoot a little).
  """
  a, b = to_model_range(images, value_range), to_model_range(reference, value_range)
  if a.shape != b.shape:
    raise ValueError(f"images {a.shape} and reference {b.shape} must have the same shape")
  mse = np.mean(np.square(a.astype(np.float64) - b.astype(np.float64)), axis=(1, 2, 3))
  return float(np.mean(10.0 * np.log10(4.0 / np.maximum(mse, 1e-12))))


@functools.cache
def default_judge(resolution: int = 16, crop_scale: float = 1.0, upsample: str = "nearest") -> DigitsJudge:
  """The judge `judge_accuracy` uses: DigitsJudge.train(resolution, seed=0, ...), trained once per process."""
  return DigitsJudge.train(resolution, seed=0, crop_scale=crop_scale, upsample=upsample)


def judge_accuracy(images, labels, value_range: str = "[0,1]", judge: DigitsJudge | None = None) -> float:
  """Fraction of `images` (N, R, R, C) that the judge (default: `default_judge(R)`) classifies as `labels`."""
  judge = judge or default_judge(int(np.asarray(images).shape[1]))
  return judge.accuracy(images, labels, value_range)


def _training_views(split: str, resolution: int, upsample: str, crop_scale: float, seed: int):
  """Real digits as a generator trained with `crop_scale` saw them: one seeded random crop of each image."""
  images, labels = data.digits_images(split, resolution, upsample)
  if crop_scale != 1.0:
    crop = data.TrainAugment(resolution, crop_scale, hflip=False)
    rng = np.random.default_rng(seed)
    images = np.stack([crop.random_map({"image": im, "label": 0}, rng)["image"] for im in images])
  return images, labels


@dataclasses.dataclass
class DigitsJudge:
  """A trained digits classifier plus the real held-out statistics it compares samples against."""

  resolution: int
  graphdef: nnx.GraphDef
  params: nnx.State
  test_accuracy: float  # on the real held-out split
  train_seconds: float
  train_features: np.ndarray  # (N_train, 64) of the real training digits
  test_features: np.ndarray  # (N_test, 64) of the real held-out digits
  train_grid: np.ndarray | None = None  # (N_train, 64) the training views on the 8x8 grid (levels 0..16)
  test_grid: np.ndarray | None = None  # (N_test, 64) the held-out views on the 8x8 grid
  seed: int = 0
  crop_scale: float = 1.0

  @classmethod
  def train(cls, resolution: int = 32, seed: int = 0, *, crop_scale: float = 1.0, upsample: str = "nearest",
            epochs: int = 100, batch_size: int = 128, learning_rate: float = 2e-3) -> DigitsJudge:
    """Trains the judge on the real digits training split at `resolution` (deterministic given `seed`).

    Pass the `crop_scale` and `upsample` of the generator's input config: the real digits are then seen as the
    generator saw them in training (upsampled, then one random crop_scale crop per image, fixed by `seed`), so a
    perfect generator scores like real data. Training also shifts digits randomly by up to R/8 pixels.
    """
    if not isinstance(resolution, (int, np.integer)) or resolution <= 0 or resolution % NATIVE:
      raise ValueError(f"resolution={resolution!r} must be a positive multiple of {NATIVE} (8, 16, 32, ...)")
    start = time.perf_counter()
    train_images, train_labels = _training_views("train", resolution, upsample, crop_scale, seed)
    test_images, test_labels = _training_views("test", resolution, upsample, crop_scale, seed + 1)
    x_train = to_model_range(train_images, "uint8")
    model = DigitsNet(resolution, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    steps = epochs * (len(x_train) // batch_size)
    params = _fit(params, jnp.asarray(x_train), jnp.asarray(train_labels), jax.random.key(seed), graphdef=graphdef,
                  steps=steps, batch_size=batch_size, max_shift=max(1, resolution // 8),
                  learning_rate=float(learning_rate))
    judge = cls(resolution=resolution, graphdef=graphdef, params=params, test_accuracy=float("nan"),
                train_seconds=0.0, train_features=np.zeros((0, FEATURE_DIM)),
                test_features=np.zeros((0, FEATURE_DIM)), seed=seed, crop_scale=crop_scale)
    judge.train_features = judge.features(x_train, value_range="[-1,1]")
    judge.train_grid = to_grid8(x_train, "[-1,1]")
    judge.test_grid = to_grid8(test_images, "uint8")
    judge.test_features = judge.features(test_images, value_range="uint8")
    judge.test_accuracy = judge.accuracy(test_images, test_labels, value_range="uint8")
    judge.train_seconds = time.perf_counter() - start
    return judge

  def _run(self, images, value_range: str, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    x = to_model_range(images, value_range)
    if x.shape[1:3] != (self.resolution, self.resolution):
      raise ValueError(f"images are {x.shape[1]}x{x.shape[2]} but the judge was trained at "
                       f"{self.resolution}x{self.resolution}: train one with DigitsJudge.train({x.shape[1]})")
    logits, feats = [], []
    for i in range(0, len(x), chunk):
      lg, ft = _apply(self.params, jnp.asarray(x[i:i + chunk]), graphdef=self.graphdef)
      logits.append(np.asarray(lg))
      feats.append(np.asarray(ft))
    return np.concatenate(logits), np.concatenate(feats)

  def predict(self, images, value_range: str = "auto") -> np.ndarray:
    """Predicted classes (N,) of images (N, R, R, C)."""
    return self._run(images, value_range)[0].argmax(-1)

  def features(self, images, value_range: str = "auto") -> np.ndarray:
    """Penultimate features (N, 64) of images (N, R, R, C)."""
    return self._run(images, value_range)[1].astype(np.float64)

  def accuracy(self, images, labels, value_range: str = "auto") -> float:
    """Fraction of images classified as their label."""
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(images):
      raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
      raise ValueError(f"labels span [{labels.min()}, {labels.max()}]: digits labels are 0..9")
    return float((self.predict(images, value_range) == labels).mean())

  def frechet_distance(self, images, value_range: str = "auto", reference: np.ndarray | None = None) -> float:
    """Frechet distance between `images` and the real held-out digits (or `reference` features) in feature space."""
    ref = self.test_features if reference is None else reference
    return frechet_distance_from_stats(*gaussian_stats(self.features(images, value_range)), *gaussian_stats(ref))

  def report(self, images, labels, value_range: str = "auto", draws: int = 5) -> dict:
    """Accuracy and Frechet distances of generated digits, with the real-data references to read them by.

    Returns a JSON-ready dict: judge_test_accuracy (real held-out), accuracy (generated vs requested labels),
    per_class_accuracy, and two Frechet distances to the real held-out digits, each beside the value of a real
    sample of the same N (`*_real_same_n`: the mean over `draws` seeded random samples of as many real training
    digits, what a perfect generator gets at this N) and of all real training digits (`*_real_train`):

    * fd: on the 8x8 grid (`to_grid8`: area average to the digits' native grid, grey levels 0..16). The real
      digits hold exactly this information, so blur, ringing, faint strokes or shifts all move it; it is the
      headline figure.
    * fd_features: in the judge's 64-d penultimate features. The classifier is trained to ignore what does not
      change the class (it sees shifted digits in training), so this space hides blur: read it as a check of
      the class structure, not of fidelity.
    """
    labels = np.asarray(labels).reshape(-1)
    logits, feats = self._run(images, value_range)
    if len(labels) != len(feats):
      raise ValueError(f"{len(feats)} images but {len(labels)} labels")
    grid = to_grid8(images, value_range)
    pred = logits.argmax(-1)
    per_class = [float((pred[labels == c] == c).mean()) if np.any(labels == c) else None
                 for c in range(NUM_CLASSES)]
    n = len(feats)
    m = min(n, len(self.train_features))
    rng = np.random.default_rng(self.seed)
    num_train = len(self.train_features)
    picks = [rng.choice(num_train, m, replace=False) for _ in range(draws if m < num_train else 1)]
    return {
      "resolution": self.resolution,
      "crop_scale": self.crop_scale,
      "num_images": n,
      "judge_test_accuracy": self.test_accuracy,
      "accuracy": float((pred == labels).mean()),
      "per_class_accuracy": per_class,
      "fd_space": "8x8 grid grey levels 0..16 (area average)",
      "fd": frechet_distance(grid, self.test_grid),
      "fd_real_same_n": float(np.mean([frechet_distance(self.train_grid[i], self.test_grid) for i in picks])),
      "fd_real_train": frechet_distance(self.train_grid, self.test_grid),
      "fd_features": frechet_distance(feats, self.test_features),
      "fd_features_real_same_n": float(np.mean([frechet_distance(self.train_features[i], self.test_features)
                                                for i in picks])),
      "fd_features_real_train": frechet_distance(self.train_features, self.test_features),
    }


# ------------------------------------------------------------------------------------------------------------
# Tokenizer fidelity on the real digits
# ------------------------------------------------------------------------------------------------------------


def reconstruct(vae, images, batch_size: int = 256) -> np.ndarray:
  """Images (N, R, R, 3) uint8 -> the tokenizer's reconstructions through its tokens, (N, R, R, 3) in [0, 1],
  and the tokens [(N, pn^2) int32] per scale."""
  fn = _reconstruct_fn()
  recs, tokens = [], []
  for i in range(0, len(images), batch_size):
    x = jnp.asarray(to_model_range(images[i:i + batch_size], "uint8"))
    rec, idx = fn(vae, x)
    recs.append((np.asarray(rec, np.float32) + 1.0) / 2.0)
    tokens.append([np.asarray(t) for t in idx])
  return np.concatenate(recs), [np.concatenate(t) for t in zip(*tokens, strict=True)]


@functools.cache
def _reconstruct_fn():
  @nnx.jit
  def fn(vae, x):
    idx = vae.img_to_idx(x)
    return vae.fhat_to_img(vae.idx_to_fhat(idx)), idx

  return fn


def codebook_use(tokens, vocab_size: int) -> dict:
  """Per scale: the fraction of the vocabulary used and the perplexity of the token histogram."""
  used, ppl = [], []
  for t in tokens:
    counts = np.bincount(np.asarray(t).reshape(-1), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    used.append(float(np.mean(counts > 0)))
    ppl.append(float(np.exp(-np.sum(p * np.log(p)))))
  return {"codes_used_per_scale": used, "perplexity_per_scale": ppl}


def tokenizer_report(vae, resolution: int = 16, upsample: str = "nearest") -> dict:
  """How much of the real digits a tokenizer keeps (JSON-ready):

  psnr_db (held-out reconstructions vs the held-out digits, peak-to-peak 1), grid_mae_levels (their mean
  absolute error on the 8x8 grid, in grey levels 0..16), fd (8x8-grid Frechet distance of the reconstructions
  of the training digits to the real held-out digits) beside fd_real (the real training digits' distance: what
  a lossless tokenizer scores), and per-scale codebook use on the held-out tokens.
  """
  test, _ = data.digits_images("test", resolution, upsample)
  train, _ = data.digits_images("train", resolution, upsample)
  rec_test, tokens = reconstruct(vae, test)
  rec_train, _ = reconstruct(vae, train)
  test_grid = to_grid8(test, "uint8")
  out = {
    "psnr_db": psnr(rec_test, test.astype(np.float32) / 255.0),
    "grid_mae_levels": float(np.abs(to_grid8(rec_test) - test_grid).mean()),
    "fd": frechet_distance(to_grid8(rec_train), test_grid),
    "fd_real": frechet_distance(to_grid8(train, "uint8"), test_grid),
    "num_heldout": len(test),
    "vocab_size": int(vae.config.vocab_size),
    "patch_nums": list(vae.config.patch_nums),
  }
  out.update(codebook_use(tokens, vae.config.vocab_size))
  return out
