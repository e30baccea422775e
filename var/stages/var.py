"""The VAR stage: the next-scale transformer on the tokens of a frozen tokenizer, tokenised inside the jitted
step (or read as tokens, the tokenise-once input of var/token_data.py); the official recipe of VAR.md section 3
(per-token CE with uniform 1/L weights, class dropout, optional progressive training)."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from var.optim import lr_factor, make_optimizer, peak_lr
from var.stages import step_rng

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
# The trainer (model + optimizer + the frozen tokenizer) and its steps
# ------------------------------------------------------------------------------------------------------------


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



def var_tokenize(tokenizer, images):
  """Images (B, H, W, 3) in [-1, 1] -> (gt tokens (B, L) int32, teacher-forcing input (B, L - 1, Cvae))."""
  idx_list = tokenizer.img_to_idx(images)
  x = tokenizer.idx_to_var_input(idx_list)
  return jax.lax.stop_gradient(jnp.concatenate(idx_list, axis=1)), jax.lax.stop_gradient(x)


def var_inputs(tokenizer, batch):
  """A training batch -> (gt tokens (B, L) int32, teacher-forcing input (B, L - 1, Cvae)).

  Images (batch["image"], (B, H, W, 3) in [-1, 1]) are tokenised here; token pyramids (batch["tokens"], (B, L),
  the tokenise-once input of var/token_data.py) skip the encoder and the code search: only the quantizer's
  embedding and the exact resampling build the teacher-forcing input, as after tokenising."""
  if "tokens" not in batch:
    return var_tokenize(tokenizer, batch["image"])
  gt = batch["tokens"].astype(jnp.int32)
  x = tokenizer.idx_to_var_input(tokenizer.split_tokens(gt))
  return gt, jax.lax.stop_gradient(x)


def var_train_step(graphdef, state, batch, prog_si, prog_wp, *, config: ml_collections.ConfigDict):
  """One VAR update: tokenise (unless the batch holds tokens), teacher-forced forward with class dropout + drop
  path, weighted CE, AdamW."""
  from var.model import cross_entropy_loss

  trainer = nnx.merge(graphdef, state)
  step = trainer.opt.step[...]
  rng = step_rng(config.seed, step)
  gt, x = var_inputs(trainer.tokenizer, batch)
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




def validate(config: ml_collections.ConfigDict) -> None:
  """The VAR stage's config checks: the frozen tokenizer's model directory exists."""
  tok_dir = pathlib.Path(config.tokenizer_dir) if config.tokenizer_dir else None
  if tok_dir is None or not (tok_dir / "config.json").is_file():
    raise FileNotFoundError(
        f"config.tokenizer_dir={config.tokenizer_dir!r} is not a tokenizer model directory (no "
        "config.json). Train one with `train.py --config configs/digits_tokenizer.py` (it writes "
        "<workdir>/model) or convert the official weights with "
        "`python -m var.convert --vae vae_ch160v4096z32.pth --out DIR`.")
