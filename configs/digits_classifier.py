"""The digits reward classifier for test-time search (var/rewards.py), NOT the evaluation judge.

  python -m var.rewards train-digits-classifier --out workdir/digits_reward
  python -m var.rewards train-digits-classifier --out /tmp/r --config configs/digits_classifier.py:runlocal

Independent of the judge in var/eval/digits_quality.py, so a search that maximises this classifier's reward is
not graded by the network it optimised: the judge area-pools to the digits' native 8x8 and runs an MLP (seed 0);
this is a small CNN on the full-resolution image (two 3x3 conv stages, mean-pooled 4x4 feature map) with its own
seed and augmentation (random crop_scale crops plus shifts of up to `max_shift` pixels). Both train on the
embedded digits' train split only (var.data.digits_images, the fixed stratified split).
"""

import ml_collections

from configs import common


def get_config(arg=None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, runlocal=False, steps=3000, resolution=16, seed=17, crop_scale=1.0)
  c = ml_collections.ConfigDict()
  c.resolution = arg.resolution  # the generator's image size (configs/digits_tokenizer.py: 16)
  c.channels = (32, 64)  # conv stages; each is followed by a 2x2 average pool
  c.num_classes = 10
  c.seed = arg.seed  # the judge uses 0
  c.steps = 20 if arg.runlocal else arg.steps
  c.batch_size = 128
  c.learning_rate = 2e-3
  c.crop_scale = arg.crop_scale  # as the generator's input pipeline (configs/digits_*: 1.0, no crop)
  c.views = 1 if arg.runlocal or arg.crop_scale == 1.0 else 4  # pre-drawn random crops per training image
  c.max_shift = 2  # pixels, drawn per step
  return c
