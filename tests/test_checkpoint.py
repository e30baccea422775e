"""Checkpoints: kill-and-resume equals an uninterrupted run, restore onto another mesh shape, and clear errors
(never overwriting) for corrupt or mismatched checkpoints."""

import dataclasses
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import train_testlib as tl
from flax import nnx

from var import data, train_lib
from var import sharding as shd
from var.checkpoint import Checkpointer, CheckpointError
from var.digits_builder import prepare


@pytest.fixture(autouse=True, scope="module")
def fast_compiles():
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", False)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("ckpt")
  data_dir = prepare(root / "tfds")
  tok_dir = tl.write_tokenizer_dir(root / "tok")
  return pathlib.Path(data_dir), tok_dir, root


def _config(data_dir, tok_dir, **overrides):
  """One tiny VAR config for every test here (same graph, so the jitted init / steps are compiled once)."""
  return tl.var_config(data_dir, tok_dir, **{"total_steps": 4, "log_every_steps": 1, "ckpt.every_steps": 2,
                                             "eval_batches": 1, "mesh": (2, 2, 2), **overrides})


def _state_at(workdir: pathlib.Path, step: int) -> dict:
  return ocp.StandardCheckpointer().restore((workdir / "ckpt" / str(step) / "state").absolute())


def _train_losses(workdir: pathlib.Path) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in train_lib.read_metrics(workdir) if r["split"] == "train"}


def test_kill_and_resume_equals_uninterrupted_run(dirs):
  data_dir, tok_dir, root = dirs
  # class dropout and drop path are on: the resumed run must draw the same randomness as well as the same data
  config = _config(data_dir, tok_dir)
  sampled = config.copy_and_resolve_references()
  sampled.sample_every_steps = 4  # the uninterrupted run also writes a sample grid (var/sampler.py) at step 4
  full = train_lib.train_and_evaluate(sampled, root / "full")
  assert (root / "full" / "samples" / "step_0000004.png").is_file()
  part = train_lib.train_and_evaluate(config, root / "resumed", stop_after=2)  # "killed" after 2 steps
  assert part["step"] == 2 and "eval" not in part
  assert sorted(Checkpointer(root / "resumed" / "ckpt").all_steps()) == [2]
  rest = train_lib.train_and_evaluate(config, root / "resumed")  # the same command again: resumes at step 2
  assert rest["step"] == 4
  a, b = _state_at(root / "full", 4), _state_at(root / "resumed", 4)
  assert tl.max_abs_diff(a, b) <= 1e-6
  assert tl.max_abs_diff(_state_at(root / "full", 2), _state_at(root / "resumed", 2)) <= 1e-6
  la, lb = _train_losses(root / "full"), _train_losses(root / "resumed")
  assert sorted(lb) == [1, 2, 3, 4]
  for step in (3, 4):  # same batches and same class-dropout draws after the restart
    assert abs(la[step] - lb[step]) <= 1e-6, (step, la[step], lb[step])
  assert la[1] != la[2]  # the losses do change from step to step (the comparison is not vacuous)
  assert abs(full["eval"]["loss"] - rest["eval"]["loss"]) <= 1e-6
  assert (root / "resumed" / "model" / "config.json").is_file()


def test_save_on_one_mesh_restore_on_another(dirs):
  data_dir, tok_dir, root = dirs
  config = _config(data_dir, tok_dir, mesh=(4, 2, 1))
  tok_config = train_lib.load_tokenizer_config(config)
  mesh_a = shd.make_mesh((4, 2, 1))
  setup_a = train_lib.make_setup(config, mesh_a, tok_config=tok_config)
  it = data.make_train_iterator(config.input, seed=0)
  next(it)
  # make the saved values distinctive (not the seed's init, which the target would reproduce anyway)
  bumped = jax.tree.map(lambda x: x + 0.5 if x.dtype == np.float32 else x,
                        nnx.to_pure_dict(setup_a.state["model"]))
  state_a = train_lib._trainable(setup_a.state, setup_a.frozen)
  state_a["model"] = bumped
  ckpt = Checkpointer(root / "mesh" / "ckpt", async_save=False)
  ckpt.save(1, state_a, config=config.to_dict(), data_iterator=it)
  expected_next = next(it)

  mesh_b = shd.make_mesh((2, 2, 2))
  setup_b = train_lib.make_setup(config, mesh_b, tok_config=tok_config)
  it_b = data.make_train_iterator(config.input, seed=0)
  config.mesh = (2, 2, 2)
  train_lib.restore_checkpoint(setup_b, ckpt, 1, it_b, config)
  qkv = setup_b.state["model"]["blocks"]["attn"]["mat_qkv"]["kernel"][...]
  assert qkv.sharding.mesh.shape == mesh_b.shape
  assert qkv.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert tl.max_abs_diff(bumped, nnx.to_pure_dict(setup_b.state["model"])) == 0.0
  # the data position came back too
  np.testing.assert_array_equal(next(it_b)["image"], expected_next["image"])
  ckpt.close()


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
