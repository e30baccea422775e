"""Train the tokenizer or the VAR transformer (the config's `stage` says which).

  python train.py --config configs/digits_tokenizer.py --workdir workdir/tok
  python train.py --config configs/digits_var.py --workdir workdir/var --config.tokenizer_dir
  workdir/tok/model python train.py --config configs/imagenet_var.py:depth=16 --workdir DIR
  --config.tokenizer_dir VAE_DIR python train.py --config configs/imagenet_var.py:depth=16 --workdir DIR
  --init_from CONVERTED_DIR  # fine-tune

Re-running the same command resumes from the last checkpoint in `--workdir` and continues exactly as an
uninterrupted run would. Any config field can be overridden with `--config.<field>=<value>`; unknown fields
are errors. Multi-host: pass `--config.distributed=True` (or set JAX_COORDINATOR_ADDRESS) on every host.
"""

import json
import logging

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics, samples and the final model go here.")
_INIT_FROM = flags.DEFINE_string("init_from", None, "Model directory (var/pretrained.py) to fine-tune from.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  from var import train_lib

  result = train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value, init_from=_INIT_FROM.value)
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
