"""Tokenizer of the digits evaluation model (var/eval/eval_model.py; the technique benchmark's trained model):
the demo tokenizer (configs/digits_tokenizer.py: 16x16 digits, 8x8 latent) with 7 scales.

  python train.py --config configs/digits_eval_tokenizer.py --workdir workdir/eval_model/tokenizer

patch_nums (1, 2, 3, 4, 5, 6, 8): the first seven sizes of the official 256px schedule (1, 2, 3, 4, 5, 6, 8, 10,
13, 16), so techniques that act per scale (ScaleKV budgets, FastVAR pruning of the large scales, TTS-VAR's
descending batch) have a realistic number of scales to act on. The full 10-scale schedule needs a 16x16 latent,
i.e. 32px digits at downsample 2 (L = 680 tokens, 4.4x the 155 here): it does not train in the budget of a few
minutes on a 2-core CPU.
"""

import ml_collections

from configs import digits_tokenizer


def get_config(arg=None) -> ml_collections.ConfigDict:
  arg = f"patch_nums=1-2-3-4-5-6-8,steps=800,{arg or ''}"
  return digits_tokenizer.get_config(arg)
