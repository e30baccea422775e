"""CoDe's specialised fine-tuning (var/stages/code.py) on the embedded UCI digits: a VAR-stage run whose step is the
drafter's CE over the first N scales or the refiner's distillation from the frozen large model.

  # the large model (depth 8) and the small one (depth 4) on the same tokenizer: the VAR stage
  python train.py --config configs/digits_var.py:depth=8,width=256 --workdir workdir/digits_var_d8 \
      --config.tokenizer_dir workdir/digits_tok/model
  python train.py --config configs/digits_var.py:depth=4,width=128 --workdir workdir/digits_var_d4 \
      --config.tokenizer_dir workdir/digits_tok/model
  # drafter: fine-tune the large model on the first N scales
  python train.py --config configs/digits_code.py:role=drafter,draft_steps=2,depth=8,width=256 \
      --workdir workdir/code_drafter --init_from workdir/digits_var_d8/model \
      --config.tokenizer_dir workdir/digits_tok/model
  # refiner: distil the large model into the small one
  python train.py --config configs/digits_code.py:role=refiner,draft_steps=2 --workdir workdir/code_refiner \
      --init_from workdir/digits_var_d4/model --config.code.teacher_dir workdir/digits_var_d8/model \
      --config.tokenizer_dir workdir/digits_tok/model

CoDe's recipe (spec 5.2) fine-tunes for a fraction of the pre-training (drafter 5% of the epochs at lr 1e-6,
refiner 25% at lr 1e-5 on ImageNet); at digits scale both default to a short run at a tenth of the VAR stage's
peak lr. The refiner's draft-token weight decays 1 -> 0 over `total_steps`.
"""

import ml_collections

from configs import digits_var


def get_config(arg=None) -> ml_collections.ConfigDict:
  from configs import common

  arg = common.parse_arg(arg, role="drafter", draft_steps=2, runlocal=False, steps=200, batch=64, depth=4,
                         width=128, ce_weight=1.0)
  c = digits_var.get_config(f"runlocal={arg.runlocal},steps={arg.steps},batch={arg.batch},depth={arg.depth},"
                            f"width={arg.width}")
  c.code = ml_collections.ConfigDict(dict(role=arg.role, draft_steps=arg.draft_steps, teacher_dir="",
                                          ce_weight=arg.ce_weight))
  c.optim.tblr = c.optim.tblr / 10
  c.optim.warmup_steps = 0 if arg.runlocal else 20
  c.progressive.pg = 0.0
  return c
