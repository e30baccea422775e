"""Rewards and features for test-time search (var/search.py), as plain functions of images in [0, 1].

  reward(images (B, H, W, 3) float in [0, 1], labels (B,) int) -> (B,) float32 scores, higher is better
  features(images, labels) -> (B, T, D) feature tokens (or (B, D) vectors)

Both are traced inside the sampler's jit (the search hooks call them on `ctx['decode'](f_hat)`), so they must be
jax-traceable and shape-static. That keeps the select contract of var/plan.py (one pure function per selection,
no host round-trip, the candidates never leave the devices) and lets XLA fuse the decode with the reward. It is
the right trade for the digits classifier (about 1 MFLOP an image). The FID Inception-v3 costs about 6 GFLOPs
per image at 299x299 however small the sample, so on a CPU use it only for a few images; on an accelerator it
runs only at the 2-4 selection scales of the plan, as the spec asks.

Shipped:
* `classifier_reward(logits_fn)`: log p(requested class | image) from any classifier callable (images in [0, 1]
  -> logits (B, C)); `load_classifier(DIR)` reads one trained by `python -m var.rewards train-digits-classifier
  --out DIR` (configs/digits_classifier.py: a small CNN, independent of the evaluation judge). A label outside
  0..C-1 (the unconditional class id) scores the classifier's most likely class.
* `InceptionScorer`: the bundled FID Inception-v3 (weights from a path or $VARJAX_INCEPTION_WEIGHTS, never
  downloaded): `.tokens` the 8x8 Mixed_7c map (64 tokens x 2048; their mean is pool3), `.reward` the negative
  entropy of its softmax (the per-image Inception-Score term; class-agnostic).
* `load_user_function("module:function")`: any callable with the reward (or features) signature.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import importlib.util
import json
import os
import pathlib
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

CLASSIFIER_CONFIG = "classifier.json"
CLASSIFIER_PARAMS = "params.npz"

# ----------------------------------------------------------------------------------------------------------------
# The digits reward classifier


class DigitsCNN(nnx.Module):
  """Two 3x3 conv + 2x2 average-pool stages on the full-resolution image, then a linear head on the mean of
  the final (R/4 x R/4) feature map. Its feature tokens are that map's positions (16 tokens x 64 at 16px)."""

  def __init__(self, resolution: int, channels=(32, 64), num_classes: int = 10, *, rngs: nnx.Rngs):
    if resolution % 4:
      raise ValueError(f"resolution={resolution} must be a multiple of 4 (two 2x2 pools)")
    self.resolution, self.num_classes = resolution, num_classes
    c1, c2 = channels
    self.conv1 = nnx.Conv(3, c1, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(c1, c2, (3, 3), rngs=rngs)
    self.head = nnx.Linear(c2, num_classes, rngs=rngs)

  def tokens(self, images):  # (B, R, R, 3) in [0, 1] -> (B, (R/4)^2, C2)
    x = images.astype(jnp.float32) * 2.0 - 1.0
    x = nnx.avg_pool(jax.nn.gelu(self.conv1(x)), (2, 2), strides=(2, 2))
    x = nnx.avg_pool(jax.nn.gelu(self.conv2(x)), (2, 2), strides=(2, 2))
    return x.reshape(x.shape[0], -1, x.shape[-1])

  def __call__(self, images):  # -> logits (B, num_classes)
    return self.head(self.tokens(images).mean(axis=1))


@dataclasses.dataclass(frozen=True)
class Classifier:
  """A loaded reward classifier: `logits(images)` (B, C), `tokens(images)` (B, T, D), and its input size."""
  model: DigitsCNN
  resolution: int
  num_classes: int
  test_accuracy: float | None = None

  def logits(self, images):
    return self.model(images)

  def tokens(self, images, labels=None):
    del labels
    return self.model.tokens(images)

  def reward(self, images, labels):
    return classifier_reward(self.logits)(images, labels)


def classifier_reward(logits_fn: Callable) -> Callable:
  """reward(images, labels) = log softmax(logits_fn(images))[label]; labels outside 0..C-1 (the unconditional
  id) score the most likely class instead."""

  def reward(images, labels):
    logp = jax.nn.log_softmax(logits_fn(images).astype(jnp.float32), axis=-1)  # (B, C)
    c = logp.shape[-1]
    valid = (labels >= 0) & (labels < c)
    picked = jnp.take_along_axis(logp, jnp.clip(labels, 0, c - 1)[:, None].astype(jnp.int32), axis=-1)[:, 0]
    return jnp.where(valid, picked, logp.max(axis=-1))

  return reward


def _shift(images, key, max_shift: int):
  """Random translations by up to max_shift pixels; the black background (0) fills in."""
  b, r = images.shape[0], images.shape[1]
  padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
  offsets = jax.random.randint(key, (b, 2), 0, 2 * max_shift + 1)
  return jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (r, r, 3)))(padded, offsets)


def _fit(params, images, labels, key, *, graphdef, steps, batch_size, max_shift, learning_rate):
  """Uniform minibatches with replacement, random shifts, Adam + cosine: one jitted step per Python iteration
  (XLA's CPU backend runs these small convolutions ~100x slower inside a `fori_loop` body than as a program of
  their own)."""
  tx = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))

  def loss_fn(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, p)(x), y).mean()

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(p, opt_state, i, images, labels):  # the data are arguments, not constants folded into the program
    k_idx, k_shift = jax.random.split(jax.random.fold_in(key, i))
    idx = jax.random.randint(k_idx, (batch_size,), 0, images.shape[0])
    grads = jax.grad(loss_fn)(p, _shift(images[idx], k_shift, max_shift), labels[idx])
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state

  params = jax.tree.map(jnp.array, params)  # own copies: the step donates them
  opt_state = tx.init(params)
  for i in range(steps):
    params, opt_state = step(params, opt_state, i, images, labels)
  return params


def _digits_views(split: str, resolution: int, crop_scale: float, views: int, seed: int):
  """(N * views, R, R, 3) float32 in [0, 1] random crop_scale crops (as the generator saw its data), labels."""
  from var import data

  images, labels = data.digits_images(split, resolution)
  if crop_scale != 1.0:
    crop = data.TrainAugment(resolution, crop_scale, hflip=False)
    rng = np.random.default_rng(seed)
    images = np.concatenate([np.stack([crop.random_map({"image": im, "label": 0}, rng)["image"] for im in images])
                             for _ in range(views)])
    labels = np.tile(labels, views)
  return images.astype(np.float32) / 255.0, labels.astype(np.int32)


def train_digits_classifier(config, out_dir: str | os.PathLike | None = None) -> Classifier:
  """Trains the digits reward classifier on the embedded digits' train split (configs/digits_classifier.py);
  reports its accuracy on the held-out split and, with `out_dir`, saves it there for `load_classifier`."""
  t0 = time.perf_counter()
  x, y = _digits_views("train", config.resolution, config.crop_scale, config.views, config.seed)
  model = DigitsCNN(config.resolution, tuple(config.channels), config.num_classes, rngs=nnx.Rngs(config.seed))
  graphdef, params = nnx.split(model)
  params = _fit(params, jnp.asarray(x), jnp.asarray(y), jax.random.key(config.seed), graphdef=graphdef,
                steps=int(config.steps), batch_size=int(config.batch_size), max_shift=int(config.max_shift),
                learning_rate=float(config.learning_rate))
  model = nnx.merge(graphdef, params)
  xt, yt = _digits_views("test", config.resolution, config.crop_scale, 1, config.seed + 1)
  accuracy = float((np.asarray(jnp.argmax(model(jnp.asarray(xt)), -1)) == yt).mean())
  clf = Classifier(model, int(config.resolution), int(config.num_classes), accuracy)
  if out_dir is not None:
    save_classifier(clf, out_dir, seed=int(config.seed), steps=int(config.steps),
                    train_seconds=round(time.perf_counter() - t0, 1))
  return clf


def save_classifier(clf: Classifier, out_dir: str | os.PathLike, **info) -> pathlib.Path:
  """Writes DIR/classifier.json (architecture, input size, classes, `info`) and DIR/params.npz."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  m = clf.model
  meta = {"arch": "digits_cnn", "resolution": clf.resolution,
          "channels": [m.conv1.out_features, m.conv2.out_features], "num_classes": clf.num_classes,
          "test_accuracy": clf.test_accuracy, **info}
  flat = {"/".join(str(k) for k in path): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(m))}
  np.savez(out / CLASSIFIER_PARAMS, **flat)
  (out / CLASSIFIER_CONFIG).write_text(json.dumps(meta, indent=1))
  return out


def load_classifier(directory: str | os.PathLike) -> Classifier:
  """A classifier saved by `train_digits_classifier`; the error names the missing file."""
  d = pathlib.Path(directory)
  for name in (CLASSIFIER_CONFIG, CLASSIFIER_PARAMS):
    if not (d / name).is_file():
      raise FileNotFoundError(f"reward classifier file {d / name} does not exist; train one with "
                              f"python -m var.rewards train-digits-classifier --out {d}")
  meta = json.loads((d / CLASSIFIER_CONFIG).read_text())
  if meta.get("arch") != "digits_cnn":
    raise ValueError(f"{d / CLASSIFIER_CONFIG}: unknown classifier arch {meta.get('arch')!r} (known: digits_cnn)")
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: DigitsCNN(meta["resolution"], tuple(meta["channels"]), meta["num_classes"],
                                             rngs=nnx.Rngs(0)))
  with np.load(d / CLASSIFIER_PARAMS) as z:
    values = {k: z[k] for k in z.files}
  graphdef, state = nnx.split(model)
  flat = nnx.to_flat_state(state)
  for path, var in flat:
    key = "/".join(str(k) for k in path)
    if key not in values or values[key].shape != var.get_value().shape:
      raise ValueError(f"{d / CLASSIFIER_PARAMS}: parameter {key} missing or of another shape")
    var.set_value(jnp.asarray(values[key]))
  model = nnx.merge(graphdef, nnx.from_flat_state(flat))
  return Classifier(model, int(meta["resolution"]), int(meta["num_classes"]), meta.get("test_accuracy"))


# ----------------------------------------------------------------------------------------------------------------
# The FID Inception-v3 as a feature extractor and confidence reward


@dataclasses.dataclass(frozen=True)
class InceptionScorer:
  """The bundled FID Inception-v3 on images in [0, 1] (resized to 299x299 as the ADM evaluator does)."""
  model: nnx.Module

  def _run(self, images):
    from var.eval.preprocess import preprocess

    m = self.model
    x = preprocess(images.astype(jnp.float32) * 255.0, "adm").astype(m.compute_dtype)
    # the trunk of InceptionV3FID.__call__ up to Mixed_7c, whose (B, 8, 8, 2048) map it only returns pooled
    from var.eval.inception import max_pool_3x3

    x = m.Conv2d_2b_3x3(m.Conv2d_2a_3x3(m.Conv2d_1a_3x3(x)))
    x = max_pool_3x3(m.Conv2d_4a_3x3(m.Conv2d_3b_1x1(max_pool_3x3(x, stride=2))), stride=2)
    x = m.Mixed_6a(m.Mixed_5d(m.Mixed_5c(m.Mixed_5b(x))))
    for block in (m.Mixed_6b, m.Mixed_6c, m.Mixed_6d, m.Mixed_6e):
      x, _ = block(x)
    x = m.Mixed_7c(m.Mixed_7b(m.Mixed_7a(x))).astype(jnp.float32)  # (B, 8, 8, 2048)
    tokens = x.reshape(x.shape[0], -1, x.shape[-1])
    logits = jnp.dot(tokens.mean(axis=1), m.fc.kernel[...], precision=jax.lax.Precision.HIGHEST)  # unbiased
    return tokens, logits

  def tokens(self, images, labels=None):
    """(B, 64, 2048) Mixed_7c tokens; their mean over the tokens is FID's pool3."""
    del labels
    return self._run(images)[0]

  def reward(self, images, labels=None):
    """Negative entropy of softmax(pool3 @ W) (ADM's Inception-Score logits): sum_c p_c log p_c."""
    del labels
    logp = jax.nn.log_softmax(self._run(images)[1], axis=-1)
    return jnp.sum(jnp.exp(logp) * logp, axis=-1)


def load_inception_scorer(path: str | os.PathLike | None = None) -> InceptionScorer:
  """From a pytorch-fid .pth / .npz path, or $VARJAX_INCEPTION_WEIGHTS (the error names the missing file)."""
  from var.eval import inception

  return InceptionScorer(inception.load_inception(path))


# ----------------------------------------------------------------------------------------------------------------
# User functions and the --reward / --features specs


def load_user_function(spec: str) -> Callable:
  """'package.module:function' -> the callable (importable from sys.path or the current directory)."""
  module_name, sep, attr = spec.partition(":")
  if not sep or not module_name or not attr:
    raise ValueError(f"{spec!r} is not 'module:function' (e.g. mypkg.rewards:brightness)")
  if os.getcwd() not in sys.path:
    sys.path.insert(0, os.getcwd())
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(f"cannot import module {module_name!r} of {spec!r}: {e}") from e
  fn = getattr(module, attr, None)
  if not callable(fn):
    raise ValueError(f"{spec!r}: module {module_name} has no callable {attr!r}")
  return fn


def classifier_for_model(directory: str, num_classes: int | None, image_size: int | None) -> Classifier:
  """load_classifier, checked against the model's number of classes and image size (errors name the fix)."""
  clf = load_classifier(directory)
  if num_classes is not None and clf.num_classes != num_classes:
    raise ValueError(f"reward classifier {directory} has {clf.num_classes} classes but the model has "
                     f"{num_classes}; train a classifier for this model's classes")
  if image_size is not None and clf.resolution != image_size:
    raise ValueError(f"reward classifier {directory} takes {clf.resolution}px images but the model makes "
                     f"{image_size}px ones; train it with --config configs/digits_classifier.py:resolution="
                     f"{image_size}")
  return clf


def resolve_reward(spec: str, *, num_classes: int | None = None, image_size: int | None = None,
                   inception_weights: str | None = None) -> tuple[Callable, Callable | None]:
  """'classifier:DIR' | 'inception[:PATH]' | 'module:function' -> (reward_fn, the matching feature extractor
  or None). Loads weights now, so a bad path fails before anything is compiled."""
  if spec.startswith("classifier:"):
    clf = classifier_for_model(spec.partition(":")[2], num_classes, image_size)
    return clf.reward, clf.tokens
  if spec == "inception" or spec.startswith("inception:"):
    scorer = load_inception_scorer(spec.partition(":")[2] or inception_weights)
    return scorer.reward, scorer.tokens
  if ":" in spec:
    return load_user_function(spec), None
  raise ValueError(f"--reward {spec!r}: use classifier:DIR (python -m var.rewards train-digits-classifier), "
                   "inception (the FID Inception-v3, $VARJAX_INCEPTION_WEIGHTS) or module:function")


def resolve_features(spec: str, reward_features: Callable | None, *, num_classes: int | None = None,
                     image_size: int | None = None, inception_weights: str | None = None) -> Callable:
  """'classifier' (the reward classifier's feature map), 'classifier:DIR', 'inception[:PATH]' or
  'module:function' -> features(images, labels) -> (B, T, D)."""
  if spec == "classifier":
    if reward_features is None:
      raise ValueError("--features classifier uses the reward's classifier: give --reward classifier:DIR or "
                       "--features classifier:DIR")
    return reward_features
  if spec.startswith("classifier:"):
    return classifier_for_model(spec.partition(":")[2], num_classes, image_size).tokens
  if spec == "inception" or spec.startswith("inception:"):
    return load_inception_scorer(spec.partition(":")[2] or inception_weights).tokens
  if ":" in spec:
    return load_user_function(spec)
  raise ValueError(f"--features {spec!r}: use inception, classifier, classifier:DIR or module:function")


def _load_config(spec: str):
  path, _, arg = spec.partition(":")
  if not pathlib.Path(path).is_file():
    raise FileNotFoundError(f"config file {path} does not exist (e.g. configs/digits_classifier.py)")
  module_spec = importlib.util.spec_from_file_location("reward_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m var.rewards", description="Reward models for test-time search.")
  sub = p.add_subparsers(dest="command", required=True)
  t = sub.add_parser("train-digits-classifier", help="train the digits reward classifier")
  t.add_argument("--out", required=True, help="model directory to write (classifier.json, params.npz)")
  t.add_argument("--config", default=str(pathlib.Path(__file__).resolve().parent.parent / "configs" /
                                          "digits_classifier.py"), help="config file[:args]")
  args = p.parse_args(argv)
  config = _load_config(args.config)
  t0 = time.perf_counter()
  clf = train_digits_classifier(config, args.out)
  print(f"digits reward classifier: {config.steps} steps in {time.perf_counter() - t0:.1f}s, held-out accuracy "
        f"{100 * clf.test_accuracy:.1f}% -> {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
