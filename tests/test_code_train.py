"""CoDe's fine-tuning losses (var/code_stage.py) against numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from var.stages import code as code_stage

PN = (1, 2, 3)  # 14 tokens: scale 0 = token 0, scale 1 = tokens 1..4, scale 2 = tokens 5..13


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_drafter_loss_ignores_the_scales_after_n():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(3, 14, 7)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 7, size=(3, 14)))
  grad = jax.grad(lambda lg: code_stage.drafter_loss(lg, targets, PN, draft_steps=2))(logits)
  assert (np.asarray(grad[:, 5:]) == 0).all()  # the late scale's logits get exactly zero gradient
  assert (np.abs(np.asarray(grad[:, :5])).sum(-1) > 1e-4).all()
  nll = -np.take_along_axis(_np_log_softmax(np.asarray(logits, np.float64)), np.asarray(targets)[..., None], -1)
  np.testing.assert_allclose(code_stage.drafter_loss(logits, targets, PN, 2), nll[:, :5].mean(), rtol=1e-6)
  # a forward truncated after the drafted scales gives the same loss
  np.testing.assert_allclose(code_stage.drafter_loss(logits[:, :5], targets[:, :5], PN, 2),
                             nll[:, :5].mean(), rtol=1e-6)
  for bad in (0, 4, 1.5):
    with pytest.raises(ValueError, match=f"draft_steps={bad} must be an integer in 1..3"):
      code_stage.drafter_token_weights(PN, bad)


def test_draft_weight_schedule():
  total = 101
  np.testing.assert_allclose([code_stage.draft_weight(s, total) for s in (0, 50, 100)], [1.0, 0.5, 0.0])
  w = [np.asarray(code_stage.refiner_token_weights(PN, 2, s, total)) for s in (0, 50, 100)]
  np.testing.assert_allclose(w[0], np.ones(14))  # every token
  np.testing.assert_allclose(w[1], [0.5] * 5 + [1.0] * 9)
  np.testing.assert_allclose(w[2], [0.0] * 5 + [1.0] * 9)  # only the refine tokens
  np.testing.assert_allclose(code_stage.draft_weight(jnp.int32(7), 1), 0.0)
  with pytest.raises(ValueError, match="the refiner draws no scale"):
    code_stage.refiner_token_weights(PN, 3, 0, total)


def test_refiner_kl_and_ce_match_numpy():
  rng = np.random.default_rng(1)
  s_logits = rng.normal(size=(2, 14, 5)).astype(np.float32)
  t_logits = 2 * rng.normal(size=(2, 14, 5)).astype(np.float32)
  targets = rng.integers(0, 5, size=(2, 14))
  weights = np.asarray(code_stage.refiner_token_weights(PN, 1, 3, 10))  # alpha = 2/3 on the first token
  out = code_stage.refiner_loss(jnp.asarray(s_logits), jnp.asarray(t_logits), jnp.asarray(targets),
                                jnp.asarray(weights), ce_weight=0.3)
  ls, lt = _np_log_softmax(s_logits.astype(np.float64)), _np_log_softmax(t_logits.astype(np.float64))
  kl_tok = (np.exp(lt) * (lt - ls)).sum(-1)  # (2, 14)
  nll = -np.take_along_axis(ls, targets[..., None], -1)[..., 0]
  kl = ((kl_tok * weights).sum(-1) / weights.sum()).mean()
  ce = ((nll * weights).sum(-1) / weights.sum()).mean()
  np.testing.assert_allclose(out["kl"], kl, rtol=1e-5)
  np.testing.assert_allclose(out["ce"], ce, rtol=1e-5)
  np.testing.assert_allclose(out["loss"], kl + 0.3 * ce, rtol=1e-5)
  # KL of a distribution to itself is 0; the teacher gets no gradient
  np.testing.assert_allclose(code_stage.kl_per_token(jnp.asarray(t_logits), jnp.asarray(t_logits)), 0, atol=1e-6)
  g_teacher = jax.grad(lambda t: code_stage.refiner_loss(jnp.asarray(s_logits), t, jnp.asarray(targets),
                                                         jnp.asarray(weights))["loss"])(jnp.asarray(t_logits))
  assert (np.asarray(g_teacher) == 0).all()


# ----------------------------------------------------------------------------------------------------------------
# The fine-tuning stages end to end: kill-and-resume equals an uninterrupted run

@pytest.fixture(scope="module")
def stage_dirs(tmp_path_factory):
  import pathlib

  import train_testlib as tl

  from var import pretrained
  from var.digits_builder import prepare

  root = tmp_path_factory.mktemp("code_stages")
  data_dir = prepare(root / "tfds")
  tok_dir = tl.write_tokenizer_dir(root / "tok")
  vae, vae_config = pretrained.load_tokenizer(tok_dir)
  from var import model as var_model

  teacher = var_model.build(var_model.VARConfig(depth=3, width=64, num_heads=4, vocab_size=64, z_channels=8,
                                                patch_nums=(1, 2, 3, 4), num_classes=10, init_adaln_gamma=0.1),
                            seed=7)
  teacher_dir = pretrained.save_pretrained(root / "teacher", tokenizer=vae, tokenizer_config=vae_config,
                                           var=teacher, var_config=teacher.config)
  return pathlib.Path(data_dir), tok_dir, pathlib.Path(teacher_dir), root


def _stage_config(name, dirs, **overrides):
  """The tiny config of stage `name` (overrides may change config.stage afterwards)."""
  from configs import digits_code

  data_dir, tok_dir, teacher_dir, _ = dirs
  c = digits_code.get_config(f"stage={name},draft_steps=2,runlocal")
  c.input.data_dir, c.input.resolution, c.tokenizer_dir = str(data_dir), 8, str(tok_dir)
  if name == "code_refiner":
    c.code.teacher_dir = str(teacher_dir)
  # the drafter fine-tunes the large model (the teacher's architecture), the refiner a smaller one
  c.model.update(dict(depth=3 if name == "code_drafter" else 2, width=64, num_heads=4,
                      drop_path_rate=0.1))
  c.ckpt.async_save = False
  c.update_from_flattened_dict({"total_steps": 4, "log_every_steps": 1, "ckpt.every_steps": 2, "eval_batches": 1,
                                "mesh": (2, 2, 2), **overrides})
  return c


@pytest.mark.parametrize("stage", ["code_drafter", "code_refiner"])
def test_stage_kill_and_resume_equals_uninterrupted_run(stage_dirs, stage, fast_compile):
  import orbax.checkpoint as ocp
  import train_testlib as tl
  from flax import nnx

  from var import code, pretrained, train_lib

  root, teacher_dir = stage_dirs[-1] / stage, stage_dirs[2]
  config = _stage_config(stage, stage_dirs)
  # the drafter fine-tunes the large model; the refiner starts from scratch here
  init = str(teacher_dir) if stage == "code_drafter" else None
  full = train_lib.train_and_evaluate(config, root / "full", init_from=init)
  part = train_lib.train_and_evaluate(config, root / "resumed", init_from=init, stop_after=2)
  assert part["step"] == 2
  rest = train_lib.train_and_evaluate(config, root / "resumed", init_from=init)
  assert rest["step"] == 4

  def state(run):
    return ocp.StandardCheckpointer().restore((root / run / "ckpt" / "4" / "state").absolute())

  assert tl.max_abs_diff(state("full"), state("resumed")) <= 1e-6
  logs = {run: {r["step"]: r for r in train_lib.read_metrics(root / run) if r["split"] == "train"}
          for run in ("full", "resumed")}
  for step in (3, 4):
    assert abs(logs["full"][step]["loss"] - logs["resumed"][step]["loss"]) <= 1e-6
  assert logs["full"][1]["loss"] != logs["full"][2]["loss"]
  assert abs(full["eval"]["loss"] - rest["eval"]["loss"]) <= 1e-6
  if stage == "code_refiner":  # the draft-token weight at the first and the last of 4 steps; the teacher is not saved
    assert (logs["full"][1]["draft_weight"], logs["full"][4]["draft_weight"]) == (1.0, 0.0)
    assert logs["full"][1]["kl"] > 0
    assert "teacher" not in state("full")
  # the export is a VAR model directory holding the trained student, and sample.py's CoDe pair loads it
  exported, _ = pretrained.load_var(rest["model_dir"])
  assert tl.max_abs_diff(nnx.to_pure_dict(nnx.state(exported, nnx.Param)), state("full")["model"]) == 0.0
  if stage == "code_drafter":
    teacher, _ = pretrained.load_var(teacher_dir)  # fine-tuning moved the large model's weights
    assert tl.max_abs_diff(nnx.to_pure_dict(nnx.state(teacher, nnx.Param)), state("full")["model"]) > 0
  drafter_dir, refiner_dir = (rest["model_dir"], teacher_dir) if stage == "code_drafter" else (
      teacher_dir, rest["model_dir"])
  code.load_pair(drafter_dir, refiner_dir)


def test_stage_config_errors(stage_dirs, tmp_path):
  import train_testlib as tl

  from configs import digits_code
  from var import sharding as shd
  from var import train_lib

  def fails(exc, match, config):
    with pytest.raises(exc, match=match):
      train_lib.validate_config(config)

  fails(ValueError, r"config.stage='code_student' is not a training stage; use one of \('tokenizer', 'var', "
        r"'code_drafter', 'code_refiner'\)", _stage_config("code_drafter", stage_dirs, stage="code_student"))
  with pytest.raises(ValueError, match="stage='refiner' must be one of"):
    digits_code.get_config("stage=refiner")
  fails(FileNotFoundError, "config.code.teacher_dir='' is not a model directory.*set --config.code.teacher_dir",
        _stage_config("code_refiner", stage_dirs, **{"code.teacher_dir": ""}))
  # patch_nums (1, 2, 3, 4): the drafter draws 1..4 scales, the refiner starts at 0..3
  for stage, bad, ok in (("code_drafter", 0, "1..4"), ("code_drafter", 5, "1..4"), ("code_refiner", 4, "0..3")):
    fails(ValueError, rf"config.code.draft_steps={bad} is out of range for the 4-scale patch_nums \(1, 2, 3, 4\): "
          rf"the {stage} stage needs an integer in {ok}", _stage_config(stage, stage_dirs, **{"code.draft_steps": bad}))
  drafter = _stage_config("code_drafter", stage_dirs)
  drafter.code.teacher_dir = str(stage_dirs[2])  # the drafter has no teacher: a field it would ignore
  fails(ValueError, r"config.code has fields \['draft_steps', 'teacher_dir'\] but stage 'code_drafter' reads exactly "
        r"\['draft_steps'\]", drafter)
  fails(ValueError, "config.code is CoDe's fine-tuning block but config.stage='var'",
        _stage_config("code_drafter", stage_dirs, stage="var"))
  fails(ValueError, "config.progressive.pg=0.5 must be 0", _stage_config("code_drafter", stage_dirs,
                                                                          **{"progressive.pg": 0.5}))
  other = tl.write_tokenizer_dir(tmp_path / "other_tok", seed=3)  # same config, other weights
  with pytest.raises(ValueError, match="same tokenizer config but different tokenizer weights"):
    code_stage.load_teacher(_stage_config("code_refiner", stage_dirs, tokenizer_dir=str(other)),
                            shd.make_mesh((8, 1, 1)))
