"""VAR of the digits evaluation model (var/eval/eval_model.py): a class-conditional VAR on the 7-scale digits
tokenizer (configs/digits_eval_tokenizer.py), recipe and size as configs/digits_var.py (depth 4, width 128,
600 steps), batch 32.

  python train.py --config configs/digits_eval_var.py --workdir workdir/eval_model/var \
      --config.tokenizer_dir workdir/eval_model/tokenizer/model
"""

import ml_collections

from configs import digits_var


def get_config(arg=None) -> ml_collections.ConfigDict:
  # 155 tokens per image (1.8x the demo's 85): batch 32 keeps a step's cost near the demo VAR's
  return digits_var.get_config(f"batch=32,{arg or ''}")
