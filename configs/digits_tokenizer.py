"""Tokenizer stage on the embedded UCI digits (the `make demo` default): a tiny multi-scale VQVAE on 16x16
images.

  python train.py --config configs/digits_tokenizer.py --workdir workdir/digits_tok
  python train.py --config configs/digits_tokenizer.py:runlocal --workdir /tmp/t   # a few steps, for smoke
  tests

Architecture: the official Encoder/Decoder with ch=32, ch_mult=(1, 1, 1) (downsample 4, like the
golden-fixture VAE), Cvae=8, a 64-entry codebook and patch_nums (1, 2, 3, 4) for the 4x4 latent.
"""

import ml_collections

from configs import common


def get_config(arg=None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, runlocal=False, steps=300, batch=64, vocab=64)
  c = common.base_config()
  c.stage = "tokenizer"
  c.total_steps = 8 if arg.runlocal else arg.steps
  c.input = common.input_config("digits", resolution=16, batch_size=8 if arg.runlocal else arg.batch)
  c.tokenizer = ml_collections.ConfigDict(dict(
      ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, using_sa=False, using_mid_sa=False, z_channels=8,
      vocab_size=arg.vocab, patch_nums=(1, 2, 3, 4), quant_resi=0.5, share_quant_resi=4, beta=0.25,
      dropout=0.0, in_channels=3))
  c.optim = common.optim_config(tblr=2e-3 * 256 / 64, warmup_steps=50, schedule="lin0", end_ratio=0.05,
                                weight_decay=0.0)
  c.loss = common.tokenizer_loss_config(l1_weight=1.0, l2_weight=1.0, restart_every=50)
  c.log_every_steps = 2 if arg.runlocal else 50
  c.eval_every_steps = 0 if arg.runlocal else 500
  c.eval_batches = 2 if arg.runlocal else 0
  c.ckpt.every_steps = 4 if arg.runlocal else 500
  return c
