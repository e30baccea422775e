"""VAR stage on the embedded UCI digits (the `make demo` default): a small depth-4 VAR on the digits
tokenizer.

  python train.py --config configs/digits_var.py --workdir workdir/digits_var \
      --config.tokenizer_dir workdir/digits_tok/model

The official recipe (VAR.md section 3) at demo scale: AdamW(0.9, 0.95), lr = tblr * batch / 256, warmup +
lin0, weight decay 0.05, clip 2.0, class dropout 0.1 for classifier-free guidance, uniform 1/L token weights.
"""

import ml_collections

from configs import common


def get_config(arg=None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, runlocal=False, steps=600, batch=64, depth=4, width=128, tblr=1e-3 * 256 / 64,
                         crop_scale=1.0)
  c = common.base_config()
  c.stage = "var"
  c.total_steps = 8 if arg.runlocal else arg.steps
  c.tokenizer_dir = ""  # model directory of the trained tokenizer (<tokenizer workdir>/model)
  # crop_scale as the tokenizer's (configs/digits_tokenizer.py): the digits are already centred
  c.input = common.input_config("digits", resolution=16, batch_size=8 if arg.runlocal else arg.batch,
                                crop_scale=arg.crop_scale)
  c.model = ml_collections.ConfigDict(dict(
      depth=arg.depth, width=arg.width, num_heads=max(arg.width // 32, 1), num_classes=10, patch_nums=(),
      drop_path_rate=0.0, init_adaln_gamma=1e-3))
  c.optim = common.optim_config(tblr=arg.tblr, warmup_steps=100, schedule="lin0", end_ratio=0.05)
  c.loss = ml_collections.ConfigDict(dict(label_smoothing=0.0, cond_drop_rate=0.1))
  c.progressive = ml_collections.ConfigDict(dict(pg=0.0, pg0=1, warmup_steps=100))
  c.log_every_steps = 2 if arg.runlocal else 50
  c.eval_every_steps = 0 if arg.runlocal else 500
  c.eval_batches = 2 if arg.runlocal else 0
  c.ckpt.every_steps = 4 if arg.runlocal else 500
  c.sample_kwargs = ml_collections.ConfigDict({"cfg": 3.0, "top_k": 0, "top_p": 0.0, "seed": 0})
  return c
