"""CoDe's specialised fine-tuning losses (specs/ACCELERATION.md 5.2), which the official CoDe repository does not
ship: pure functions of logits, so the train steps and the tests share them.

Drafter ("code_drafter"): the VAR cross-entropy on the first N scales only (the drafter never draws the later
scales at inference). Every token of scales 0..N-1 weighs 1 / cum[N] (the mean over the drafted tokens), the later
scales weigh 0, so their logits get exactly zero gradient. Block-causal attention makes this equal to training on
the truncated sequence of cum[N] tokens.

Refiner ("code_refiner"): distillation from the frozen large model. The spec only says "KL distillation, weight
decaying 1 -> 0 from all tokens to refine tokens"; what is implemented:

  KL_t   = sum_v p_teacher(v) (log p_teacher(v) - log p_student(v))    per token t (temperature 1)
  w_t    = 1 on the refine tokens (scales N..S-1), alpha(step) on the draft tokens (scales 0..N-1)
  alpha  = 1 - step / (total_steps - 1), clipped to [0, 1]: 1 at the first step, 0.5 half-way, 0 at the last
  loss   = mean_b [ sum_t w_t KL_t / sum_t w_t ] + ce_weight * mean_b [ sum_t w_t CE_t / sum_t w_t ]

CE_t is the usual next-scale cross-entropy on the ground-truth tokens (the "plus its CE" of the issue), weighted
like the KL. Both terms are weighted means over the tokens that count, so their scale does not grow when alpha
shrinks the number of weighted tokens. Teacher and student see the same (class-dropped) labels and inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from var.optim import lr_factor, peak_lr
from var.stages.var import var_inputs


def _levels(patch_nums: Sequence[int]) -> np.ndarray:
  return np.concatenate([np.full(p * p, i, np.int32) for i, p in enumerate(patch_nums)])  # (L,) scale index


def _check_draft_steps(draft_steps: int, patch_nums: Sequence[int], lo: int) -> None:
  s = len(patch_nums)
  if isinstance(draft_steps, bool) or not isinstance(draft_steps, (int, np.integer)) or not lo <= draft_steps <= s:
    raise ValueError(f"draft_steps={draft_steps!r} must be an integer in {lo}..{s} for the {s}-scale schedule "
                     f"{tuple(patch_nums)} (the drafter draws scales 0..N-1, the refiner N..{s - 1})")


def drafter_token_weights(patch_nums: Sequence[int], draft_steps: int) -> np.ndarray:
  """(L,) float32: 1 / cum[N] on the tokens of scales 0..N-1, 0 on the later scales."""
  _check_draft_steps(draft_steps, patch_nums, lo=1)
  drafted = _levels(patch_nums) < draft_steps
  return (drafted / drafted.sum()).astype(np.float32)


def drafter_loss(logits: jax.Array, targets: jax.Array, patch_nums: Sequence[int], draft_steps: int,
                 label_smoothing: float = 0.0) -> jax.Array:
  """The code_drafter loss: the VAR cross-entropy over the first `draft_steps` scales only.

  logits (B, L', V) float32 with L' = L, or L' = cum[N] for a forward truncated after the drafted scales; targets
  (B, L') int -> scalar."""
  from var.model import cross_entropy_loss

  w = drafter_token_weights(patch_nums, draft_steps)  # numpy: static under jit
  drafted = int(np.count_nonzero(w))
  if logits.shape[1] < drafted:
    raise ValueError(f"logits cover {logits.shape[1]} tokens, fewer than the {drafted} of the first {draft_steps} "
                     "scales")
  return cross_entropy_loss(logits, targets, label_smoothing, jnp.asarray(w[:logits.shape[1]])[None])


def draft_weight(step, total_steps: int) -> jax.Array:
  """alpha(step) = clip(1 - step / (total_steps - 1), 0, 1): the weight of the draft tokens in the refiner's loss
  (1 at the first step, 0.5 half-way, 0 at the last). step may be traced."""
  if total_steps < 1:
    raise ValueError(f"total_steps={total_steps} must be >= 1")
  return jnp.clip(1.0 - jnp.asarray(step, jnp.float32) / max(total_steps - 1, 1), 0.0, 1.0)


def refiner_token_weights(patch_nums: Sequence[int], draft_steps: int, step, total_steps: int) -> jax.Array:
  """(L,) float32 per-token weights of the refiner's loss: 1 on scales N.., alpha(step) on scales 0..N-1."""
  _check_draft_steps(draft_steps, patch_nums, lo=0)
  if draft_steps == len(patch_nums):
    raise ValueError(f"draft_steps={draft_steps}: the refiner draws no scale; use 0..{len(patch_nums) - 1}")
  refine = jnp.asarray(_levels(patch_nums) >= draft_steps)
  return jnp.where(refine, 1.0, draft_weight(step, total_steps))


def kl_per_token(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
  """KL(teacher || student) per token: (B, L, V) logits each -> (B, L) float32 (the teacher is not
  differentiated)."""
  t_logp = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32), axis=-1)
  s_logp = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1)


def _weighted_mean(per_token: jax.Array, weights: jax.Array) -> jax.Array:
  """(B, L) values, (L,) weights -> scalar: per sample sum(w x) / sum(w), averaged over the batch."""
  return jnp.mean(jnp.sum(per_token * weights, axis=-1) / jnp.sum(weights))


def refiner_loss(student_logits: jax.Array, teacher_logits: jax.Array, targets: jax.Array,
                 weights: jax.Array, ce_weight: float = 1.0, label_smoothing: float = 0.0) -> dict[str, jax.Array]:
  """The code_refiner loss (module docstring): weighted KL to the teacher plus ce_weight x the weighted CE.

  student_logits, teacher_logits (B, L, V), targets (B, L) int, weights (L,) (refiner_token_weights)
  -> {'loss', 'kl', 'ce'} scalars."""
  kl = _weighted_mean(kl_per_token(student_logits, teacher_logits), weights)
  logp = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  ce_tok = (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(-1) if label_smoothing else nll
  ce = _weighted_mean(ce_tok, weights)
  return {"loss": kl + ce_weight * ce, "kl": kl, "ce": ce}


# ----------------------------------------------------------------------------------------------------------------
# The two fine-tuning stages, config.stage = "code_drafter" / "code_refiner" (configs/digits_code.py), with a
# `config.code` block: draft_steps N, and for the refiner the frozen large model's directory and the CE weight.
# They are VAR stages in everything but the step: the VAR trainer (model + AdamW + frozen tokenizer), data,
# checkpoints with the data position, evaluation (the VAR held-out loss), sample grids and the exported VAR model
# directory (what sample.py --checkpoint / --refiner read). The refiner's teacher is NOT part of the train state (it
# never changes, so checkpoints stay the student's size, as big_vision's two-stage trainers do): it is placed on
# the mesh with the student's sharding rules and passed to the jitted step as an argument.

STAGES = ("code_drafter", "code_refiner")
# the fields of config.code each stage reads (a field the stage would not read is an error, not ignored)
CODE_FIELDS = {"code_drafter": ("draft_steps",), "code_refiner": ("draft_steps", "teacher_dir", "ce_weight")}


def validate(config) -> None:
  """Checks a CoDe stage's config before any work: the VAR stage's checks, the config.code block and its fields,
  draft_steps against the patch_nums of the tokenizer (or config.model.patch_nums), teacher_dir, no progressive
  training."""
  import pathlib

  from var.stages import var as var_stage

  stage = config.stage
  if stage not in STAGES:
    raise ValueError(f"config.stage={stage!r} is not a CoDe stage; use one of {STAGES}")
  var_stage.validate(config)
  code_cfg = config.get("code")
  want = CODE_FIELDS[stage]
  if code_cfg is None:
    raise ValueError(f"config.stage={stage!r} needs a config.code block with {want} (configs/digits_code.py)")
  have = tuple(code_cfg.keys())
  if sorted(have) != sorted(want):
    raise ValueError(f"config.code has fields {sorted(have)} but stage {stage!r} reads exactly {sorted(want)}: "
                     f"remove {sorted(set(have) - set(want))}, add {sorted(set(want) - set(have))}")
  if config.get("progressive") is not None and config.progressive.pg:
    raise ValueError(f"config.progressive.pg={config.progressive.pg} must be 0 for CoDe fine-tuning (the loss "
                     "already picks the scales): set --config.progressive.pg=0")
  patch_nums = var_stage.load_tokenizer_config(config).patch_nums
  n, s = code_cfg.draft_steps, len(patch_nums)
  lo, hi = (1, s) if stage == "code_drafter" else (0, s - 1)
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not lo <= n <= hi:
    raise ValueError(f"config.code.draft_steps={n!r} is out of range for the {s}-scale patch_nums "
                     f"{tuple(patch_nums)}: the {stage} stage needs an integer in {lo}..{hi} (the drafter draws "
                     f"scales 0..N-1, the refiner N..{s - 1}); set --config.code.draft_steps")
  if stage == "code_refiner":
    teacher = pathlib.Path(code_cfg.teacher_dir) if code_cfg.teacher_dir else None
    if teacher is None or not (teacher / "config.json").is_file():
      raise FileNotFoundError(f"config.code.teacher_dir={code_cfg.teacher_dir!r} is not a model directory; the "
                              "code_refiner stage distils from the frozen large VAR: set --config.code.teacher_dir "
                              "to its model directory (e.g. the VAR stage's or the drafter's <workdir>/model)")


def _labels_and_rng(config, step, labels, num_classes):
  """Class dropout drawn once per step (teacher and student see the same labels) and the drop-path key."""
  rng = jax.random.fold_in(jax.random.key(config.seed), step)
  rng_cls, rng_drop = jax.random.split(rng)
  drop = jax.random.uniform(rng_cls, labels.shape) < config.loss.cond_drop_rate
  return jnp.where(drop, num_classes, labels), rng_drop


def _metrics(loss, grads, logits, gt, config, batch, step):
  return {"loss": loss, "grad_norm": optax.tree.norm(grads),
          "acc": jnp.mean(jnp.argmax(logits, axis=-1) == gt),
          "lr": peak_lr(config.optim, batch["label"].shape[0]) * lr_factor(
              step, schedule=config.optim.schedule, warmup_steps=config.optim.warmup_steps,
              total_steps=config.total_steps, warmup_start=config.optim.warmup_start,
              end_ratio=config.optim.end_ratio)}


def drafter_train_step(graphdef, state, batch, prog_si, prog_wp, *, config):
  """One code_drafter update (the VAR step's signature; prog_si / prog_wp are unused): the forward stops after
  the drafted scales (block-causal attention: the same logits as the full forward there), CE over them."""
  del prog_si, prog_wp
  trainer = nnx.merge(graphdef, state)
  step = trainer.opt.step[...]
  mcfg = trainer.model.config
  n = int(config.code.draft_steps)
  cum = mcfg.begin_ends[n - 1][1]  # tokens of scales 0..N-1
  gt, x = var_inputs(trainer.tokenizer, batch)
  gt, x = gt[:, :cum], x[:, :cum - mcfg.first_l]
  labels, rng = _labels_and_rng(config, step, batch["label"].astype(jnp.int32), mcfg.num_classes)

  def loss_fn(model):
    logits = model(labels, x, rng=rng, deterministic=mcfg.drop_path_rate == 0)  # (B, cum, V)
    return drafter_loss(logits, gt, mcfg.patch_nums, n, config.loss.label_smoothing), logits

  (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(trainer.model)
  trainer.opt.update(trainer.model, grads)
  return nnx.state(trainer), _metrics(loss, grads, logits, gt, config, batch, step)


def refiner_train_step(graphdef, state, batch, prog_si, prog_wp, teacher, *, teacher_graphdef, config):
  """One code_refiner update: the frozen teacher's teacher-forced logits on the same tokens and labels, then the
  weighted KL + CE (refiner_loss) with the draft-token weight alpha(step)."""
  from var import code

  del prog_si, prog_wp
  trainer = nnx.merge(graphdef, state)
  teacher = nnx.merge(teacher_graphdef, teacher)
  step = trainer.opt.step[...]
  mcfg = trainer.model.config
  code.check_pair(teacher.config, mcfg)  # at trace time: the teacher must read the student's token maps
  gt, x = var_inputs(trainer.tokenizer, batch)
  labels, rng = _labels_and_rng(config, step, batch["label"].astype(jnp.int32), mcfg.num_classes)
  teacher_logits = jax.lax.stop_gradient(teacher(labels, x))  # (B, L, V)
  weights = refiner_token_weights(mcfg.patch_nums, int(config.code.draft_steps), step, config.total_steps)

  def loss_fn(model):
    logits = model(labels, x, rng=rng, deterministic=mcfg.drop_path_rate == 0)
    out = refiner_loss(logits, teacher_logits, gt, weights, config.code.ce_weight, config.loss.label_smoothing)
    return out["loss"], (out, logits)

  (loss, (parts, logits)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(trainer.model)
  trainer.opt.update(trainer.model, grads)
  metrics = _metrics(loss, grads, logits, gt, config, batch, step)
  metrics.update(kl=parts["kl"], ce=parts["ce"], draft_weight=draft_weight(step, config.total_steps))
  return nnx.state(trainer), metrics


def load_teacher(config, mesh):
  """The frozen teacher of the refiner stage -> (graphdef, state placed on the mesh with the logical rules).

  It must share the student's tokenizer (patch_nums, vocabulary, z channels, classes, tokenizer config and
  weights), and runs in the configured activation dtype."""
  from var import code, pretrained
  from var import sharding as shd

  teacher_dir = config.code.teacher_dir
  code.check_shared_tokenizer(teacher_dir, config.tokenizer_dir, names=("teacher", "tokenizer_dir"))
  teacher, teacher_config = pretrained.load_var(teacher_dir)
  teacher, _ = code.with_dtype(teacher, teacher_config, config.dtype)
  graphdef, tstate = nnx.split(teacher)
  return graphdef, jax.device_put(tstate, shd.state_shardings(tstate, mesh))


def compiled_train_step(config, graphdef, shardings, mesh):
  """The jitted CoDe train step with the VAR step's call signature (state, batch, prog_si, prog_wp)."""
  import functools

  from var import sharding as shd

  validate(config)
  data_sharding, repl = shd.batch_sharding(mesh), shd.replicated(mesh)
  if config.stage == "code_drafter":
    step = functools.partial(drafter_train_step, graphdef, config=config)
    return jax.jit(step, in_shardings=(shardings, data_sharding, repl, repl), out_shardings=(shardings, repl),
                   donate_argnums=0)
  teacher_graphdef, teacher = load_teacher(config, mesh)
  step = functools.partial(refiner_train_step, teacher_graphdef=teacher_graphdef, config=config)
  teacher_shardings = jax.tree.map(lambda a: a.sharding, teacher)
  jitted = jax.jit(functools.partial(step, graphdef), out_shardings=(shardings, repl), donate_argnums=0,
                   in_shardings=(shardings, data_sharding, repl, repl, teacher_shardings))
  return lambda state, batch, prog_si, prog_wp: jitted(state, batch, prog_si, prog_wp, teacher)
