"""The official VAR ImageNet recipes (VAR.md section 3 table) as configs:

  python train.py --config configs/imagenet_var.py:depth=16 --workdir gs://.../d16 \
      --config.tokenizer_dir models/vae_ch160v4096z32 --config.input.data_dir ~/tensorflow_datasets

| depth | batch | epochs | tblr | peak lr | alng | wpe | twde | other |
| 16 | 768 | 200 | 1e-4 | 3.0e-4 | 1e-3 | 0.1 | 0.05 | |
| 20 | 768 | 250 | 1e-4 | 3.0e-4 | 1e-3 | 0.1 | 0.05 | |
| 24 | 768 | 350 | 8e-5 | 2.4e-4 | 1e-4 | 0.01 | 0.05 | |
| 30 | 1024 | 350 | 8e-5 | 3.2e-4 | 1e-5 | 0.01 | 0.08 | |
| 36 | 768 | 350 | 8e-5 | 2.4e-4 | 5e-6 | 0.01 | 0.08 | shared AdaLN, 512px |

Iterations per epoch = ceil(1,281,167 / batch); warmup = epochs / 50 epochs from 0.005 * peak; lin0 decay to
wpe * peak; AdamW(0.9, 0.95), weight decay 0.05 -> twde (cosine), clip 2.0, class dropout 0.1, label smoothing
0, no progressive training, no hflip. The official runs use fp16 autocast; here `dtype=bfloat16` activations
with float32 parameters (the TPU/GPU-native equivalent). The tokenizer is the converted official VQVAE
(`python -m var.convert --vae vae_ch160v4096z32.pth --out DIR`).
"""

import math

import ml_collections

from configs import common

IMAGENET_TRAIN = 1_281_167

# depth: (batch, epochs, tblr, init_adaln_gamma, wpe, twde)
RECIPES = {
    16: (768, 200, 1e-4, 1e-3, 0.1, 0.05),
    20: (768, 250, 1e-4, 1e-3, 0.1, 0.05),
    24: (768, 350, 8e-5, 1e-4, 0.01, 0.05),
    30: (1024, 350, 8e-5, 1e-5, 0.01, 0.08),
    36: (768, 350, 8e-5, 5e-6, 0.01, 0.08),
}


def get_config(arg=None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, depth=16, runlocal=False)
  if arg.depth not in RECIPES:
    raise ValueError(f"imagenet_var depth={arg.depth} has no official recipe; use one of {sorted(RECIPES)}")
  batch, epochs, tblr, alng, wpe, twde = RECIPES[arg.depth]
  iters = math.ceil(IMAGENET_TRAIN / batch)
  c = common.base_config()
  c.stage = "var"
  c.dtype = "bfloat16"
  c.total_steps = epochs * iters
  c.tokenizer_dir = ""
  resolution = 512 if arg.depth == 36 else 256
  c.input = common.input_config("imagenet2012", resolution=resolution, batch_size=batch, workers=8,
                                read_threads=16)
  patch_nums = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32) if arg.depth == 36 else (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
  c.model = ml_collections.ConfigDict(dict(
      depth=arg.depth, num_classes=1000, patch_nums=patch_nums, shared_aln=arg.depth == 36,
      init_adaln_gamma=alng))
  c.optim = common.optim_config(tblr=tblr, warmup_steps=round(epochs / 50 * iters), schedule="lin0",
                                end_ratio=wpe, weight_decay=0.05, weight_decay_end=twde)
  c.loss = ml_collections.ConfigDict(dict(label_smoothing=0.0, cond_drop_rate=0.1))
  c.progressive = ml_collections.ConfigDict(dict(pg=0.0, pg0=4, warmup_steps=round(epochs / 300 * iters)))
  c.log_every_steps = 100
  c.eval_every_steps = 10 * iters  # the official trainer evaluates every 10 epochs
  c.eval_batches = 0
  c.sample_every_steps = 5000
  c.sample_classes = (980, 437, 22, 562, 207, 360, 387, 974, 88, 979)
  c.sample_kwargs = ml_collections.ConfigDict({"cfg": 4.0, "top_k": 900, "top_p": 0.95, "seed": 0})
  c.ckpt.every_steps = 2000
  c.ckpt.max_to_keep = 3
  if arg.runlocal:  # the same recipe on a few steps of small batches (plumbing checks)
    common.make_runlocal(c)
  return c
