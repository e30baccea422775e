"""VAR of the digits evaluation model (var/eval/eval_model.py): a class-conditional VAR on the 7-scale digits
tokenizer (configs/digits_eval_tokenizer.py), recipe as configs/digits_var.py.

  python train.py --config configs/digits_eval_var.py --workdir workdir/eval_model/var \
      --config.tokenizer_dir workdir/eval_model/tokenizer/model
"""

import ml_collections

from configs import digits_var


def get_config(arg=None) -> ml_collections.ConfigDict:
  arg = f"steps=800,{arg or ''}"
  return digits_var.get_config(arg)
