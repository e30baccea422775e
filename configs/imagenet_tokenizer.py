"""Tokenizer stage on ImageNet 256px with the official VQVAE architecture (vae_ch160v4096z32: ch 160,
ch_mult (1, 1, 2, 2, 4), Cvae 32, V 4096, patch_nums (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)).

The VAR repository does not publish its VAE training recipe; this follows the taming-transformers VQGAN f16
ImageNet recipe it descends from: L1 reconstruction + LPIPS (weight 1) + VQ terms (beta 0.25), hinge PatchGAN
with the adaptive weight (0.8) switched on after 250k steps, Adam-style optimizer without weight decay. LPIPS
needs the local VGG16 + LPIPS weight files:

  python train.py --config configs/imagenet_tokenizer.py --workdir DIR \
      --config.loss.lpips_vgg_weights vgg16-397923af.pth --config.loss.lpips_lin_weights vgg.pth
"""

import ml_collections

from configs import common


def get_config(arg=None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, runlocal=False, batch=256)
  c = common.base_config()
  c.stage = "tokenizer"
  c.dtype = "bfloat16"
  c.total_steps = 500_000
  c.input = common.input_config("imagenet2012", resolution=256, batch_size=arg.batch, workers=8,
                                read_threads=16)
  c.tokenizer = ml_collections.ConfigDict(dict(
      ch=160, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, using_sa=True, using_mid_sa=True, z_channels=32,
      vocab_size=4096, patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), quant_resi=0.5, share_quant_resi=4,
      beta=0.25, dropout=0.0, in_channels=3))
  c.optim = common.optim_config(tblr=4e-4, warmup_steps=5000, schedule="cos", end_ratio=0.01,
                                weight_decay=0.0)
  c.optim.b1, c.optim.b2 = 0.5, 0.9
  c.loss = common.tokenizer_loss_config(l1_weight=1.0, lpips_weight=1.0, gan_weight=0.8,
                                        gan_start_step=250_000, restart_every=1000)
  c.log_every_steps = 100
  c.eval_every_steps = 5000
  c.eval_batches = 50
  c.ckpt.every_steps = 5000
  if arg.runlocal:  # the same recipe on a few steps of small batches (plumbing checks)
    common.make_runlocal(c)
    c.loss.lpips_weight = 0.0
  return c
