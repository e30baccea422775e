"""Writes the token pyramids of a training split once, for tokenise-once VAR training (var/token_data.py).

  python -m var.tokenize_dataset --config configs/digits_var.py --config.tokenizer_dir workdir/tok/model \
      --out workdir/digits_tokens
  python train.py --config configs/digits_var.py --config.tokenizer_dir workdir/tok/model \
      --config.input.tokens_dir workdir/digits_tokens --workdir workdir/var_tokens

The config is the training config the tokens are for: its input block (dataset, data_dir, train split,
resolution, crop_scale, upsample), its tokenizer_dir and its patch_nums fix the tokens, and training checks them
against the dataset's metadata. Every example is written in both variants of var/token_data.py VARIANTS (centre
crop, and centre crop of the flipped image), tokenised by the frozen tokenizer in float32 exactly as the VAR step
does, batched and split over this process's devices. With several processes (`--config.distributed=True`) each
writes the contiguous shard of examples var/data.py gives it, into its own ArrayRecord file.
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from var import data, token_data


def variant_image(image: np.ndarray, variant: int, *, resolution: int, crop_scale: float) -> np.ndarray:
  """A decoded (H, W, 3) uint8 image -> variant `variant` of VARIANTS, (R, R, 3) uint8: [flip], shorter side ->
  round(crop_scale * R) (LANCZOS), centre crop (the train augmentation's order, with the centred crop)."""
  if token_data.VARIANTS[variant] == "center_hflip":
    image = image[:, ::-1]
  image = data.resize_shorter_side(np.ascontiguousarray(image), round(crop_scale * resolution))
  return np.ascontiguousarray(data.center_crop(image, resolution))


def to_model_input(images: np.ndarray) -> np.ndarray:
  """uint8 images -> float32 in [-1, 1], as var/data.py ToModelInput."""
  return images.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


def frozen_tokenizer(config: ml_collections.ConfigDict):
  """The tokenizer the VAR stage tokenises with: its config from var/stages/var.py load_tokenizer_config (float32,
  the run's patch_nums), the weights of config.tokenizer_dir. -> (VQVAE, VQVAEConfig, weights checksum)."""
  from tokenizer.vqvae import VQVAE
  from var import code, pretrained
  from var.stages import var as var_stage

  tok_config = var_stage.load_tokenizer_config(config)
  loaded, _ = pretrained.load_tokenizer(config.tokenizer_dir)
  with nnx.use_eager_sharding(False):  # plain arrays: the writer shards the batch, not the weights
    vae = VQVAE(tok_config, rngs=nnx.Rngs(0))
  nnx.update(vae, nnx.state(loaded, nnx.Param))
  return vae, tok_config, code.tokenizer_checksum(loaded)


@functools.partial(jax.jit, static_argnums=0)
def _tokenize(graphdef, state, images):
  vae = nnx.merge(graphdef, state)
  return jnp.concatenate(vae.img_to_idx(images), axis=1)  # (B, L)


def write_tokens(config: ml_collections.ConfigDict, out_dir, *, batch_size: int = 64,
                 process_index: int | None = None, process_count: int | None = None) -> pathlib.Path:
  """Tokenises this process's shard of config.input.train_split in every variant into `out_dir`.

  Returns the metadata path. Process 0 writes the metadata (it covers every process's shard)."""
  from tqdm import tqdm

  from var.stages import var as var_stage

  var_stage.validate(config)
  cfg = data.input_config(config.input)
  if cfg.tokens_dir:
    raise ValueError(f"config.input.tokens_dir={cfg.tokens_dir!r}: the writer reads images; leave tokens_dir "
                     "unset and give the output directory with --out")
  process_index, process_count = data._process(process_index, process_count)
  vae, tok_config, checksum = frozen_tokenizer(config)
  source, decode, num_classes = data.make_source(cfg, cfg.train_split)
  n = len(source)
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  shards = tuple(f"tokens-{i:05d}-of-{process_count:05d}.array_record" for i in range(process_count))
  meta = token_data.TokensMetadata(
      tokenizer_checksum=checksum, patch_nums=tuple(tok_config.patch_nums), vocab_size=tok_config.vocab_size,
      resolution=cfg.resolution, crop_scale=float(cfg.crop_scale), upsample=cfg.upsample, dataset=cfg.name,
      split=cfg.train_split, num_classes=num_classes, num_examples=n, variants=token_data.VARIANTS,
      token_dtype=token_data.token_dtype_for(tok_config.vocab_size), shards=shards)

  devices = jax.local_devices()
  mesh = jax.sharding.Mesh(np.array(devices), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  num_variants = len(token_data.VARIANTS)
  # examples per call: about batch_size images, a multiple of the devices (padded at the end of the shard)
  per_batch = -(-max(batch_size // num_variants, 1) // len(devices)) * len(devices)
  graphdef, state = nnx.split(vae)
  state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))  # replicated
  start, stop = data._shard_bounds(n, process_index, process_count)

  from array_record.python.array_record_module import ArrayRecordWriter

  writer = ArrayRecordWriter(str(out_dir / shards[process_index]), "group_size:1")
  bar = tqdm(total=stop - start, desc=f"tokenize {cfg.name}:{cfg.train_split}", unit="image",
             disable=process_index != 0, mininterval=2.0)
  for lo in range(start, stop, per_batch):
    idx = list(range(lo, min(lo + per_batch, stop)))
    examples = [decode.map(source[i]) for i in idx]
    images = np.stack([variant_image(e["image"], v, resolution=cfg.resolution, crop_scale=cfg.crop_scale)
                       for e in examples for v in range(num_variants)])  # (b * V, R, R, 3), example-major
    pad = per_batch * num_variants - len(images)  # the last call: pad to the compiled shape
    images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)]) if pad else images
    tokens = np.asarray(_tokenize(graphdef, state, jax.device_put(to_model_input(images), sharding)))
    tokens = tokens[:len(idx) * num_variants].reshape(len(idx), num_variants, -1)
    for e, t in zip(examples, tokens, strict=True):
      writer.write(meta.encode(int(e["label"]), t))
    bar.update(len(idx))
  writer.close()
  bar.close()
  path = out_dir / token_data.METADATA
  if process_count > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("tokenize_dataset: every shard written")
  if process_index == 0:
    path.write_text(meta.to_json())
  return path


def main(argv):
  del argv
  from absl import flags

  from var import sharding as shd

  config = flags.FLAGS["config"].value
  shd.maybe_initialize_distributed(True if config.distributed else None)
  path = write_tokens(config, flags.FLAGS["out"].value, batch_size=flags.FLAGS["batch"].value)
  if jax.process_index() == 0:
    meta = token_data.read_metadata(path.parent)
    print(f"wrote {meta.num_examples} examples x {len(meta.variants)} variants x {meta.num_tokens} tokens "
          f"({meta.token_dtype}) of {meta.dataset}:{meta.split} to {path.parent}")


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "The training config the tokens are for (configs/*.py[:arg]).",
                                  lock_config=True)
  flags.DEFINE_string("out", None, "Output directory (metadata.json + ArrayRecord shards).")
  flags.DEFINE_integer("batch", 64, "Images per tokenizer call (both variants count), split over the devices.")
  flags.mark_flags_as_required(["config", "out"])
  app.run(main)
