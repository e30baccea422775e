"""Real multi-process runs on 127.0.0.1: two processes of one jax.distributed job (4 CPU devices each, gloo
collectives) train on one 8-device (2, 2, 2) mesh and equal a single-process 8-device run fed the same global
batches; checkpoints move between the 2-process and the 1-process world onto other meshes."""

import json
import pathlib

import jax
import multihost_testlib as mh
import numpy as np
import pytest
import train_testlib as tl
from flax import nnx

from var import data, train_lib
from var import sharding as shd
from var.checkpoint import Checkpointer
from var.digits_builder import prepare

pytestmark = [pytest.mark.multiprocess, pytest.mark.usefixtures("fast_compile")]

TIMEOUT = 480  # seconds for one 2-process job; about a minute on an idle 2-core machine
CHILD_ENV = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "true"}  # what the in-process runs use (fast compiles)




@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multiprocess")
  data_dir = prepare(root / "tfds")  # prepared once; both processes read the same files
  tok_dir = tl.write_tokenizer_dir(root / "tok")
  return pathlib.Path(data_dir), tok_dir, root


MAKE_TRAIN_ITERATOR = data.make_train_iterator  # the real one (the reference run patches the module)


class UnionIterator:
  """The global batches of a P-process run, in one process: process i's iterator (its own shard and seed)
  gives rows [i * b, (i + 1) * b) of every batch, as jax.make_array_from_process_local_data lays them out."""

  def __init__(self, cfg, seed, num_processes):
    self.its = [MAKE_TRAIN_ITERATOR(cfg, seed=seed, process_index=i, process_count=num_processes)
                for i in range(num_processes)]

  def __next__(self):
    parts = [next(it) for it in self.its]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self) -> bytes:  # grain's checkpoint handler stores bytes for non-grain iterators
    return json.dumps([it.get_state() for it in self.its]).encode()

  def set_state(self, state: bytes):
    for it, s in zip(self.its, json.loads(state), strict=True):
      it.set_state(s)


def _reference_run(monkeypatch, config, workdir):
  """train_and_evaluate in this (8-device) process, reading the global batches of the 2-process run."""
  monkeypatch.setattr(data, "make_train_iterator", lambda cfg, *, seed: UnionIterator(cfg, seed, 2))
  try:
    return train_lib.train_and_evaluate(config, workdir)
  finally:
    monkeypatch.undo()


def _launch(root, name, spec):
  spec_path = root / f"{name}.json"
  spec_path.write_text(json.dumps(spec))
  return mh.launch(["tests/multihost_worker.py", "train", str(spec_path)], root / f"{name}_logs",
                   timeout=TIMEOUT, extra_env=CHILD_ENV)


def _state_at(workdir: pathlib.Path, step: int) -> dict:
  return tl.restore_arrays(workdir / "ckpt" / str(step) / "state")


def _check_shards(out, config, steps):
  """Each process read only its own shard: its batches are what its own iterator gives, they differ from
  the other process's, and side by side they are the global batch."""
  seen = [np.load(out / f"batches_{i}.npz") for i in range(2)]
  per_host = config.input.batch_size // 2
  for i, s in enumerate(seen):
    assert s["image"].shape == (steps, per_host, 8, 8, 3)
    it = data.make_train_iterator(config.input, seed=config.seed, process_index=i, process_count=2)
    for step in range(steps):
      np.testing.assert_array_equal(s["image"][step], next(it)["image"])
  assert not np.array_equal(seen[0]["image"], seen[1]["image"])
  union = UnionIterator(config.input, config.seed, 2)
  for step in range(steps):
    np.testing.assert_array_equal(np.concatenate([seen[0]["label"][step], seen[1]["label"][step]]),
                                  next(union)["label"])


def _losses(workdir):
  return {r["step"]: r["loss"] for r in train_lib.read_metrics(workdir) if r["split"] == "train"}


def test_var_stage_two_processes_equal_one_process_and_checkpoints_cross(dirs, monkeypatch):
  data_dir, tok_dir, root = dirs
  # eval_batches=0: the whole held-out split, which both runs see in full (a batch limit would take the first
  # batches of each host's shard, i.e. other images than one process's first batches)
  overrides = {"total_steps": 4, "log_every_steps": 1, "ckpt.every_steps": 2, "eval_batches": 0,
               "mesh": (2, 2, 2), "ckpt.async_save": True}
  config = tl.var_config(data_dir, tok_dir, **overrides)
  ref = _reference_run(monkeypatch, config, root / "var_one")

  # The 2-process job trains, then restores the single-process checkpoint onto its (4, 2, 1) mesh.
  spec = dict(stage="var", data_dir=str(data_dir), tokenizer_dir=str(tok_dir), workdir=str(root / "var_two"),
              out=str(root / "var_two_out"), overrides={k: list(v) if isinstance(v, tuple) else v
                                                          for k, v in overrides.items()},
              restore=dict(ckpt=str(root / "var_one" / "ckpt"), step=4, mesh=[4, 2, 1]))
  _launch(root, "var_two", spec)
  out = pathlib.Path(spec["out"])
  _check_shards(out, config, steps=4)

  one, two = _state_at(root / "var_one", 4), _state_at(root / "var_two", 4)
  err_model = tl.max_abs_diff(one["model"], two["model"])
  err_opt = tl.max_abs_diff(one["opt"], two["opt"])
  print(f"2 processes vs 1: params {err_model:.2e}, optimizer state {err_opt:.2e}")
  assert err_model <= 1e-5 and err_opt <= 1e-5
  # steps 3-4 move the parameters by more than the tolerance: the equality above is not vacuous
  assert tl.max_abs_diff(one["model"], _state_at(root / "var_one", 2)["model"]) > 1e-5
  l1, l2 = _losses(root / "var_one"), _losses(root / "var_two")
  assert sorted(l2) == [1, 2, 3, 4]
  for step in l1:
    assert abs(l1[step] - l2[step]) <= 1e-5, (step, l1[step], l2[step])
  result = json.loads((out / "result.json").read_text())
  print(f"held-out loss, 2 processes vs 1: {abs(result['eval']['loss'] - ref['eval']['loss']):.2e}")
  assert abs(result["eval"]["loss"] - ref["eval"]["loss"]) <= 1e-5
  # the 2-process export is a complete model directory that loads in one process
  from var.pretrained import load_var
  var, _ = load_var(root / "var_two" / "model")
  assert tl.max_abs_diff(nnx.to_pure_dict(nnx.state(var, nnx.Param)), two["model"]) == 0.0

  # 1-process checkpoint -> the 2-process job's (4, 2, 1) mesh: every value, sharded over both processes
  restored = dict(np.load(out / "restored.npz"))
  want = tl.flat_state(_state_at(root / "var_one", 4))
  assert len(restored) == len(want)
  assert tl.max_abs_diff(restored, want) == 0.0  # (the npz keys are key paths: compared by name)
  specs = json.loads((out / "specs.json").read_text())
  assert specs["['model']['blocks']['attn']['mat_qkv']['kernel']"] == str(
      jax.sharding.PartitionSpec(None, "fsdp", "tensor"))

  # 2-process checkpoint -> this process on a (2, 4, 1) mesh: values and shardings
  config_b = tl.var_config(data_dir, tok_dir, **{**overrides, "mesh": (2, 4, 1)})
  mesh_b = shd.make_mesh((2, 4, 1))
  setup = train_lib.make_setup(config_b, mesh_b, tok_config=train_lib.load_tokenizer_config(config_b))
  ckpt = Checkpointer(root / "var_two" / "ckpt")
  train_lib.restore_checkpoint(setup, ckpt, 4, None, config_b)
  ckpt.close()
  got = train_lib._trainable(setup.state, setup.frozen)
  assert tl.max_abs_diff(got["model"], two["model"]) == 0.0
  assert tl.max_abs_diff(got["opt"], two["opt"]) == 0.0
  qkv = got["model"]["blocks"]["attn"]["mat_qkv"]["kernel"]
  assert qkv.sharding.mesh.shape == mesh_b.shape and qkv.sharding.spec[1] == "fsdp"


def test_tokenizer_stage_two_processes_equal_one_process(dirs, monkeypatch):
  data_dir, _, root = dirs
  overrides = {"total_steps": 2, "log_every_steps": 1, "ckpt.every_steps": 2, "eval_batches": 1,
               "mesh": (2, 2, 2), "ckpt.async_save": True, "optim.eps": 1e-3}
  config = tl.tokenizer_config(data_dir, **overrides)
  _reference_run(monkeypatch, config, root / "tok_one")
  spec = dict(stage="tokenizer", data_dir=str(data_dir), workdir=str(root / "tok_two"),
              out=str(root / "tok_two_out"), overrides={k: list(v) if isinstance(v, tuple) else v
                                                          for k, v in overrides.items()})
  _launch(root, "tok_two", spec)
  _check_shards(pathlib.Path(spec["out"]), config, steps=2)
  one, two = _state_at(root / "tok_one", 2), _state_at(root / "tok_two", 2)
  err = tl.max_abs_diff(one, two)
  print(f"tokenizer, 2 processes vs 1: state {err:.2e}")
  assert err <= 1e-5
  l1, l2 = _losses(root / "tok_one"), _losses(root / "tok_two")
  assert all(abs(l1[s] - l2[s]) <= 1e-5 for s in (1, 2)), (l1, l2)


def test_sampling_and_fid_across_two_processes_equal_one_process(dirs, fid_dir, tmp_path):
  """sample_images on a mesh over both processes gives every sample in order (10 samples in batches of 8:
  the last batch is padded); samples.npz and the FID statistics of `python -m var.eval.fid --distributed`
  (each process reads its rows; features gathered) equal the single-process ones."""
  from var import model as var_model
  from var.eval import fid
  from var.pretrained import load_pretrained, load_tokenizer, save_pretrained
  from var.sampler import sample_images

  _, tok_dir, root = dirs
  tok, tok_cfg = load_tokenizer(tok_dir)
  var_cfg = var_model.preset("tiny", patch_nums=tok_cfg.patch_nums)
  with nnx.use_eager_sharding(False):
    var = var_model.VAR(var_cfg, rngs=nnx.Rngs(3))
  model_dir = save_pretrained(tmp_path / "model", tokenizer=tok, tokenizer_config=tok_cfg, var=var,
                              var_config=var_cfg)
  kw = dict(classes=[3, 1, 4, 1, 5], num_per_class=2, cfg=1.5, top_k=8, seed=7, batch_size=8)
  weights = str(fid_dir / "inception_random_state_dict.npz")
  spec = dict(model_dir=model_dir, out=str(tmp_path / "two"), sample_kwargs=kw, inception_weights=weights,
              fid_batch_size=8)
  spec_path = tmp_path / "spec.json"
  spec_path.write_text(json.dumps(spec))
  mh.launch(["tests/multihost_worker.py", "sample_and_fid", str(spec_path)], tmp_path / "logs",
            timeout=TIMEOUT, extra_env=CHILD_ENV)

  var1, _, vae1, _ = load_pretrained(model_dir)
  images = sample_images(var1, vae1, kw["classes"], num_per_class=2, cfg=1.5, top_k=8, seed=7, batch_size=8,
                         mesh=shd.make_mesh((-1, 1, 1)))
  two = np.load(tmp_path / "two" / "samples.npz")
  np.testing.assert_array_equal(two["arr_0"], np.clip(np.round(images * 255), 0, 255).astype(np.uint8))
  np.testing.assert_array_equal(two["arr_1"], np.repeat(kw["classes"], 2))
  assert len({im.tobytes() for im in two["arr_0"]}) == 10  # ten different samples, none lost or repeated

  fid.main(["--samples", str(tmp_path / "two" / "samples.npz"), "--save_stats", str(tmp_path / "one.npz"),
            "--inception_weights", weights, "--batch_size", "8", "--no_progress"])
  one, both = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two" / "stats.npz")
  for k in ("mu", "sigma", "mu_s", "sigma_s"):
    err = float(np.max(np.abs(one[k] - both[k])))
    print(f"FID statistics {k}: 2 processes vs 1 max abs diff {err:.2e}")
    np.testing.assert_allclose(both[k], one[k], rtol=0, atol=1e-6 * max(1.0, float(np.max(np.abs(one[k])))))
  np.testing.assert_array_equal(both["arr_0"], one["arr_0"])
