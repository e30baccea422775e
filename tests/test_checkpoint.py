"""Checkpoints: kill-and-resume equals an uninterrupted run, restore onto another mesh shape, and clear errors
(never overwriting) for corrupt or mismatched checkpoints."""

import dataclasses
import json
import logging
import pathlib
import signal

import jax
import multihost_testlib as mh
import numpy as np
import pytest
import train_testlib as tl
from flax import nnx

from var import data, train_lib
from var import sharding as shd
from var.checkpoint import Checkpointer, CheckpointError
from var.digits_builder import prepare

pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("ckpt")
  data_dir = prepare(root / "tfds")
  tok_dir = tl.write_tokenizer_dir(root / "tok")
  return pathlib.Path(data_dir), tok_dir, root


def _config(data_dir, tok_dir, **overrides):
  """One tiny VAR config for every test here (same graph, so the jitted init / steps are compiled once).
  Checkpoints are asynchronous, the default."""
  return tl.var_config(data_dir, tok_dir, **{"total_steps": 6, "log_every_steps": 1, "ckpt.every_steps": 2,
                                             "ckpt.max_to_keep": 3, "ckpt.async_save": True,
                                             "eval_batches": 1, "mesh": (2, 2, 2), **overrides})


def _state_at(workdir: pathlib.Path, step: int) -> dict:
  return tl.restore_arrays(workdir / "ckpt" / str(step) / "state")


def _train_losses(workdir: pathlib.Path) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in train_lib.read_metrics(workdir) if r["split"] == "train"}


@pytest.fixture(scope="module")
def uninterrupted(dirs):
  """6 steps in one go (class dropout and drop path on: a resumed run must also draw the same randomness)."""
  data_dir, tok_dir, root = dirs
  config = _config(data_dir, tok_dir, sample_every_steps=6)  # also writes a sample grid (var/sampler.py)
  result = train_lib.train_and_evaluate(config, root / "full")
  assert (root / "full" / "samples" / "step_0000006.png").is_file()
  return root / "full", result


@pytest.mark.parametrize("when", ["between", "saving"])
def test_hard_kill_and_restart_equals_uninterrupted_run(dirs, uninterrupted, when, caplog):
  """SIGKILL (a) during step 5, after checkpoint 4 committed, or (b) while checkpoint 4 is being written
  asynchronously; the same command again resumes from the last complete checkpoint and replays the lost
  steps with the same data and randomness."""
  data_dir, tok_dir, root = dirs
  full, full_result = uninterrupted
  config = _config(data_dir, tok_dir)
  workdir = root / f"killed_{when}"
  kill_step = 5 if when == "between" else 4
  spec = dict(stage="var", data_dir=str(data_dir), tokenizer_dir=str(tok_dir), workdir=str(workdir),
              out=str(root / f"killed_{when}_out"), distributed=False, kill={"when": when, "step": kill_step},
              overrides={"total_steps": 6, "log_every_steps": 1, "ckpt.every_steps": 2, "ckpt.max_to_keep": 3,
                         "ckpt.async_save": True, "eval_batches": 1, "mesh": [2, 2, 2]})
  spec_path = root / f"killed_{when}.json"
  spec_path.write_text(json.dumps(spec))
  run = mh.run_single(["tests/multihost_worker.py", "train", str(spec_path)], root / f"killed_{when}.log",
                      local_devices=8, timeout=400, extra_env={"JAX_DISABLE_MOST_OPTIMIZATIONS": "true"})
  assert run.returncode == -signal.SIGKILL, run.log[-3000:]
  names = sorted(p.name for p in (workdir / "ckpt").iterdir())
  if when == "between":
    assert [n for n in names if n.isdigit()] == ["2", "4"], names
  else:  # step 4 was cut off mid-write: only its temporary directory exists, step 2 is the last complete one
    assert [n for n in names if n.isdigit()] == ["2"], names
    assert any(n.startswith("4.orbax-checkpoint-tmp") for n in names), names
  last = 4 if when == "between" else 2

  caplog.set_level(logging.INFO)
  rest = train_lib.train_and_evaluate(config, workdir)  # the same command again
  assert f"resumed from {workdir / 'ckpt' / str(last)}" in caplog.text
  assert rest["step"] == 6
  assert sorted(Checkpointer(workdir / "ckpt").all_steps()) == [2, 4, 6]
  err = tl.max_abs_diff(_state_at(full, 6), _state_at(workdir, 6))
  print(f"hard kill ({when}) + restart vs uninterrupted: state {err:.2e}")
  assert err <= 1e-6
  la, lb = _train_losses(full), _train_losses(workdir)
  # metrics.jsonl holds the killed run's steps and the replayed ones; the last record of a step wins
  for step in range(last + 1, 7):  # the replayed steps saw the same batches and class-dropout draws
    assert abs(la[step] - lb[step]) <= 1e-6, (step, la[step], lb[step])
  assert la[1] != la[2]  # the losses do change from step to step (the comparison is not vacuous)
  assert abs(full_result["eval"]["loss"] - rest["eval"]["loss"]) <= 1e-6
  assert (workdir / "model" / "config.json").is_file()


def test_clean_stop_and_resume_equals_uninterrupted_run(dirs, uninterrupted):
  data_dir, tok_dir, root = dirs
  full, _ = uninterrupted
  config = _config(data_dir, tok_dir)
  part = train_lib.train_and_evaluate(config, root / "resumed", stop_after=3)  # stops with a checkpoint at 3
  assert part["step"] == 3 and "eval" not in part
  assert sorted(Checkpointer(root / "resumed" / "ckpt").all_steps()) == [2, 3]
  assert train_lib.train_and_evaluate(config, root / "resumed")["step"] == 6
  assert tl.max_abs_diff(_state_at(full, 6), _state_at(root / "resumed", 6)) <= 1e-6


def test_trained_state_restores_onto_another_mesh(dirs, uninterrupted):
  """Model AND optimizer state (Adam moments, step counts) after 6 real steps, saved on (2, 2, 2), come back
  exactly onto (4, 2, 1) with that mesh's shardings; the data position comes back too."""
  data_dir, tok_dir, root = dirs
  full, _ = uninterrupted
  config = _config(data_dir, tok_dir, mesh=(4, 2, 1))
  saved = _state_at(full, 6)
  mesh_b = shd.make_mesh((4, 2, 1))
  setup = train_lib.make_setup(config, mesh_b, tok_config=train_lib.load_tokenizer_config(config))
  fresh = jax.device_get(train_lib._trainable(setup.state, setup.frozen))
  it = data.make_train_iterator(config.input, seed=0)
  ckpt = Checkpointer(full / "ckpt")
  train_lib.restore_checkpoint(setup, ckpt, 6, it, config)
  ckpt.close()
  got = train_lib._trainable(setup.state, setup.frozen)
  assert tl.max_abs_diff(saved, jax.device_get(got)) == 0.0
  assert tl.max_abs_diff(fresh["opt"], saved["opt"]) > 1e-6  # the moments are trained ones, not a fresh state
  assert int(got["opt"]["step"]) == 6
  counts = [int(v) for k, v in tl.flat_state(got["opt"]).items() if k.endswith("['count']")]
  assert counts and set(counts) == {6}, counts  # optax's Adam and schedule counters
  leaves = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(got["opt"])}
  moments = {k: v for k, v in leaves.items() if "['blocks']['attn']['mat_qkv']['kernel']" in k}
  assert len(moments) == 2 and all(any(f"['{m}']" in k for k in moments) for m in ("mu", "nu")), moments
  for qkv in moments.values():
    assert qkv.sharding.mesh.shape == mesh_b.shape
    assert qkv.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert qkv.addressable_shards[0].data.shape[1:] == (qkv.shape[1] // 2, qkv.shape[2])  # fsdp = 2 here
  assert setup.state["model"]["blocks"]["attn"]["mat_qkv"]["kernel"][...].sharding.spec == (
      jax.sharding.PartitionSpec(None, "fsdp", "tensor"))
  # the data position came back: the next batch is the 7th of a fresh iterator
  ref = data.make_train_iterator(config.input, seed=0)
  for _ in range(6):
    next(ref)
  np.testing.assert_array_equal(next(it)["image"], next(ref)["image"])


def _make_checkpoint(root, config, name):
  tok_config = train_lib.load_tokenizer_config(config)
  setup = train_lib.make_setup(config, shd.make_mesh(tuple(config.mesh)), tok_config=tok_config)
  ckpt = Checkpointer(root / name / "ckpt", async_save=False)
  ckpt.save(2, train_lib._trainable(setup.state, setup.frozen), config=config.to_dict(),
            data_iterator=data.make_train_iterator(config.input, seed=0))
  ckpt.close()
  return root / name / "ckpt" / "2"


def _snapshot(path: pathlib.Path) -> dict:
  return {p: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_corrupt_checkpoint_is_named_and_left_untouched(dirs):
  data_dir, tok_dir, root = dirs
  config = _config(data_dir, tok_dir)
  step_dir = _make_checkpoint(root, config, "corrupt")
  victims = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.stat().st_size > 64]
  for p in victims:  # garble every array/metadata file of the state item
    p.write_bytes(b"\x00garbage" * 8)
  before = _snapshot(step_dir)
  with pytest.raises(CheckpointError, match=str(step_dir / "state")):
    train_lib.train_and_evaluate(config, root / "corrupt")
  assert _snapshot(step_dir) == before


def test_checkpoint_from_a_different_config_is_refused_before_work(dirs):
  data_dir, tok_dir, root = dirs
  step_dir = _make_checkpoint(root, _config(data_dir, tok_dir), "mismatch")
  before = _snapshot(step_dir)
  other = _config(data_dir, tok_dir, **{"model.width": 128})
  with pytest.raises(CheckpointError, match=r"model\.width: checkpoint 64 vs now 128") as e:
    train_lib.train_and_evaluate(other, root / "mismatch")
  assert str(step_dir / "config") in str(e.value)
  assert _snapshot(step_dir) == before


def test_init_from_a_model_directory(dirs):
  """--init_from copies a model directory's parameters into a fresh run (fine-tuning); a different
  architecture is refused with the differing parameters named."""
  from var.model import VAR
  from var.pretrained import load_tokenizer, save_pretrained

  data_dir, tok_dir, root = dirs
  config = _config(data_dir, tok_dir)
  tok_config = train_lib.load_tokenizer_config(config)
  setup = train_lib.make_setup(config, shd.make_mesh((2, 2, 2)), tok_config=tok_config)
  var_config = train_lib.var_config_from(config, tok_config)
  with nnx.use_eager_sharding(False):
    donor = VAR(var_config, rngs=nnx.Rngs(123))  # different seed: different weights than the fresh run
  tok, tok_cfg = load_tokenizer(tok_dir)
  save_pretrained(root / "donor", tokenizer=tok, tokenizer_config=tok_cfg, var=donor, var_config=var_config)
  train_lib.init_from_pretrained(setup, config, root / "donor")
  donor_params = nnx.to_pure_dict(nnx.state(donor, nnx.Param))
  assert tl.max_abs_diff(donor_params, nnx.to_pure_dict(setup.state["model"])) == 0
  head = setup.state["model"]["head"]["kernel"][...]
  assert head.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")

  wide_config = dataclasses.replace(var_config, width=128)
  with nnx.use_eager_sharding(False):
    wide = VAR(wide_config, rngs=nnx.Rngs(0))
  save_pretrained(root / "wide", tokenizer=tok, tokenizer_config=tok_cfg, var=wide, var_config=wide_config)
  with pytest.raises(ValueError, match=r"does not match the configured one.*\['blocks'\]\['ada_lin'\]"):
    train_lib.init_from_pretrained(setup, config, root / "wide")
