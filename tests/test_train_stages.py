"""The tokenizer stage end to end (train, held-out PSNR, export, resume) feeding the VAR stage, whose frozen
tokenizer never changes; and non-finite losses: stop without saving the bad state, or skip the step."""

import pathlib

import jax
import numpy as np
import pytest
import train_testlib as tl
from flax import nnx

from var import sharding as shd
from var import train_lib
from var.checkpoint import Checkpointer
from var.digits_builder import prepare
from var.pretrained import load_tokenizer, load_var

pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return pathlib.Path(prepare(tmp_path_factory.mktemp("stages") / "tfds"))


def _tok_config(data_dir, **overrides):
  # the same graph for every test here (only loop fields differ), so the steps compile once
  return tl.tokenizer_config(data_dir, **{"total_steps": 4, "log_every_steps": 1, "ckpt.every_steps": 2,
                                          "ckpt.max_to_keep": 4, "ckpt.async_save": True,
                                          "eval_batches": 1, **overrides})


def _state_at(workdir: pathlib.Path, step: int) -> dict:
  return tl.restore_arrays(workdir / "ckpt" / str(step) / "state")


@pytest.fixture(scope="module")
def tokenizer_run(data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("tok_full")
  return workdir, train_lib.train_and_evaluate(_tok_config(data_dir), workdir)


def _nan_at(monkeypatch, step: int):
  """The `step`-th training batch (1-based) gets NaN images, as a corrupt record would."""
  shard_batch, count = shd.shard_batch, [0]

  def poisoned(batch, mesh, *args, **kwargs):
    if "mask" not in batch:
      count[0] += 1
      if count[0] == step:
        batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
    return shard_batch(batch, mesh, *args, **kwargs)

  monkeypatch.setattr(shd, "shard_batch", poisoned)


def test_tokenizer_stage_end_to_end_then_var_stage_on_its_export(data_dir, tokenizer_run, tmp_path):
  full, result = tokenizer_run
  assert result["step"] == 4
  psnr = result["eval"]["psnr"]  # held-out PSNR through the tokens
  assert 5.0 < psnr < 60.0, result["eval"]
  assert 0 < result["eval"]["codes_used"] <= 1

  # stop after 2 (checkpoint), resume with the same command: equals the uninterrupted run
  resumed = tmp_path / "tok_resumed"
  assert train_lib.train_and_evaluate(_tok_config(data_dir), resumed, stop_after=2)["step"] == 2
  again = train_lib.train_and_evaluate(_tok_config(data_dir), resumed)
  assert again["step"] == 4
  assert tl.max_abs_diff(_state_at(full, 4), _state_at(resumed, 4)) <= 1e-6
  assert abs(again["eval"]["psnr"] - psnr) <= 1e-4

  # the export is the trained model
  tok, tok_cfg = load_tokenizer(result["model_dir"])
  exported = nnx.to_pure_dict(nnx.state(tok, nnx.Param))
  assert tl.max_abs_diff(exported, _state_at(full, 4)["model"]) == 0.0
  assert tok_cfg.vocab_size == 64

  # the VAR stage trains on that export; its frozen tokenizer gets no update (bit-identical after 2 steps)
  var_config = tl.var_config(data_dir, result["model_dir"], total_steps=2, log_every_steps=1, eval_batches=1,
                             **{"ckpt.every_steps": 2})
  var_result = train_lib.train_and_evaluate(var_config, tmp_path / "var")
  assert var_result["step"] == 2 and np.isfinite(var_result["eval"]["loss"])
  var, _ = load_var(var_result["model_dir"])
  frozen, _ = load_tokenizer(var_result["model_dir"])
  after = nnx.to_pure_dict(nnx.state(frozen, nnx.Param))
  jax.tree.map(np.testing.assert_array_equal, after, exported)
  assert tl.max_abs_diff(nnx.to_pure_dict(nnx.state(var, nnx.Param)),
                         _state_at(tmp_path / "var", 2)["model"]) == 0.0


def test_non_finite_loss_stops_without_saving_and_the_last_checkpoint_resumes(data_dir, tokenizer_run,
                                                                              tmp_path, monkeypatch):
  full, _ = tokenizer_run
  workdir = tmp_path / "nan"
  _nan_at(monkeypatch, 3)
  config = _tok_config(data_dir, log_every_steps=4)  # step 3 is neither logged nor saved: still caught
  with pytest.raises(FloatingPointError, match=r"step 3: non-finite training loss \(nan\).*ckpt/2\)"):
    train_lib.train_and_evaluate(config, workdir)
  assert Checkpointer(workdir / "ckpt").all_steps() == [2]  # no checkpoint of the bad state
  monkeypatch.undo()
  # the last good checkpoint restores, and the run continues exactly like the uninterrupted one
  assert train_lib.train_and_evaluate(config, workdir)["step"] == 4
  assert tl.max_abs_diff(_state_at(full, 4), _state_at(workdir, 4)) <= 1e-6


def test_skip_non_finite_steps_when_configured(data_dir, tmp_path, monkeypatch):
  workdir = tmp_path / "skip"
  _nan_at(monkeypatch, 3)
  result = train_lib.train_and_evaluate(_tok_config(data_dir, skip_nonfinite=True, **{"ckpt.every_steps": 1}),
                                        workdir)
  assert result["step"] == 4 and np.isfinite(result["train"]["loss"])
  assert result["train"]["skipped_nonfinite"] == 1
  s2, s3 = tl.flat_state(_state_at(workdir, 2)), tl.flat_state(_state_at(workdir, 3))
  floats = [k for k in s2 if np.issubdtype(s2[k].dtype, np.floating)]
  assert all(np.array_equal(s2[k], s3[k]) for k in floats)  # step 3 changed no parameter or statistic
  assert int(s3["['opt']['step']"]) == 3  # but the step counter moved on (data and schedules stay aligned)
  s4 = tl.flat_state(_state_at(workdir, 4))
  assert max(float(np.max(np.abs(s4[k] - s3[k]))) for k in floats) > 1e-4  # step 4 trained again
