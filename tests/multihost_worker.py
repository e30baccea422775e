"""One process of the multi-process tests (started by multihost_testlib.launch; not a test module).

  python tests/multihost_worker.py SCENARIO SPEC.json

SCENARIO is `train` (train_lib.train_and_evaluate on a tiny config with config.distributed=True, recording
the batches this process read; optionally SIGKILLed at a chosen point), `restore` (restore a checkpoint
onto a mesh over all processes and write the gathered state) or `sample_and_fid` (sample_images + FID
statistics across the processes). Results go to SPEC["out"] as npz / json files
named by process index.
"""

import faulthandler
import json
import pathlib
import signal
import sys

import numpy as np


def _config(spec):
  import train_testlib as tl

  overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.get("overrides", {}).items()}
  if spec["stage"] == "var":
    config = tl.var_config(spec["data_dir"], spec["tokenizer_dir"], **overrides)
  else:
    config = tl.tokenizer_config(spec["data_dir"], **overrides)
  config.distributed = spec.get("distributed", True)  # what a user passes on every host
  return config


def arrange_kill(spec, workdir: pathlib.Path):
  """SIGKILL this process (no cleanup, no atexit: a hard kill) at spec["kill"]["step"]:
    "between": when step k's batch is read, once the checkpoint before it is complete on disk;
    "saving": once checkpoint k's asynchronous save has returned and its background thread has reached the
      commit, which is held back, so the step is certainly unfinished when the kill comes."""
  import os
  import time

  from var import sharding as shd
  from var.checkpoint import Checkpointer

  when, step = spec["kill"]["when"], spec["kill"]["step"]
  if when == "between":
    shard_batch, count = shd.shard_batch, [0]

    def killing_shard_batch(batch, mesh, *args, **kwargs):
      if "mask" not in batch:
        count[0] += 1
        if count[0] == step:
          last = step - 1 - (step - 1) % spec["overrides"]["ckpt.every_steps"]
          while not (workdir / "ckpt" / str(last)).is_dir():  # orbax renames the step dir at commit
            time.sleep(0.05)
          os.kill(os.getpid(), 9)
      return shard_batch(batch, mesh, *args, **kwargs)

    shd.shard_batch = killing_shard_batch
  else:
    import asyncio
    import threading

    from orbax.checkpoint._src.path import atomicity

    writing = threading.Event()
    manager_save = Checkpointer.save

    def held_back(finalize):
      async def finalize_unless_step(self, *args, **kwargs):
        if self.get_final().name == str(step):  # the commit of step k: never let it finish
          if threading.current_thread() is threading.main_thread():
            os.kill(os.getpid(), 9)  # (committed synchronously after all: the kill comes mid-save anyway)
          writing.set()
          await asyncio.sleep(600)
        return await finalize(self, *args, **kwargs)

      return finalize_unless_step

    def killing_save(self, at, *args, **kwargs):
      out = manager_save(self, at, *args, **kwargs)  # returns while orbax writes and commits in the background
      if at == step:
        writing.wait(timeout=300)
        os.kill(os.getpid(), 9)
      return out

    for cls in (atomicity.AtomicRenameTemporaryPath, atomicity.CommitFileTemporaryPath):
      cls.finalize = held_back(cls.finalize)
    Checkpointer.save = killing_save


def flat(tree) -> dict[str, np.ndarray]:
  """A pytree of arrays -> {keystr(path): numpy array}."""
  import jax

  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def train(spec, out):
  import jax

  from var import sharding as shd
  from var import train_lib

  config = _config(spec)
  seen = []
  shard_batch = shd.shard_batch

  def recording_shard_batch(batch, mesh, *args, **kwargs):
    if "mask" not in batch:  # a training batch (evaluation batches carry a padding mask)
      seen.append(batch)
    return shard_batch(batch, mesh, *args, **kwargs)

  shd.shard_batch = recording_shard_batch  # the training loop reads it from the module at call time
  if spec.get("kill"):
    arrange_kill(spec, pathlib.Path(spec["workdir"]))
  result = train_lib.train_and_evaluate(config, spec["workdir"])
  pid = jax.process_index()
  np.savez(out / f"batches_{pid}.npz", image=np.stack([b["image"] for b in seen]),
           label=np.stack([b["label"] for b in seen]))
  if pid == 0:
    (out / "result.json").write_text(json.dumps({k: v for k, v in result.items() if k != "wall_s"}))
  if spec.get("restore"):  # then, in the same job, restore a checkpoint another run wrote
    restore({**spec, **spec["restore"]}, out)


def restore(spec, out):
  """Restores checkpoint `spec["step"]` of `spec["ckpt"]` onto spec["mesh"] (over all processes) without
  the data position (it belongs to another process count); writes the gathered state and the shardings."""
  import jax
  from jax.experimental import multihost_utils

  from var import sharding as shd
  from var import train_lib
  from var.checkpoint import Checkpointer

  config = _config(spec)
  config.mesh = tuple(spec["mesh"])
  shd.maybe_initialize_distributed(True)
  mesh = shd.make_mesh(tuple(spec["mesh"]))
  tok_config = train_lib.load_tokenizer_config(config) if config.stage in train_lib.VAR_STAGES else None
  setup = train_lib.make_setup(config, mesh, tok_config=tok_config)
  ckpt = Checkpointer(spec["ckpt"])
  train_lib.restore_checkpoint(setup, ckpt, spec["step"], None, config)
  state = train_lib._trainable(setup.state, setup.frozen)
  specs = {k: str(v.sharding.spec) for k, v in flat_arrays(state).items()}
  gathered = multihost_utils.process_allgather(state, tiled=True)
  ckpt.close()
  if jax.process_index() == 0:
    np.savez(out / "restored.npz", **flat(gathered))
    (out / "specs.json").write_text(json.dumps(specs))


def sample_and_fid(spec, out):
  """Samples with var.sampler.sample_images on a mesh over all processes (process 0 writes samples.npz as
  sample.py does), then runs `python -m var.eval.fid --distributed` on that file (as main(argv))."""
  import jax

  from var import pretrained
  from var import sharding as shd
  from var.eval import fid
  from var.sampler import sample_images

  shd.maybe_initialize_distributed(True)
  var, _, vae, _ = pretrained.load_pretrained(spec["model_dir"])
  mesh = shd.make_mesh((-1, 1, 1))
  kw = spec["sample_kwargs"]
  images = sample_images(var, vae, kw["classes"], num_per_class=kw["num_per_class"], cfg=kw["cfg"],
                         top_k=kw["top_k"], seed=kw["seed"], batch_size=kw["batch_size"], mesh=mesh)
  labels = np.repeat(np.asarray(kw["classes"], np.int64), kw["num_per_class"])
  if jax.process_index() == 0:
    u8 = np.clip(np.round(images * 255), 0, 255).astype(np.uint8)  # sample.py's samples.npz
    np.savez(out / "samples.npz", arr_0=u8, arr_1=labels)
  from jax.experimental import multihost_utils

  multihost_utils.sync_global_devices("samples.npz written")  # the file is FID's input on every process
  fid.main(["--samples", str(out / "samples.npz"), "--save_stats", str(out / "stats.npz"), "--distributed",
            "--inception_weights", spec["inception_weights"], "--batch_size", str(spec["fid_batch_size"]),
            "--no_progress"])


def flat_arrays(tree) -> dict:
  import jax

  return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


if __name__ == "__main__":
  faulthandler.register(signal.SIGUSR1)  # the launcher asks for every thread's stack before a timeout kill
  scenario, spec_path = sys.argv[1], sys.argv[2]
  spec = json.loads(pathlib.Path(spec_path).read_text())
  out = pathlib.Path(spec["out"])
  out.mkdir(parents=True, exist_ok=True)
  {"train": train, "restore": restore, "sample_and_fid": sample_and_fid}[scenario](spec, out)
