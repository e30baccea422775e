"""Training checkpoints: orbax CheckpointManager with model + optimizer state, data-iterator state and config.

One step directory `<workdir>/ckpt/<step>/` holds three items:
  * `state`:  the trainer's nnx state (models, optimizers, frozen helpers) as a pure dict of arrays
    (OCDBT/zarr).
  * `data`:   the grain iterator state (per process), so a resumed run reads exactly the batches an
    uninterrupted run would have read.
  * `config`: the training config as JSON (checked against the current one before restoring).
Orbax writes into a temporary directory and renames it when complete (atomic); only `max_to_keep` steps are
kept; saving is asynchronous (the train loop continues while arrays are written). Restoring takes an abstract
target whose leaves carry the shardings of the CURRENT mesh, so a checkpoint saved on one mesh shape restores
onto another. Official `.pth` weights are imported by tokenizer/official.py and var/official.py into model
directories (var/pretrained.py); this module only handles training checkpoints.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

# Config fields that may differ between the run that saved a checkpoint and the run that resumes it (they do
# not change what the saved arrays mean). Everything else must match.
RESUMABLE_FIELDS = ("total_steps", "log_every_steps", "eval_every_steps", "eval_batches",
                    "sample_every_steps", "ckpt", "mesh", "distributed", "skip_nonfinite", "input.workers",
                    "input.read_threads", "input.data_dir")


class CheckpointError(ValueError):
  """A checkpoint in the work directory cannot be used (corrupt, or saved by a different configuration)."""


def _flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


def config_differences(saved: Mapping, current: Mapping, ignore=RESUMABLE_FIELDS) -> list[str]:
  """Fields whose values differ between two config dicts (JSON-normalised), except the `ignore` prefixes."""
  a, b = _flatten(json.loads(json.dumps(saved))), _flatten(json.loads(json.dumps(current)))
  diffs = []
  for key in sorted(set(a) | set(b)):
    if any(key == p or key.startswith(p + ".") for p in ignore):
      continue
    if a.get(key, "<missing>") != b.get(key, "<missing>"):
      diffs.append(f"{key}: checkpoint {a.get(key, '<missing>')!r} vs now {b.get(key, '<missing>')!r}")
  return diffs


class Checkpointer:
  """Save / restore training state, data-iterator state and config in one orbax step directory."""

  def __init__(self, directory: str | pathlib.Path, *, max_to_keep: int = 2, async_save: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           create=True, cleanup_tmp_directories=False)
    self._manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "data", "config"),
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()},
        options=options)

  def latest_step(self) -> int | None:
    """The newest complete step, or None when the directory holds no checkpoint."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Mapping, *, config: Mapping, data_iterator=None,
           force: bool = False) -> bool:
    """Saves the pure-dict `state` (jax arrays), the grain iterator's state and the config at `step`."""
    items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(dict(config))}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def has_data_state(self, step: int) -> bool:
    """Whether `step` holds the data-iterator position of THIS process for the current process count (grain
    saves one file per process: `data/process_<i>-of-<n>.json`)."""
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    return (self.directory / str(step) / "data" / name).is_file()

  def read_config(self, step: int) -> dict:
    """The config saved with `step`; a clear CheckpointError when it is unreadable."""
    path = self.directory / str(step) / "config"
    try:
      return dict(self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config)
    except Exception as e:  # orbax raises several types for missing / truncated files
      raise CheckpointError(f"Cannot read the config saved in checkpoint {path} ({type(e).__name__}: {e}). "
                            "The checkpoint is corrupt or incomplete; move it away (it was left untouched) "
                            "or use another --workdir.") from e

  def restore(self, step: int, abstract_state: Mapping, *, data_iterator=None) -> dict:
    """Restores the state onto `abstract_state` (a pure dict of jax.ShapeDtypeStruct with shardings: the
    layout of the current mesh) and, when given, the grain iterator's position. Raises CheckpointError naming
    the step directory when shapes, names or files do not match."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    path = self.directory / str(step)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:
      raise CheckpointError(
          f"Cannot restore checkpoint {path / 'state'}"
          f"{' / ' + str(path / 'data') if data_iterator is not None else ''} ({type(e).__name__}: {e}). "
          "It is corrupt or does not match this model/optimizer; it was left untouched. Move it away or use "
          "another --workdir.") from e
    _check_tree(restored.state, abstract_state, path / "state")
    return restored.state

  def wait(self):
    """Blocks until pending asynchronous saves are committed."""
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def _check_tree(restored, target, path):
  """Orbax restores partial trees silently in some versions; insist on exactly the expected leaves."""
  leaves = jax.tree_util.tree_leaves_with_path
  got = {jax.tree_util.keystr(p): getattr(v, "shape", None) for p, v in leaves(restored)}
  want = {jax.tree_util.keystr(p): v.shape for p, v in leaves(target)}
  problems = [f"missing {k}" for k in sorted(set(want) - set(got))]
  problems += [f"unexpected {k}" for k in sorted(set(got) - set(want))]
  problems += [f"{k}: shape {got[k]} != expected {want[k]}" for k in sorted(set(want) & set(got))
               if tuple(got[k]) != tuple(want[k])]
  if problems:
    raise CheckpointError(f"Checkpoint {path} does not match the current model/optimizer: "
                          + "; ".join(problems))
