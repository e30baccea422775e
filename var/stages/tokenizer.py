"""The tokenizer stage: the multi-scale VQVAE trained on reconstruction + VQ terms, with an optional EMA codebook,
dead-code restart, and optional LPIPS and PatchGAN (tokenizer/losses.py)."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from var.optim import make_optimizer, peak_lr
from var.stages import step_rng

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
# The trainer (every piece of training state in one nnx module, so one split/merge covers it) and its steps
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
  rng = step_rng(config.seed, step)
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




def validate(config: ml_collections.ConfigDict) -> None:
  """The tokenizer stage's config checks (loss terms, LPIPS weight files), before any data or model work."""
  if config.input.get("tokens_dir"):
    raise ValueError(f"config.input.tokens_dir={config.input.tokens_dir!r} is the VAR stages' token input; the "
                     "tokenizer stage trains on images: set --config.input.tokens_dir=None")
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
