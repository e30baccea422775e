"""CoDe's fine-tuning stages (var/stages/code.py) on the embedded UCI digits: `code_drafter` fine-tunes the large
VAR with the CE over the first N scales only; `code_refiner` fine-tunes the small VAR with KL to the frozen large
model plus its CE, the draft tokens' weight decaying 1 -> 0 over the run. Both resume, shard and checkpoint like the
VAR stage and export a VAR model directory (`<workdir>/model`) that sample.py reads.

  # the large model (depth 8) and the small one (depth 4) on the same tokenizer: the VAR stage
  python train.py --config configs/digits_var.py:depth=8,width=256 --workdir workdir/digits_var_d8 \
      --config.tokenizer_dir workdir/digits_tok/model
  python train.py --config configs/digits_var.py:depth=4,width=128 --workdir workdir/digits_var_d4 \
      --config.tokenizer_dir workdir/digits_tok/model
  # drafter: fine-tune the large model on the first N scales
  python train.py --config configs/digits_code.py:stage=code_drafter,draft_steps=2,depth=8,width=256 \
      --workdir workdir/code_drafter --init_from workdir/digits_var_d8/model \
      --config.tokenizer_dir workdir/digits_tok/model
  # refiner: distil the large model into the small one
  python train.py --config configs/digits_code.py:stage=code_refiner,draft_steps=2 --workdir workdir/code_refiner \
      --init_from workdir/digits_var_d4/model --config.code.teacher_dir workdir/digits_var_d8/model \
      --config.tokenizer_dir workdir/digits_tok/model
  # sample with the pair: the drafter draws scales 0..1, the refiner the rest
  python sample.py --checkpoint workdir/code_drafter/model --refiner workdir/code_refiner/model --draft_steps 2 \
      --out workdir/code_samples

CoDe's recipe (spec 5.2) fine-tunes for a fraction of the pre-training (drafter 5% of the epochs at lr 1e-6,
refiner 25% at lr 1e-5 on ImageNet); at digits scale both default to a short run at a tenth of the VAR stage's
peak lr. The refiner's draft-token weight decays 1 -> 0 over `total_steps`.
"""

import ml_collections

from configs import digits_var

STAGES = ("code_drafter", "code_refiner")


def get_config(arg=None) -> ml_collections.ConfigDict:
  from configs import common

  arg = common.parse_arg(arg, stage="code_drafter", draft_steps=2, runlocal=False, steps=200, batch=64, depth=4,
                         width=128, ce_weight=1.0)
  if arg.stage not in STAGES:
    raise ValueError(f"configs/digits_code.py: stage={arg.stage!r} must be one of {STAGES}")
  c = digits_var.get_config(f"runlocal={arg.runlocal},steps={arg.steps},batch={arg.batch},depth={arg.depth},"
                            f"width={arg.width}")
  c.stage = arg.stage
  # exactly the fields the stage reads (var/stages/code.py CODE_FIELDS)
  c.code = ml_collections.ConfigDict(dict(draft_steps=arg.draft_steps))
  if arg.stage == "code_refiner":
    c.code.teacher_dir = ""  # model directory of the frozen large VAR
    c.code.ce_weight = arg.ce_weight
  c.optim.tblr = c.optim.tblr / 10
  c.optim.warmup_steps = 0 if arg.runlocal else 20
  c.progressive.pg = 0.0
  return c
