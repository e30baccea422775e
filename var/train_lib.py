"""The one sharded train loop every stage shares: data, jitted steps, checkpoints, evaluation, samples, export.

Stages (config.stage), each a module of var/stages/ with its trainer, loss and steps:
  * "tokenizer" (var/stages/tokenizer.py): the multi-scale VQVAE (reconstruction + VQ terms, optional EMA
    codebook, dead-code restart, optional LPIPS and PatchGAN from tokenizer/losses.py).
  * "var" (var/stages/var.py): the next-scale transformer on tokens of a frozen tokenizer, tokenised inside the
    jitted step (or read once-tokenised with config.input.tokens_dir, var/token_data.py); the official recipe
    of VAR.md section 3 (per-token CE with uniform 1/L weights, class dropout, AdamW(0.9, 0.95) with the
    official no-decay set, lr = tblr * batch / 256, warmup + lin0, cosine weight-decay schedule, clip 2.0,
    optional progressive training).
  * "code_drafter", "code_refiner" (var/stages/code.py): CoDe's fine-tuning of a VAR (CE over the first N
    scales; KL to a frozen large model + CE with a decaying draft-token weight). VAR stages but for the step.

Everything trainable lives in one nnx "trainer" module (models + optimizers + frozen helpers); the step is the
flax "functional training loop": `nnx.split` once, a pure `jax.jit` step over the state with in/out shardings
from the logical axis rules and the state donated, `nnx.merge` inside. Randomness inside a step is
`fold_in(seed, step)`, so a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import pathlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from var.optim import (  # noqa: F401  (re-exported: tests and benchmarks reach them through train_lib)
  decay_mask,
  lr_factor,
  make_optimizer,
  peak_lr,
  weight_decay_at,
)
from var.stages import tokenizer as tokenizer_stage
from var.stages import var as var_stage
from var.stages.tokenizer import (  # noqa: F401  (re-exported)
  TokenizerTrainer,
  codebook_usage_metrics,
  scale_residuals,
  tokenizer_config_from,
  tokenizer_train_step,
)
from var.stages.var import (  # noqa: F401  (re-exported)
  load_tokenizer_config,
  progressive_stage,
  var_config_from,
  var_loss_weights,
  var_tokenize,
)

# ------------------------------------------------------------------------------------------------------------
# Setup: config checks, sharded state, jitted steps
# ------------------------------------------------------------------------------------------------------------

STAGES = ("tokenizer", "var", "code_drafter", "code_refiner")
# The stages that train a VAR on the tokens of a frozen tokenizer (config.tokenizer_dir): one trainer, eval step,
# sample grid and exported model directory; only their train steps differ.
VAR_STAGES = ("var", "code_drafter", "code_refiner")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Cheap checks that fail before any data or model work, naming the bad value and the fix."""
  if config.stage not in STAGES:
    raise ValueError(f"config.stage={config.stage!r} is not a training stage; use one of {STAGES}")
  if config.total_steps <= 0:
    raise ValueError(f"config.total_steps={config.total_steps} must be positive")
  if config.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"config.dtype={config.dtype!r} must be 'float32' or 'bfloat16'")
  lr_factor(0, schedule=config.optim.schedule, warmup_steps=1, total_steps=2)  # unknown schedule -> error
  if config.get("code") is not None and config.stage not in ("code_drafter", "code_refiner"):
    raise ValueError(f"config.code is CoDe's fine-tuning block but config.stage={config.stage!r}: set "
                     "config.stage='code_drafter' or 'code_refiner' (configs/digits_code.py), or drop config.code")
  if config.stage == "tokenizer":
    tokenizer_stage.validate(config)
  elif config.stage == "var":
    var_stage.validate(config)
  else:
    from var.stages import code as code_stage

    code_stage.validate(config)


@dataclasses.dataclass
class Setup:
  """Everything the loop needs: mesh, trainer graphdef, sharded state and its shardings, jitted steps."""
  mesh: jax.sharding.Mesh
  graphdef: Any
  state: Any
  shardings: Any
  abstract_state: Any
  train_step: Callable
  eval_step: Callable
  global_batch: int
  frozen: tuple[str, ...]
  tok_config: Any = None


def _build_fn(config, global_batch, tok_config):
  if config.stage == "tokenizer":
    return lambda: tokenizer_stage.TokenizerTrainer(config, global_batch=global_batch, rngs=nnx.Rngs(config.seed))
  return lambda: var_stage.VarTrainer(config, tok_config, global_batch=global_batch, rngs=nnx.Rngs(config.seed))


_STEP_CACHE: dict = {}


def _step_cache_key(config, tok_config, mesh):
  # The graph is a function of the config (its optimizer closures make graphdefs compare unequal, so they
  # cannot be part of the key). Fields that only steer the loop (logging, evaluation, samples, checkpoints,
  # data reading) do not enter.
  loop_only = ("log_every_steps", "eval_every_steps", "eval_batches", "sample_every_steps", "sample_classes",
               "sample_kwargs", "ckpt", "distributed", "mesh")  # (the mesh itself is part of the key)
  fields = {k: v for k, v in config.to_dict().items() if k not in loop_only}
  reading = ("workers", "read_threads", "data_dir")
  fields["input"] = {k: v for k, v in fields["input"].items() if k not in reading}
  fields["input"]["tokens_dir"] = bool(fields["input"].get("tokens_dir"))  # the batch's structure, not the path
  return json.dumps(fields, sort_keys=True, default=str), tok_config, mesh


def _compiled_steps(config, graphdef, shardings, mesh, tok_config=None):
  """The jitted train / eval steps, memoised per (config, model graph, mesh) so that a resumed run, a restore
  onto the same mesh or repeated runs in one process (tests, the demo) reuse the compiled executables."""
  from var import sharding as shd

  key = _step_cache_key(config, tok_config, mesh)
  if key in _STEP_CACHE:
    return _STEP_CACHE[key]
  data_sharding = shd.batch_sharding(mesh)
  repl = shd.replicated(mesh)
  if config.stage == "tokenizer":
    train = functools.partial(tokenizer_stage.tokenizer_train_step, graphdef, config=config)
    train = _skipping_nonfinite(train) if config.skip_nonfinite else train
    train_step = jax.jit(train, in_shardings=(shardings, data_sharding), out_shardings=(shardings, repl),
                         donate_argnums=0)
    evalf = functools.partial(tokenizer_stage.tokenizer_eval_step, graphdef, config=config)
  elif config.stage in ("code_drafter", "code_refiner"):  # a VAR stage with another train step
    from var.stages import code as code_stage

    train_step = code_stage.compiled_train_step(config, graphdef, shardings, mesh)
    evalf = functools.partial(var_stage.var_eval_step, graphdef, config=config)
  else:
    train = functools.partial(var_stage.var_train_step, graphdef, config=config)
    train = _skipping_nonfinite(train) if config.skip_nonfinite else train
    train_step = jax.jit(train, in_shardings=(shardings, data_sharding, repl, repl),
                         out_shardings=(shardings, repl), donate_argnums=0)
    evalf = functools.partial(var_stage.var_eval_step, graphdef, config=config)
  eval_step = jax.jit(evalf, in_shardings=(shardings, data_sharding), out_shardings=repl)
  _STEP_CACHE[key] = (train_step, eval_step)
  return train_step, eval_step


def _skipping_nonfinite(train_step: Callable) -> Callable:
  """`train_step` that keeps the old floating-point state (parameters, moments, statistics) when the loss
  or gradient norm is NaN/inf; integer leaves (the step and optax counters) advance either way, so the data
  order, the per-step randomness and the schedules stay those of the loop's step. Adds metric `skipped`."""

  def step(state, *args):
    # A copy of the tree (new Variable objects, same arrays): the step merges `state` into modules and updates
    # their Variables in place, which would otherwise make `state` the new state too.
    old_state = jax.tree.map(lambda x: x, state)
    new_state, metrics = train_step(state, *args)
    ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    keep = lambda new, old: jnp.where(ok, new, old) if jnp.issubdtype(new.dtype, jnp.floating) else new
    return jax.tree.map(keep, new_state, old_state), {**metrics, "skipped": (~ok).astype(jnp.int32)}

  return step


def make_setup(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *, tok_config=None) -> Setup:
  """Builds the trainer abstractly, derives parameter/optimizer shardings from the logical axis rules,
  initialises the state directly into those shardings (jitted init), and compiles the train / eval steps."""
  from var import sharding as shd

  global_batch = shd.check_batch_divisible(config.input.batch_size, mesh)
  build = _build_fn(config, global_batch, tok_config)
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(build)
  graphdef, abs_state = nnx.split(abstract)
  shardings = shd.state_shardings(abs_state, mesh)
  key = ("init", _step_cache_key(config, tok_config, mesh))
  if key not in _STEP_CACHE:
    _STEP_CACHE[key] = jax.jit(lambda: nnx.state(build()), out_shardings=shardings)
  with nnx.use_eager_sharding(False):
    state = _STEP_CACHE[key]()
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_state,
                                shardings)
  frozen = tuple(k for k in ("tokenizer", "lpips") if k in state and jax.tree.leaves(state[k]))

  train_step, eval_step = _compiled_steps(config, graphdef, shardings, mesh, tok_config)
  return Setup(mesh=mesh, graphdef=graphdef, state=state, shardings=shardings, abstract_state=abstract_state,
               train_step=train_step, eval_step=eval_step, global_batch=global_batch, frozen=frozen,
               tok_config=tok_config)


def _place(substate, pure: Mapping, shardings):
  """Copies a pure dict of host arrays into `substate` (an nnx.State) and places it with `shardings`."""
  nnx.replace_by_pure_dict(substate, jax.tree.map(np.asarray, pure))
  return jax.device_put(substate, shardings)


def load_frozen_weights(setup: Setup, config: ml_collections.ConfigDict) -> None:
  """Fills the frozen parts of the state from their files: the VAR stage's tokenizer (model directory) and
  LPIPS (local VGG16 + lin .pth files). They are not in training checkpoints (they never change)."""
  if "tokenizer" in setup.frozen:
    from var.pretrained import load_tokenizer

    tok, _ = load_tokenizer(config.tokenizer_dir)
    setup.state["tokenizer"] = _place(setup.state["tokenizer"], nnx.to_pure_dict(nnx.state(tok, nnx.Param)),
                                      setup.shardings["tokenizer"])
  if "lpips" in setup.frozen:
    from tokenizer.losses import load_lpips

    lp = load_lpips(config.loss.lpips_vgg_weights, config.loss.lpips_lin_weights)
    setup.state["lpips"] = _place(setup.state["lpips"], nnx.to_pure_dict(nnx.state(lp, nnx.Param)),
                                  setup.shardings["lpips"])


def init_from_pretrained(setup: Setup, config: ml_collections.ConfigDict, directory: str) -> None:
  """Fine-tuning start: the model parameters from a model directory (var/pretrained.py, e.g. converted
  official weights); optimizer state and step stay fresh."""
  from var import pretrained

  directory = str(directory)
  if not (pathlib.Path(directory) / "config.json").is_file():
    raise FileNotFoundError(f"--init_from {directory!r} is not a model directory (no config.json); convert "
                            "official weights with `python -m var.convert` or point at <workdir>/model")
  if config.stage == "tokenizer":
    model, _ = pretrained.load_tokenizer(directory)
  else:
    if not hasattr(pretrained, "load_var"):
      raise ValueError("var/pretrained.py has no load_var(): this checkout cannot read VAR model directories")
    model, _ = pretrained.load_var(directory)
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  model_state = setup.state["model"]
  want = {jax.tree_util.keystr(p): tuple(v.shape) for p, v in
          jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.filter_state(model_state, nnx.Param)))}
  got = {jax.tree_util.keystr(p): tuple(np.shape(v)) for p, v in jax.tree_util.tree_leaves_with_path(pure)}
  if want != got:
    bad = sorted(set(want) ^ set(got)) + sorted(k for k in set(want) & set(got) if want[k] != got[k])
    raise ValueError(f"--init_from {directory}: its {config.stage} model does not match the configured one "
                     f"(differing parameters: {bad[:10]}{' ...' if len(bad) > 10 else ''}); configure "
                     "the same architecture as the saved model")
  setup.state["model"] = _place(model_state, pure, setup.shardings["model"])


def _trainable(state, frozen):
  return {k: v for k, v in nnx.to_pure_dict(state).items() if k not in frozen}


def check_checkpoint_config(ckpt, step: int, config: ml_collections.ConfigDict) -> None:
  """Raises CheckpointError (naming the config file) when checkpoint `step` was written by a config that
  differs in anything but the resumable fields (var/checkpoint.py RESUMABLE_FIELDS)."""
  from var.checkpoint import CheckpointError, config_differences

  diffs = config_differences(ckpt.read_config(step), config.to_dict())
  if diffs:
    raise CheckpointError(f"Checkpoint {ckpt.directory / str(step) / 'config'} was written by a different "
                          f"configuration ({'; '.join(diffs[:8])}). Resume with the same config, or use "
                          "another --workdir; the checkpoint was left untouched.")


def restore_checkpoint(setup: Setup, ckpt, step: int, data_iterator,
                       config: ml_collections.ConfigDict) -> None:
  """Restores the trainable state (onto the current mesh's shardings) and the data position of `step`, after
  checking that the checkpoint was written by a compatible config."""
  check_checkpoint_config(ckpt, step, config)
  target = _trainable(setup.abstract_state, setup.frozen)
  restored = ckpt.restore(step, target, data_iterator=data_iterator)
  trainable = nnx.State({k: setup.state[k] for k in setup.state.keys() if k not in setup.frozen})
  nnx.replace_by_pure_dict(trainable, restored)
  for k in trainable.keys():
    setup.state[k] = trainable[k]


# ------------------------------------------------------------------------------------------------------------
# Logging
# ------------------------------------------------------------------------------------------------------------


class MetricWriter:
  """Metrics as JSON lines in `<workdir>/metrics.jsonl` (and TensorBoard event files when `tensorboard` is
  installed: `pip install .[tensorboard]`). Only process 0 writes."""

  def __init__(self, workdir: pathlib.Path):
    self.active = jax.process_index() == 0
    self.path = workdir / "metrics.jsonl"
    self._tb = None
    if self.active:
      try:
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
        self._tb = EventFileWriter(str(workdir / "tensorboard"))
      except ImportError:
        self._tb = None

  def write(self, step: int, split: str, metrics: Mapping[str, Any]):
    if not self.active:
      return
    values = {k: float(v) for k, v in metrics.items()}
    with self.path.open("a") as f:
      f.write(json.dumps({"step": int(step), "split": split, "time": time.time(), **values}) + "\n")
    if self._tb is not None:
      from tensorboard.compat.proto import event_pb2, summary_pb2
      summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=f"{split}/{k}", simple_value=v)
                                           for k, v in values.items()])
      self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir) -> list[dict]:
  """All JSON-lines records written by MetricWriter."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def save_image_grid(images: np.ndarray, path: pathlib.Path, ncols: int, *, scale: int = 1,
                    captions: list[str] | None = None) -> pathlib.Path:
  """Images (N, H, W, 3) in [0, 1] -> one PNG grid with `ncols` columns (gaps of `scale` px).

  scale: nearest-neighbour upscaling of every tile (pixels stay sharp squares: a 16px digit at scale 4 is a
  64px tile a person can look at). captions: one line of text per column, drawn above it (PIL's built-in font).
  """
  from PIL import Image, ImageDraw

  if scale < 1:
    raise ValueError(f"scale={scale} must be a positive integer (nearest-neighbour upscaling factor)")
  if captions is not None and len(captions) != ncols:
    raise ValueError(f"{len(captions)} captions for {ncols} columns: give one caption per column")
  images = np.clip(np.asarray(images, np.float32), 0, 1)
  if scale > 1:
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
  n, h, w, _ = images.shape
  gap = scale
  top = 14 if captions is not None else 0  # one line of the 11px built-in font
  nrows = -(-n // ncols)
  grid = np.ones((top + nrows * (h + gap) + gap, ncols * (w + gap) + gap, 3), np.float32)
  for i, im in enumerate(images):
    r, c = divmod(i, ncols)
    y, x = top + gap + r * (h + gap), gap + c * (w + gap)
    grid[y:y + h, x:x + w] = im
  picture = Image.fromarray((grid * 255 + 0.5).astype(np.uint8))
  if captions is not None:
    draw = ImageDraw.Draw(picture)
    for c, text in enumerate(captions):
      draw.text((gap + c * (w + gap) + 1, 1), str(text), fill=(0, 0, 0))
  path.parent.mkdir(parents=True, exist_ok=True)
  picture.save(path)
  return path


# ------------------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------------------


def evaluate(setup: Setup, config: ml_collections.ConfigDict) -> dict[str, float]:
  """Held-out metrics over `config.eval_batches` batches (0: the whole eval split)."""
  from var import data
  from var import sharding as shd

  it = data.make_eval_iterator(config.input)
  sums: dict[str, Any] = {}
  with jax.set_mesh(setup.mesh):
    for i, batch in enumerate(it):
      if config.eval_batches and i >= config.eval_batches:
        break
      out = jax.device_get(setup.eval_step(setup.state, shd.shard_batch(batch, setup.mesh)))
      for k, v in out.items():
        sums[k] = sums.get(k, 0) + np.asarray(v, np.float64)
  count = max(float(sums.pop("count", 0.0)), 1.0)
  hist = sums.pop("hist", None)
  out = {k: float(v) / count for k, v in sums.items()}
  if hist is not None:  # codebook usage per scale on held-out data
    for si, h in enumerate(hist):
      p = h / max(h.sum(), 1)
      out[f"perplexity/s{si}"] = float(np.exp(-np.sum(p[p > 0] * np.log(p[p > 0]))))
      out[f"codes_used/s{si}"] = float(np.mean(h > 0))
    tot = hist.sum(0)
    p = tot / max(tot.sum(), 1)
    out["perplexity"] = float(np.exp(-np.sum(p[p > 0] * np.log(p[p > 0]))))
    out["codes_used"] = float(np.mean(tot > 0))
  return out


def write_samples(setup: Setup, config: ml_collections.ConfigDict, workdir: pathlib.Path, step: int):
  """A sample grid (every class in `config.sample_classes`, or the first 10) with the project sampler
  (var/sampler.py `sample_images`); returns the PNG path, or None when the sampler module is not available."""
  try:
    from var.sampler import sample_images
  except ImportError:
    logging.warning("var/sampler.py (sample_images) is not available: no sample grid at step %d", step)
    return None
  trainer = nnx.merge(setup.graphdef, setup.state)
  classes = list(config.sample_classes) or list(range(min(10, trainer.model.config.num_classes)))
  images = sample_images(trainer.model, trainer.tokenizer, classes, **dict(config.sample_kwargs),
                         mesh=setup.mesh)
  if jax.process_index() != 0:
    return None
  return save_image_grid(np.asarray(images), workdir / "samples" / f"step_{step:07d}.png", ncols=len(classes))


def export_model(setup: Setup, config: ml_collections.ConfigDict, workdir: pathlib.Path) -> pathlib.Path:
  """Writes the trained model as a model directory `<workdir>/model` (var/pretrained.py format). With several
  processes the sharded arrays are gathered first and process 0 writes."""
  from jax.experimental import multihost_utils

  from var import pretrained

  if jax.process_count() > 1:
    host_state = multihost_utils.process_allgather(setup.state, tiled=True)
  else:
    host_state = jax.device_get(setup.state)
  out = workdir / "model"
  if jax.process_index() != 0:
    return out
  trainer = nnx.merge(setup.graphdef, host_state)
  if config.stage == "tokenizer":
    pretrained.save_pretrained(out, tokenizer=trainer.model, tokenizer_config=trainer.model.config,
                               overwrite=True)
  else:
    pretrained.save_pretrained(out, tokenizer=trainer.tokenizer, tokenizer_config=setup.tok_config,
                               var=trainer.model, var_config=trainer.model.config, overwrite=True)
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir, *, init_from: str | None = None,
                       stop_after: int | None = None) -> dict[str, Any]:
  """Trains the configured stage in `workdir`, resuming from its last checkpoint if there is one.

  Args:
    config: a training config (configs/*.py).
    workdir: checkpoints (`ckpt/`), metrics (`metrics.jsonl`), sample grids and the final model directory
      (`model/`) go here.
    init_from: a model directory whose parameters initialise the model (fine-tuning); ignored when resuming.
    stop_after: stop (with a checkpoint) after this many steps of THIS invocation (a clean stop; the tests
      also kill runs with SIGKILL).

  Returns:
    {"step", "train" (last logged train metrics), "eval" (final held-out metrics), "model_dir", "wall_s"}.
  """
  from tqdm import tqdm

  from var import data
  from var import sharding as shd
  from var.checkpoint import Checkpointer

  t0 = time.time()
  workdir = pathlib.Path(workdir).absolute()
  # First: jax.distributed.initialize() must run before anything touches a backend (validate_config does).
  shd.maybe_initialize_distributed(True if config.distributed else None)
  validate_config(config)
  mesh = shd.make_mesh(tuple(config.mesh))
  shd.check_batch_divisible(config.input.batch_size, mesh)
  data.input_config(config.input)  # unknown / invalid input fields fail here
  tok_config = var_stage.load_tokenizer_config(config) if config.stage in VAR_STAGES else None
  if tok_config is not None and config.input.get("tokens_dir"):  # tokenise-once input: fail before any compile
    from var import token_data

    token_data.check_for_run(config, tok_config)
  info = data.dataset_info(config.input)  # a missing dataset or data_dir fails here, before any compile
  if config.stage in VAR_STAGES and info.num_classes != config.model.num_classes:
    raise ValueError(f"config.model.num_classes={config.model.num_classes} but dataset "
                     f"{config.input.name!r} has {info.num_classes} classes; set "
                     f"--config.model.num_classes={info.num_classes}")
  workdir.mkdir(parents=True, exist_ok=True)
  ckpt = Checkpointer(workdir / "ckpt", max_to_keep=config.ckpt.max_to_keep,
                      async_save=config.ckpt.async_save)
  latest = ckpt.latest_step()
  if latest is not None:  # a bad checkpoint must fail before minutes of compiling
    check_checkpoint_config(ckpt, latest, config)

  setup = make_setup(config, mesh, tok_config=tok_config)
  load_frozen_weights(setup, config)
  train_iter = data.make_train_iterator(config.input, seed=config.seed)
  if latest is not None:
    if ckpt.has_data_state(latest):
      restore_checkpoint(setup, ckpt, latest, train_iter, config)
    else:  # saved by another number of processes: each host's shard and position differ, start them afresh
      logging.warning("checkpoint %s holds no data position for process %d of %d (it was saved by a "
                      "different number of processes): model and optimizer restored, the data iterators "
                      "start from the beginning of their shards", ckpt.directory / str(latest),
                      jax.process_index(), jax.process_count())
      restore_checkpoint(setup, ckpt, latest, None, config)
    logging.info("resumed from %s", ckpt.directory / str(latest))
  elif init_from:
    init_from_pretrained(setup, config, init_from)
  start = int(jax.device_get(setup.state["opt"]["step"][...])) if latest is not None else 0
  writer = MetricWriter(workdir)
  total = config.total_steps
  end = total if stop_after is None else min(total, start + stop_after)
  last_train: dict[str, float] = {}
  bar = tqdm(total=total, initial=start, desc=f"train {config.stage}", unit="step", dynamic_ncols=True,
             disable=jax.process_index() != 0, mininterval=2.0)
  num_scales = len(tok_config.patch_nums) if tok_config is not None else 0
  pg = config.get("progressive", None)
  pending = None  # (step, metrics) of the newest step not yet checked for a non-finite loss / grad norm
  skipped = 0  # steps skipped for non-finite values (config.skip_nonfinite)

  def check(step, metrics):
    # Reading the previous step's two scalars while the next step runs keeps the device busy; before any
    # log, evaluation, sample or checkpoint the current step is checked, so a bad state is never saved.
    nonlocal skipped
    if config.skip_nonfinite:
      skipped += int(jax.device_get(metrics["skipped"]))
      return
    values = jax.device_get({k: metrics[k] for k in ("loss", "grad_norm")})
    for name in ("loss", "grad_norm"):  # in this order (device_get returns the dict sorted by key)
      value = values[name]
      if not math.isfinite(float(value)):
        latest_ok = ckpt.latest_step()
        raise FloatingPointError(
            f"step {step}: non-finite training {name} ({float(value)}); stopped without saving this state. "
            f"The last checkpoint ({ckpt.directory / str(latest_ok) if latest_ok is not None else 'none'}) "
            "is intact and re-running resumes from it. Lower optim.tblr, check the data, or set "
            "config.skip_nonfinite=True to skip such steps.")

  try:
    with jax.set_mesh(mesh):
      for step in range(start, end):
        batch = shd.shard_batch(next(train_iter), mesh)
        if config.stage in VAR_STAGES:
          prog_si, prog_wp = (-1, 1.0) if pg is None else var_stage.progressive_stage(
              step, num_scales=num_scales, pg=pg.pg, pg0=pg.pg0, warmup_steps=config.optim.warmup_steps,
              total_steps=total, pg_warmup_steps=pg.warmup_steps)
          setup.state, metrics = setup.train_step(setup.state, batch, jnp.asarray(prog_si, jnp.int32),
                                                  jnp.asarray(prog_wp, jnp.float32))
        else:
          setup.state, metrics = setup.train_step(setup.state, batch)
        done = step + 1
        if pending is not None:
          check(*pending)
        pending = (done, metrics)
        bar.update(1)
        log_now = done % config.log_every_steps == 0 or done == end
        eval_now = bool(config.eval_every_steps) and done % config.eval_every_steps == 0 and done != total
        sample_now = (config.stage in VAR_STAGES and bool(config.sample_every_steps)
                      and done % config.sample_every_steps == 0)
        save_now = done % config.ckpt.every_steps == 0 or done == end
        if log_now or eval_now or sample_now or save_now:
          check(*pending)
          pending = None
        if log_now:
          last_train = {k: float(v) for k, v in jax.device_get(metrics).items()}
          if config.skip_nonfinite:
            last_train["skipped_nonfinite"] = float(skipped)
          writer.write(done, "train", last_train)
          bar.set_postfix({k: f"{last_train[k]:.4g}" for k in ("loss", "psnr", "acc") if k in last_train})
        if eval_now:
          writer.write(done, "eval", evaluate(setup, config))
        if sample_now:
          write_samples(setup, config, workdir, done)
        if save_now:
          ckpt.save(done, _trainable(setup.state, setup.frozen), config=config.to_dict(),
                    data_iterator=train_iter, force=True)
  except FloatingPointError:
    ckpt.close()  # the last good checkpoint may still be in flight: let it commit
    writer.close()
    raise
  bar.close()
  ckpt.wait()
  if not last_train:  # nothing left to train (re-run of a finished run): report the last logged metrics
    logged = [r for r in read_metrics(workdir) if r["split"] == "train"]
    if logged:
      last_train = {k: v for k, v in logged[-1].items() if k not in ("step", "split", "time")}
  result: dict[str, Any] = {"step": end, "train": last_train}
  if end == total:
    result["eval"] = evaluate(setup, config)
    writer.write(end, "eval", result["eval"])
    result["model_dir"] = str(export_model(setup, config, workdir))
  ckpt.close()
  writer.close()
  result["wall_s"] = time.time() - t0
  return result
