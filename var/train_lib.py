"""Training: losses, optimizer, schedules, the sharded train steps and the loop for both stages.

Stages (config.stage):
  * "tokenizer": the multi-scale VQVAE (reconstruction + VQ terms, optional EMA codebook, dead-code restart,
    optional LPIPS and PatchGAN from tokenizer/losses.py).
  * "var": the next-scale transformer on tokens of a frozen tokenizer, tokenised inside the jitted step; the
    official recipe of VAR.md section 3 (per-token CE with uniform 1/L weights, class dropout, AdamW(0.9,
    0.95) with the official no-decay set, lr = tblr * batch / 256, warmup + lin0, cosine weight-decay
    schedule, clip 2.0, optional progressive training).

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
import optax
from flax import nnx

# ------------------------------------------------------------------------------------------------------------
# Schedules (VAR utils/lr_control.py `lr_wd_annealing`, as pure functions of the 0-based iteration)
# ------------------------------------------------------------------------------------------------------------


def lr_factor(step, *, schedule: str, warmup_steps: int, total_steps: int, warmup_start: float = 0.005,
              end_ratio: float = 0.01):
  """Learning rate as a fraction of the peak at iteration `step` (official `lr_wd_annealing`).

  Warmup: linear from `warmup_start` (wp0) at step 0 towards 1 at `warmup_steps`. Afterwards, with
  p = (step - warmup) / (total - 1 - warmup): `lin0` keeps 1 for p < 0.05 then goes linearly to `end_ratio`
  (wpe) at p = 1; `lin` the same with a 0.15 plateau; `lin00` linear from 1; `cos` cosine to wpe; `exp`
  exponential after a 0.15 plateau; `linX` a linear ramp to a mid value over the first X then linear to wpe.
  Works on Python numbers and on traced jax scalars.
  """
  step = jnp.asarray(step, jnp.float32)
  wp, wpe = float(round(warmup_steps)), float(end_ratio)
  warm = warmup_start + (1 - warmup_start) * step / max(wp, 1.0)
  p = (step - wp) / max(total_steps - 1 - wp, 1.0)
  rest = 1 - p
  if schedule == "cos":
    after = wpe + (1 - wpe) * (0.5 + 0.5 * jnp.cos(jnp.pi * p))
  elif schedule in ("lin", "lin0"):
    t = 0.15 if schedule == "lin" else 0.05
    after = jnp.where(p < t, 1.0, wpe + (1 - wpe) * rest / (1 - t))
  elif schedule == "lin00":
    after = wpe + (1 - wpe) * rest
  elif schedule == "exp":
    t = 0.15
    after = jnp.where(p < t, 1.0, jnp.exp((p - t) / (1 - t) * math.log(wpe)))
  elif schedule.startswith("lin"):
    t = float(schedule[3:])
    mid = (1 + wpe + (1 - wpe) * (1 - t)) / 2
    after = jnp.where(p < t, 1 + (mid - 1) * p / t, wpe + (mid - wpe) * rest / (1 - t))
  else:
    raise ValueError(f"Unknown lr schedule {schedule!r}; use lin0, lin, lin00, linX (e.g. lin0.1), cos, exp")
  return jnp.where(step < wp, warm, after)


def weight_decay_at(step, *, weight_decay: float, weight_decay_end: float, total_steps: int):
  """Official weight-decay schedule: cosine from `weight_decay` (twd) at step 0 to `weight_decay_end` (twde).
  """
  p = jnp.asarray(step, jnp.float32) / max(total_steps - 1, 1)
  return weight_decay_end + (weight_decay - weight_decay_end) * (0.5 + 0.5 * jnp.cos(jnp.pi * p))


def peak_lr(optim: ml_collections.ConfigDict, global_batch: int) -> float:
  """Official lr scaling: peak = tblr * global_batch / 256."""
  return optim.tblr * global_batch / 256


# ------------------------------------------------------------------------------------------------------------
# Optimizer
# ------------------------------------------------------------------------------------------------------------

# Official no-weight-decay keywords (VAR utils/lr_control.py `filter_params`), matched against parameter
# paths.
NO_DECAY_KEYWORDS = ("cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC",
                     "pos_start", "start_pos", "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias",
                     "scale_mul")


def _path_str(path) -> str:
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return ".".join(parts)


def _logical_names(var: nnx.Variable) -> tuple:
  meta = var.get_metadata()
  names = meta.get("out_sharding", meta.get("sharding", None))
  return tuple(names) if names else ()


def decay_mask(params: nnx.State) -> nnx.State:
  """True where AdamW weight decay applies, by the official rule: no decay for 1-D params, names ending in
  `bias`, and names containing a NO_DECAY_KEYWORDS entry. Stacked layers (logical axis "layers") do not count
  as a dimension, so a scanned block's (depth, C) bias is still "1-D"."""

  def decays(path, var):
    name = _path_str(path)
    value = var.get_value() if isinstance(var, nnx.Variable) else var  # also works on abstract states
    ndim = len(value.shape) - (_logical_names(var).count("layers") if isinstance(var, nnx.Variable) else 0)
    if ndim <= 1 or name.endswith("bias") or any(k in name for k in NO_DECAY_KEYWORDS):
      return False
    return True

  return jax.tree_util.tree_map_with_path(decays, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _path_lookup_mask(table: dict[str, bool]) -> Callable:
  """An optax mask callable that works on both Variable trees (init) and pure-array trees (update)."""

  def mask(tree):
    return jax.tree_util.tree_map_with_path(lambda p, _: table[_path_str(p)], tree,
                                            is_leaf=lambda x: isinstance(x, nnx.Variable))

  return mask


def make_optimizer(optim: ml_collections.ConfigDict, params: nnx.State, *, global_batch: int,
                   total_steps: int,
                   frozen: Callable[[str], bool] | None = None) -> optax.GradientTransformation:
  """AdamW with the official recipe: clip(2.0) -> Adam(b1, b2, eps) -> decoupled weight decay on the decay set
  with the cosine wd schedule -> lr schedule scaled to tblr * batch / 256.

  `params` is the nnx.State of the trainable parameters (Variables, for their paths and logical names).
  `frozen(path)` marks parameters that get no optimizer update at all (e.g. an EMA-updated codebook).
  """
  table = {_path_str(p): bool(v) for p, v in jax.tree_util.tree_leaves_with_path(
      decay_mask(params), is_leaf=lambda x: isinstance(x, bool))}
  peak = peak_lr(optim, global_batch)
  kw = dict(schedule=optim.schedule, warmup_steps=optim.warmup_steps, total_steps=total_steps,
            warmup_start=optim.warmup_start, end_ratio=optim.end_ratio)
  lr = lambda count: peak * lr_factor(count, **kw)
  wd = lambda count: weight_decay_at(count, weight_decay=optim.weight_decay,
                                     weight_decay_end=optim.weight_decay_end, total_steps=total_steps)
  parts = []
  if optim.grad_clip and optim.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(optim.grad_clip))
  parts += [optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps),
            optax.add_decayed_weights(wd, mask=_path_lookup_mask(table)),
            optax.scale_by_learning_rate(lr)]
  tx = optax.chain(*parts)
  if frozen is not None:
    trainable = {k: not frozen(k) for k in table}
    if not all(trainable.values()):
      tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                                 lambda tree: jax.tree_util.tree_map_with_path(
                                     lambda p, _: "train" if trainable[_path_str(p)] else "frozen", tree,
                                     is_leaf=lambda x: isinstance(x, nnx.Variable)))
  return tx


# ------------------------------------------------------------------------------------------------------------
# VAR loss and progressive training
# ------------------------------------------------------------------------------------------------------------


def scale_begin_ends(patch_nums) -> list[tuple[int, int]]:
  """Token ranges of every scale in the flattened sequence."""
  out, cur = [], 0
  for pn in patch_nums:
    out.append((cur, cur + pn * pn))
    cur += pn * pn
  return out


def progressive_stage(step: int, *, num_scales: int, pg: float, pg0: int, warmup_steps: int, total_steps: int,
                      pg_warmup_steps: int) -> tuple[int, float]:
  """Official progressive training (`--pg`, trainer.py): returns (prog_si, prog_wp) for 0-based iteration
  `step`.

  prog_si ramps from pg0 to S-1 over [warmup, pg * total]; the newest scale's loss weight ramps with
  prog_wp = clip(prog_it / pg_warmup_steps, 0.01, 1), prog_it counting the iterations since prog_si last
  changed (1-based), and 1 during the first stage. prog_si = -1 means "all scales, full weights" (no
  progressive training, or the last stage). Pure function of `step`, so a resumed run continues the ramp
  exactly.
  """
  if not pg:
    return -1, 1.0

  def si_at(it):
    if it <= warmup_steps:
      return pg0
    if it >= total_steps * pg:
      return num_scales - 1
    progress = min(max((it - warmup_steps) / (total_steps * pg - warmup_steps), 0), 1)
    return pg0 + round(progress * (num_scales - 1 - pg0))

  si = si_at(step)
  first = si_at(0) == si
  if si == num_scales - 1:
    return -1, 1.0
  lo, hi = 0, step  # first iteration with this prog_si (si_at is non-decreasing)
  while lo < hi:
    mid = (lo + hi) // 2
    if si_at(mid) >= si:
      hi = mid
    else:
      lo = mid + 1
  prog_it = step - lo + 1
  wp = 1.0 if first else max(min(prog_it / max(pg_warmup_steps, 1), 1.0), 0.01)
  return si, wp


def var_loss_weights(patch_nums, prog_si, prog_wp):
  """Per-token loss weights (L,): 1/L everywhere; under progressive training the scales after prog_si get 0
  and scale prog_si gets prog_wp / L (VAR trainer.py). Block-causal attention makes zero-weighting the later
  scales equal to the official truncated forward, so one compiled step serves every stage. prog_si may be
  traced."""
  begin_ends = scale_begin_ends(patch_nums)
  seq_len = begin_ends[-1][1]
  lvl = np.concatenate([np.full(e - b, i) for i, (b, e) in enumerate(begin_ends)])  # (L,)
  lvl = jnp.asarray(lvl)
  prog_si = jnp.asarray(prog_si)
  full = prog_si < 0
  w = jnp.where(lvl < prog_si, 1.0, jnp.where(lvl == prog_si, prog_wp, 0.0))
  return jnp.where(full, 1.0, w) / seq_len


# ------------------------------------------------------------------------------------------------------------
# Codebook statistics (tokenizer stage)
# ------------------------------------------------------------------------------------------------------------


class CodebookStat(nnx.Variable):
  """Running codebook statistics (not trained by the optimizer, saved in checkpoints)."""


class CodebookStats(nnx.Module):
  """EMA of per-code assignment counts (usage, dead-code detection) and, for EMA codebooks, of the assigned
  vector sums (VQ-VAE-2 style updates)."""

  def __init__(self, vocab_size: int, z_channels: int, tokens_per_step: int):
    share = tokens_per_step / vocab_size  # a uniform code's expected hits per step: usage starts "alive"
    self.usage = CodebookStat(jnp.full((vocab_size,), share, jnp.float32), out_sharding=("codebook",))
    self.ema_count = CodebookStat(jnp.full((vocab_size,), share, jnp.float32), out_sharding=("codebook",))
    self.ema_sum = CodebookStat(jnp.zeros((vocab_size, z_channels), jnp.float32),
                                out_sharding=("codebook", "latent"))


def scale_residuals(tokenizer, f, idx_list):
  """The vectors each scale quantised: z_si = area(f - f_hat_{si-1} -> pn_si) (the last scale unresized), i.e.
  exactly what the quantizer's nearest-code search saw. f (B, P, P, C) -> [(B * pn^2, C)] (no gradient)."""
  from tokenizer.resample import area_resize

  f = jax.lax.stop_gradient(f.astype(jnp.float32))
  f_hats = jax.lax.stop_gradient(tokenizer.idx_to_fhat(idx_list, all_scales=True))
  patch_nums = tokenizer.config.patch_nums
  out = []
  for si, pn in enumerate(patch_nums):
    rest = f if si == 0 else f - f_hats[si - 1]
    z = rest if si == len(patch_nums) - 1 else area_resize(rest, pn)
    out.append(z.reshape(-1, f.shape[-1]))
  return out


def codebook_usage_metrics(idx_list, vocab_size: int) -> dict[str, jax.Array]:
  """Per-scale perplexity (exp of the code-distribution entropy) and fraction of codes used in this batch."""
  metrics = {}
  total = jnp.zeros((vocab_size,), jnp.float32)
  for si, idx in enumerate(idx_list):
    counts = jnp.zeros((vocab_size,), jnp.float32).at[idx.reshape(-1)].add(1.0)
    total = total + counts
    p = counts / counts.sum()
    metrics[f"perplexity/s{si}"] = jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(p), 0.0)))
    metrics[f"codes_used/s{si}"] = jnp.mean(counts > 0)
  p = total / total.sum()
  metrics["perplexity"] = jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(p), 0.0)))
  metrics["codes_used"] = jnp.mean(total > 0)
  return metrics


# ------------------------------------------------------------------------------------------------------------
# Trainers: every piece of training state in one nnx module, so one split/merge covers it
# ------------------------------------------------------------------------------------------------------------


def tokenizer_config_from(config: ml_collections.ConfigDict):
  """VQVAEConfig from `config.tokenizer` (a preset name plus field overrides)."""
  from tokenizer.vqvae import VQVAEConfig

  fields = dict(config.tokenizer.to_dict())
  preset = fields.pop("preset", None)
  fields["dtype"] = config.dtype
  if preset:
    return VQVAEConfig.preset(preset, **fields)
  return VQVAEConfig(**fields)


class TokenizerTrainer(nnx.Module):
  """VQVAE + its AdamW, codebook statistics, and (optional) PatchGAN + its optimizer and frozen LPIPS."""

  def __init__(self, config: ml_collections.ConfigDict, *, global_batch: int, rngs: nnx.Rngs):
    from tokenizer.losses import LPIPS, PatchDiscriminator
    from tokenizer.vqvae import VQVAE

    vq_config = tokenizer_config_from(config)
    loss = config.loss
    self.model = VQVAE(vq_config, rngs=rngs)
    ema = loss.codebook_update == "ema"
    frozen = (lambda path: path.endswith("quantize.embedding.embedding")) if ema else None
    tx = make_optimizer(config.optim, nnx.state(self.model, nnx.Param), global_batch=global_batch,
                        total_steps=config.total_steps, frozen=frozen)
    self.opt = nnx.Optimizer(self.model, tx, wrt=nnx.Param)
    tokens = global_batch * sum(p * p for p in vq_config.patch_nums)
    self.codebook_stats = CodebookStats(vq_config.vocab_size, vq_config.z_channels, tokens)
    disc = disc_opt = lpips = None
    if loss.gan_weight > 0:
      disc = PatchDiscriminator(vq_config.in_channels, loss.disc_base_channels, loss.disc_layers, rngs=rngs)
      tx_d = optax.adam(peak_lr(ml_collections.ConfigDict({"tblr": loss.disc_tblr}), global_batch),
                        b1=loss.disc_b1, b2=loss.disc_b2)
      disc_opt = nnx.Optimizer(disc, tx_d, wrt=nnx.Param)
    if loss.lpips_weight > 0:
      lpips = LPIPS(rngs=rngs)  # weights replaced by the local files after init (see load_frozen_weights)
    self.disc, self.disc_opt, self.lpips = disc, disc_opt, lpips


def var_config_from(config: ml_collections.ConfigDict, tok_config):
  """VARConfig from `config.model` (`depth` + overrides; the official builder), with the vocabulary, latent
  width and patch_nums of the tokenizer."""
  from var.model import VARConfig

  fields = dict(config.model.to_dict())
  depth = fields.pop("depth")
  fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in fields.items()
            if v is not None and not (isinstance(v, (tuple, list)) and not v)}  # () / None: not overridden
  # load_tokenizer_config already applied (and checked) config.model.patch_nums
  fields["patch_nums"] = tok_config.patch_nums
  return VARConfig.from_depth(depth, vocab_size=tok_config.vocab_size, z_channels=tok_config.z_channels,
                              dtype=config.dtype, **fields)


class VarTrainer(nnx.Module):
  """VAR transformer + its AdamW + the frozen tokenizer that turns images into tokens inside the step."""

  def __init__(self, config: ml_collections.ConfigDict, tok_config, *, global_batch: int, rngs: nnx.Rngs):
    from tokenizer.vqvae import VQVAE
    from var.model import VAR

    self.model = VAR(var_config_from(config, tok_config), rngs=rngs)
    tx = make_optimizer(config.optim, nnx.state(self.model, nnx.Param), global_batch=global_batch,
                        total_steps=config.total_steps)
    self.opt = nnx.Optimizer(self.model, tx, wrt=nnx.Param)
    self.tokenizer = VQVAE(tok_config, rngs=rngs)  # replaced by the pretrained weights after init


# ------------------------------------------------------------------------------------------------------------
# Train / eval steps (pure functions of (graphdef, state); jitted by `_compiled_steps`)
# ------------------------------------------------------------------------------------------------------------


def _step_rng(seed: int, step) -> jax.Array:
  return jax.random.fold_in(jax.random.key(seed), step)


def var_tokenize(tokenizer, images):
  """Images (B, H, W, 3) in [-1, 1] -> (gt tokens (B, L) int32, teacher-forcing input (B, L - 1, Cvae))."""
  idx_list = tokenizer.img_to_idx(images)
  x = tokenizer.idx_to_var_input(idx_list)
  return jax.lax.stop_gradient(jnp.concatenate(idx_list, axis=1)), jax.lax.stop_gradient(x)


def var_train_step(graphdef, state, batch, prog_si, prog_wp, *, config: ml_collections.ConfigDict):
  """One VAR update: tokenise, teacher-forced forward with class dropout + drop path, weighted CE, AdamW."""
  from var.model import cross_entropy_loss

  trainer = nnx.merge(graphdef, state)
  step = trainer.opt.step[...]
  rng = _step_rng(config.seed, step)
  gt, x = var_tokenize(trainer.tokenizer, batch["image"])
  labels = batch["label"].astype(jnp.int32)
  model_cfg = trainer.model.config
  weights = var_loss_weights(model_cfg.patch_nums, prog_si, prog_wp)

  def loss_fn(model):
    logits = model(labels, x, cond_drop_rate=config.loss.cond_drop_rate, rng=rng,
                   deterministic=model_cfg.drop_path_rate == 0)
    return cross_entropy_loss(logits, gt, config.loss.label_smoothing, weights[None]), logits

  (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(trainer.model)
  grad_norm = optax.tree.norm(grads)
  trainer.opt.update(trainer.model, grads)
  metrics = {"loss": loss, "grad_norm": grad_norm, **_var_token_metrics(logits, gt, model_cfg.patch_nums),
             "lr": peak_lr(config.optim, batch["label"].shape[0]) * lr_factor(
                 step, schedule=config.optim.schedule, warmup_steps=config.optim.warmup_steps,
                 total_steps=config.total_steps, warmup_start=config.optim.warmup_start,
                 end_ratio=config.optim.end_ratio)}
  return nnx.state(trainer), metrics


def _var_token_metrics(logits, gt, patch_nums):
  """Token accuracy overall and on the last scale, and the last-scale ("tail") CE like the official logs."""
  b, e = scale_begin_ends(patch_nums)[-1]
  pred = jnp.argmax(logits, axis=-1)
  logp = jax.nn.log_softmax(logits[:, b:e].astype(jnp.float32), axis=-1)
  tail = -jnp.take_along_axis(logp, gt[:, b:e, None], axis=-1).mean()
  return {"acc": jnp.mean(pred == gt), "acc_tail": jnp.mean(pred[:, b:e] == gt[:, b:e]), "loss_tail": tail}


def var_eval_step(graphdef, state, batch, *, config: ml_collections.ConfigDict):
  """Held-out sums (masked by batch["mask"]) of the loss without class dropout or drop path, and of token
  accuracies. (The official validation also drops 10% of labels; here eval is clean.)"""
  trainer = nnx.merge(graphdef, state)
  gt, x = var_tokenize(trainer.tokenizer, batch["image"])
  logits = trainer.model(batch["label"].astype(jnp.int32), x)
  mask = batch["mask"].astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, gt[..., None], axis=-1)[..., 0]  # (B, L)
  b, e = scale_begin_ends(trainer.model.config.patch_nums)[-1]
  correct = jnp.argmax(logits, axis=-1) == gt
  return {"count": mask.sum(), "loss": (nll.mean(-1) * mask).sum(),
          "loss_tail": (nll[:, b:e].mean(-1) * mask).sum(), "acc": (correct.mean(-1) * mask).sum(),
          "acc_tail": (correct[:, b:e].mean(-1) * mask).sum()}


def _rec_loss(rec, img, loss_cfg):
  out = 0.0
  if loss_cfg.l1_weight:
    out = out + loss_cfg.l1_weight * jnp.mean(jnp.abs(rec - img))
  if loss_cfg.l2_weight:
    out = out + loss_cfg.l2_weight * jnp.mean(jnp.square(rec - img))
  return out


def tokenizer_train_step(graphdef, state, batch, *, config: ml_collections.ConfigDict):
  """One tokenizer update: reconstruction (+ LPIPS) + VQ terms (+ adaptive-weight hinge GAN after its start
  step), AdamW; EMA codebook update and dead-code restart; discriminator update."""
  from tokenizer.losses import adaptive_weight, generator_adv_loss, hinge_d_loss

  trainer = nnx.merge(graphdef, state)
  loss_cfg = config.loss
  step = trainer.opt.step[...]
  rng = _step_rng(config.seed, step)
  img = batch["image"]
  gan_on = (step >= loss_cfg.gan_start_step).astype(jnp.float32) if trainer.disc is not None else 0.0
  if trainer.disc is not None:
    # The generator sees D through a throw-away copy (fresh Variables, made inside whichever trace calls it):
    # gradients flow through D's activations and the copy's BatchNorm statistics are dropped; only the D
    # update below moves D's state.
    disc_graph, disc_state = nnx.split(trainer.disc)
    disc_view = lambda x: nnx.merge(disc_graph, jax.tree.map(lambda v: v, disc_state))(x)

  def forward(model):
    f = model.encode(img)
    f_hat, vq_loss, idx_list = model.quantize(f)
    rec = model.decoder(model.post_quant_conv(f_hat).astype(model.config.dtype)).astype(jnp.float32)
    nll = _rec_loss(rec, img, loss_cfg)
    if trainer.lpips is not None:
      nll = nll + loss_cfg.lpips_weight * jnp.mean(trainer.lpips(rec, img))
    g_loss = generator_adv_loss(disc_view(rec)) if trainer.disc is not None else jnp.zeros(())
    return nll, g_loss, vq_loss, rec, f, idx_list

  def loss_fn(model, d_weight):
    nll, g_loss, vq_loss, rec, f, idx_list = forward(model)
    total = nll + loss_cfg.vq_weight * vq_loss + d_weight * gan_on * g_loss
    return total, (nll, g_loss, vq_loss, rec, f, idx_list)

  d_weight = jnp.zeros(())
  if trainer.disc is not None:
    # taming's adaptive weight: gradients of the two terms at the decoder's last conv
    last = nnx.DiffState(0, nnx.All(nnx.Param, nnx.PathContains("decoder"), nnx.PathContains("conv_out")))
    nll_grad = nnx.grad(lambda m: forward(m)[0], argnums=last)(trainer.model)
    g_grad = nnx.grad(lambda m: forward(m)[1], argnums=last)(trainer.model)
    d_weight = adaptive_weight(nll_grad, g_grad, loss_cfg.gan_weight)
  (total, (nll, g_loss, vq_loss, rec, f, idx_list)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(
      trainer.model, d_weight)
  grad_norm = optax.tree.norm(grads)
  # what each scale quantised, with the pre-update codebook and phi (the ones that chose idx_list)
  zs = jnp.concatenate(scale_residuals(trainer.model, f, idx_list), axis=0)  # (N, Cvae)
  trainer.opt.update(trainer.model, grads)
  metrics = {"loss": total, "rec_loss": nll, "vq_loss": vq_loss, "grad_norm": grad_norm,
             "psnr": psnr(jnp.clip(rec, -1, 1), img)}

  _update_codebook(trainer, zs, idx_list, rng, step, loss_cfg, metrics)

  if trainer.disc is not None:
    fake = jax.lax.stop_gradient(rec)

    def d_loss_fn(disc):
      return hinge_d_loss(disc(img), disc(fake)) * gan_on

    d_loss, d_grads = nnx.value_and_grad(d_loss_fn)(trainer.disc)
    trainer.disc_opt.update(trainer.disc, d_grads)
    metrics.update(d_loss=d_loss, g_loss=g_loss, d_weight=d_weight)
  metrics.update(codebook_usage_metrics(idx_list, trainer.model.config.vocab_size))
  return nnx.state(trainer), metrics


def _update_codebook(trainer, zs, idx_list, rng, step, loss_cfg, metrics):
  """Usage EMA, EMA codebook (when configured) and dead-code restart, in place on the merged trainer.
  zs (N, Cvae) are the vectors the quantizer assigned to the tokens idx_list (concatenated in the same
  order)."""
  stats = trainer.codebook_stats
  quant = trainer.model.quantize
  vocab = quant.vocab_size
  idx = jnp.concatenate([i.reshape(-1) for i in idx_list])  # (N,)
  counts = jnp.zeros((vocab,), jnp.float32).at[idx].add(1.0)
  decay = loss_cfg.ema_decay
  stats.usage[...] = decay * stats.usage[...] + (1 - decay) * counts
  codebook = quant.embedding.embedding[...]
  if loss_cfg.codebook_update == "ema":
    sums = jnp.zeros_like(stats.ema_sum[...]).at[idx].add(zs)
    stats.ema_count[...] = decay * stats.ema_count[...] + (1 - decay) * counts
    stats.ema_sum[...] = decay * stats.ema_sum[...] + (1 - decay) * sums
    n = stats.ema_count[...].sum()
    # Laplace smoothing keeps rarely used codes finite
    smoothed = (stats.ema_count[...] + 1e-5) / (n + vocab * 1e-5) * n
    codebook = stats.ema_sum[...] / smoothed[:, None]
  if loss_cfg.restart_every > 0:
    share = idx.shape[0] / vocab
    restart_now = (step % loss_cfg.restart_every == 0) & (step > 0)
    dead = (stats.usage[...] < loss_cfg.restart_threshold * share) & restart_now
    pick = jax.random.randint(jax.random.fold_in(rng, 1), (vocab,), 0, zs.shape[0])
    codebook = jnp.where(dead[:, None], zs[pick], codebook)
    # a restarted code gets a uniform share of usage, so it is not restarted again before it had a chance
    stats.usage[...] = jnp.where(dead, share, stats.usage[...])
    stats.ema_count[...] = jnp.where(dead, share, stats.ema_count[...])
    stats.ema_sum[...] = jnp.where(dead[:, None], zs[pick] * share, stats.ema_sum[...])
    metrics["codes_restarted"] = dead.sum()
  quant.embedding.embedding[...] = codebook
  share = idx.shape[0] / vocab
  metrics["codes_alive"] = jnp.mean(stats.usage[...] >= loss_cfg.restart_threshold * share)


def psnr(a, b):
  """Mean PSNR (dB) of images in [-1, 1] (peak-to-peak 2)."""
  mse = jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)), axis=(1, 2, 3))
  return jnp.mean(10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-12)))


def tokenizer_eval_step(graphdef, state, batch, *, config: ml_collections.ConfigDict):
  """Held-out sums (masked by batch["mask"]) of PSNR and L1 of the reconstruction through the tokens (clamped,
  like `img_to_reconstructed_img`), and the token histogram for codebook usage."""
  trainer = nnx.merge(graphdef, state)
  model = trainer.model
  img = batch["image"]
  mask = batch["mask"].astype(jnp.float32)
  idx_list = model.img_to_idx(img)
  rec = model.fhat_to_img(model.idx_to_fhat(idx_list))
  mse = jnp.mean(jnp.square(rec - img), axis=(1, 2, 3))
  psnr_b = 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-12))
  vocab = model.config.vocab_size
  hist = jnp.stack([jnp.zeros((vocab,), jnp.float32).at[idx].add(jnp.broadcast_to(mask[:, None], idx.shape))
                    for idx in idx_list])  # (S, V)
  return {"count": mask.sum(), "psnr": (psnr_b * mask).sum(),
          "l1": (jnp.mean(jnp.abs(rec - img), axis=(1, 2, 3)) * mask).sum(), "hist": hist}


# ------------------------------------------------------------------------------------------------------------
# Setup: config checks, sharded state, jitted steps
# ------------------------------------------------------------------------------------------------------------

STAGES = ("tokenizer", "var")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Cheap checks that fail before any data or model work, naming the bad value and the fix."""
  if config.stage not in STAGES:
    raise ValueError(f"config.stage={config.stage!r} is not a training stage; use one of {STAGES}")
  if config.total_steps <= 0:
    raise ValueError(f"config.total_steps={config.total_steps} must be positive")
  if config.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"config.dtype={config.dtype!r} must be 'float32' or 'bfloat16'")
  lr_factor(0, schedule=config.optim.schedule, warmup_steps=1, total_steps=2)  # unknown schedule -> error
  if config.stage == "tokenizer":
    loss = config.loss
    if loss.codebook_update not in ("grad", "ema"):
      raise ValueError(f"config.loss.codebook_update={loss.codebook_update!r} must be 'grad' or 'ema'")
    if not (loss.l1_weight or loss.l2_weight or loss.lpips_weight):
      raise ValueError("the tokenizer needs a reconstruction loss: set config.loss.l1_weight, l2_weight or "
                       "lpips_weight > 0")
    if loss.lpips_weight > 0:
      for field in ("lpips_vgg_weights", "lpips_lin_weights"):
        path = loss[field]
        if not path or not pathlib.Path(path).is_file():
          raise FileNotFoundError(
              f"config.loss.{field}={path!r} does not exist. LPIPS needs the local torchvision VGG16 state "
              "dict (vgg16-397923af.pth) and the LPIPS v0.1 'vgg.pth' linear weights (nothing is "
              "downloaded); set both paths or disable LPIPS with config.loss.lpips_weight=0.")
  else:
    tok_dir = pathlib.Path(config.tokenizer_dir) if config.tokenizer_dir else None
    if tok_dir is None or not (tok_dir / "config.json").is_file():
      raise FileNotFoundError(
          f"config.tokenizer_dir={config.tokenizer_dir!r} is not a tokenizer model directory (no "
          "config.json). Train one with `train.py --config configs/digits_tokenizer.py` (it writes "
          "<workdir>/model) or convert the official weights with "
          "`python -m var.convert --vae vae_ch160v4096z32.pth --out DIR`.")


def load_tokenizer_config(config: ml_collections.ConfigDict):
  """The frozen tokenizer's VQVAEConfig (from its model directory), with the VAR's patch_nums if the config
  sets them; checks that the last scale matches the latent size of the configured image resolution."""
  from tokenizer.vqvae import VQVAEConfig

  path = pathlib.Path(config.tokenizer_dir) / "config.json"
  try:
    meta = json.loads(path.read_text())
    tok = VQVAEConfig.from_dict(meta["tokenizer"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f"Cannot read the tokenizer config {path}: {e}") from e
  if config.model.get("patch_nums"):
    pn = tuple(config.model.patch_nums)
    res = config.input.resolution
    if res % tok.downsample or res // tok.downsample != pn[-1]:
      raise ValueError(
          f"config.model.patch_nums={pn} ends in {pn[-1]}, but the tokenizer in {config.tokenizer_dir} turns "
          f"{res}px images into a {res / tok.downsample:g}x{res / tok.downsample:g} latent (downsample "
          f"{tok.downsample}): the last patch size must equal the latent size, e.g. patch_nums ending in "
          f"{res // tok.downsample}")
    tok = dataclasses.replace(tok, patch_nums=pn)
  tok.check_image_size(config.input.resolution)
  return dataclasses.replace(tok, dtype="float32")  # tokens are computed in float32, like the official code


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
    return lambda: TokenizerTrainer(config, global_batch=global_batch, rngs=nnx.Rngs(config.seed))
  return lambda: VarTrainer(config, tok_config, global_batch=global_batch, rngs=nnx.Rngs(config.seed))


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
    train = functools.partial(tokenizer_train_step, graphdef, config=config)
    train = _skipping_nonfinite(train) if config.skip_nonfinite else train
    train_step = jax.jit(train, in_shardings=(shardings, data_sharding), out_shardings=(shardings, repl),
                         donate_argnums=0)
    evalf = functools.partial(tokenizer_eval_step, graphdef, config=config)
  elif config.get("code"):  # CoDe fine-tuning (var/code_train.py): a VAR-stage run with another step
    from var import code_train

    train_step = code_train.compiled_train_step(config, graphdef, shardings, mesh)
    evalf = functools.partial(var_eval_step, graphdef, config=config)
  else:
    train = functools.partial(var_train_step, graphdef, config=config)
    train = _skipping_nonfinite(train) if config.skip_nonfinite else train
    train_step = jax.jit(train, in_shardings=(shardings, data_sharding, repl, repl),
                         out_shardings=(shardings, repl), donate_argnums=0)
    evalf = functools.partial(var_eval_step, graphdef, config=config)
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
  tok_config = load_tokenizer_config(config) if config.stage == "var" else None
  info = data.dataset_info(config.input)  # a missing dataset or data_dir fails here, before any compile
  if config.stage == "var" and info.num_classes != config.model.num_classes:
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
        if config.stage == "var":
          prog_si, prog_wp = (-1, 1.0) if pg is None else progressive_stage(
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
        sample_now = (config.stage == "var" and bool(config.sample_every_steps)
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
