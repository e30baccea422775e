"""VAR of the digits evaluation model (var/eval/eval_model.py): a class-conditional VAR on the 7-scale digits
tokenizer (configs/digits_eval_tokenizer.py), recipe and size as configs/digits_var.py (depth 4, width 128,
600 steps), batch 32.

  python train.py --config configs/digits_eval_var.py --workdir workdir/eval_model/var \
      --config.tokenizer_dir workdir/eval_model/tokenizer/model

The large model of the CoDe digits table (benchmarks/bench_code.py --digits; the evaluation VAR above is the
small one): the same recipe, steps, batch and seed at depth 8 on the same tokenizer. Width 128 keeps the run near
40 min on a shared 2-core CPU (width 256 measured ~12 s/step there, two hours):

  python train.py --config configs/digits_eval_var.py:depth=8 --workdir workdir/eval_model_d8/var \
      --config.tokenizer_dir workdir/eval_model/tokenizer/model

Any configs/digits_var.py argument passes through (depth, width, steps, batch, tblr, crop_scale).
"""

import ml_collections

from configs import digits_var


def get_config(arg=None) -> ml_collections.ConfigDict:
  # 155 tokens per image (1.8x the demo's 85): batch 32 keeps a step's cost near the demo VAR's
  return digits_var.get_config(f"batch=32,{arg or ''}")
