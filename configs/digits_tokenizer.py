"""Tokenizer stage on the embedded UCI digits (the `make demo` default): a small multi-scale VQVAE on 16x16
images.

  python train.py --config configs/digits_tokenizer.py --workdir workdir/digits_tok
  python train.py --config configs/digits_tokenizer.py:runlocal --workdir /tmp/t   # a few steps, for smoke
  tests

Architecture: the official Encoder/Decoder with ch=32, ch_mult=(1, 1) (downsample 2), Cvae=8, a 256-entry
codebook and patch_nums (1, 2, 4, 8) for the 8x8 latent.

Why these choices (issue 14): the digits are 8x8 images of 17 grey levels, upsampled to 16x16. A 4x4 latent
(downsample 4) must describe each 2x2 block of native pixels with one token per scale, which capped held-out
PSNR near 18 dB; an 8x8 latent puts one latent cell on each native pixel, so the finest scale can store it.
The digits are already centred and size-normalised, so the crop augmentation (crop_scale 1.125, a LANCZOS
enlargement) only blurred the training targets: crop_scale is 1.0 here.
"""

import ml_collections

from configs import common


def get_config(arg=None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, runlocal=False, steps=600, batch=64, vocab=256, patch_nums="1-2-4-8",
                         tblr=4e-3, crop_scale=1.0)
  c = common.base_config()
  c.stage = "tokenizer"
  c.total_steps = 8 if arg.runlocal else arg.steps
  c.input = common.input_config("digits", resolution=16, batch_size=8 if arg.runlocal else arg.batch,
                                crop_scale=arg.crop_scale)
  c.tokenizer = ml_collections.ConfigDict(dict(
      ch=32, ch_mult=(1, 1), num_res_blocks=1, using_sa=False, using_mid_sa=False, z_channels=8,
      vocab_size=arg.vocab, patch_nums=common.parse_patch_nums(arg.patch_nums), quant_resi=0.5,
      share_quant_resi=4, beta=0.25, dropout=0.0, in_channels=3))
  c.optim = common.optim_config(tblr=arg.tblr, warmup_steps=50, schedule="lin0", end_ratio=0.05,
                                weight_decay=0.0)
  # EMA codebook updates (VQ-VAE-2) train the codebook much faster than its gradient term on a short run
  c.loss = common.tokenizer_loss_config(l1_weight=1.0, l2_weight=1.0, codebook_update="ema", restart_every=25)
  c.log_every_steps = 2 if arg.runlocal else 50
  c.eval_every_steps = 0
  c.eval_batches = 2 if arg.runlocal else 0
  c.ckpt.every_steps = 4 if arg.runlocal else 500
  return c
