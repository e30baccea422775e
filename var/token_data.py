"""Tokenise-once training input: token pyramids written once (var/tokenize_dataset.py), read instead of images.

The on-the-fly VAR stage tokenises every image in every step (about half the official step). With
`config.input.tokens_dir` the VAR stages read the tokens instead: the step skips the encoder and the nearest-code
search, and builds the teacher-forcing input from the tokens with the quantizer's embedding and the exact
resampling, as it does after tokenising.

What is kept. The official augmentation is a random R x R crop of the image resized to round(crop_scale * R),
plus an optional horizontal flip. Random crops are not enumerable, so a token dataset keeps, per example, the
deterministic CENTRE crop in two variants (VARIANTS): as is (0) and horizontally flipped before resizing (1), the
order of the train augmentation. With crop_scale = 1 on square images (the digits configs) the centre crop is the
only crop, so the token input sees exactly the images of the on-the-fly input; with crop_scale > 1 it trades the
random crop offsets for the centre crop.

Which variant. Each epoch every example draws one variant from the seed: the flipped one with probability 1/2 when
`input.hflip` is on, else always variant 0. The draw is the first number of the per-example generator grain gives a
random map at the same place of the pipeline as the image input's augmentation, the number the image input's flip
test reads, so for the same seed the token input flips the same examples in the same epochs as the image input.
Shuffling, host shards and repetition are those of var/data.py `make_train_iterator`, so the token batches are the
tokens of the image batches (when crop_scale = 1), and the grain iterator state resumes mid-epoch exactly.

On disk (`<tokens_dir>/`): `metadata.json` (TokensMetadata) and ArrayRecord shards `tokens-IIIII-of-NNNNN.array_record`
(one per writing process, in example order). A record is one example: its label (int32), then the tokens of every
variant, (num_variants, L) of `token_dtype` (int16 when the vocabulary fits, else int32), scales concatenated small
to large; little-endian, no header. The row is the variant id.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import grain
import numpy as np

VARIANTS = ("center", "center_hflip")
METADATA = "metadata.json"
FORMAT = "var-jax token pyramids v1"


@dataclasses.dataclass(frozen=True)
class TokensMetadata:
  """What a token dataset was made from; checked against the training config before any work."""

  tokenizer_checksum: str  # var/code.py tokenizer_checksum of the tokenizer's weights
  patch_nums: tuple[int, ...]
  vocab_size: int
  resolution: int
  crop_scale: float
  upsample: str
  dataset: str
  split: str
  num_classes: int
  num_examples: int
  variants: tuple[str, ...]
  token_dtype: str
  shards: tuple[str, ...]
  format: str = FORMAT

  @property
  def num_tokens(self) -> int:
    return sum(p * p for p in self.patch_nums)

  def record_dtype(self) -> np.dtype:
    """The structured dtype of one record (label, then the tokens of every variant)."""
    return np.dtype([("label", "<i4"), ("tokens", np.dtype(self.token_dtype).newbyteorder("<"),
                                        (len(self.variants), self.num_tokens))])

  def encode(self, label: int, tokens: np.ndarray) -> bytes:
    """One example -> its record bytes; tokens (num_variants, L)."""
    rec = np.zeros((), self.record_dtype())
    rec["label"], rec["tokens"] = label, tokens
    return rec.tobytes()

  def decode(self, record: bytes) -> tuple[np.int32, np.ndarray]:
    """Record bytes -> (label, tokens (num_variants, L) int32)."""
    rec = np.frombuffer(record, self.record_dtype())[0]
    return np.int32(rec["label"]), rec["tokens"].astype(np.int32)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=1)


def token_dtype_for(vocab_size: int) -> str:
  return "int16" if vocab_size <= np.iinfo(np.int16).max + 1 else "int32"


def read_metadata(tokens_dir: str | pathlib.Path) -> TokensMetadata:
  """The metadata of a token dataset; a missing or foreign directory is an error naming the writer command."""
  path = pathlib.Path(tokens_dir) / METADATA
  if not path.is_file():
    raise FileNotFoundError(f"input tokens_dir={str(tokens_dir)!r} holds no {METADATA}: write the tokens once with "
                            "`python -m var.tokenize_dataset --config <the training config> --out DIR`")
  meta = json.loads(path.read_text())
  if meta.get("format") != FORMAT:
    raise ValueError(f"{path} is not a var-jax token dataset (format {meta.get('format')!r}, want {FORMAT!r})")
  fields = {f.name for f in dataclasses.fields(TokensMetadata)}
  meta = {k: tuple(v) if isinstance(v, list) else v for k, v in meta.items() if k in fields}
  return TokensMetadata(**meta)


def check_metadata(meta: TokensMetadata, *, tokenizer_checksum: str, tok_config, input_cfg,
                   tokens_dir: str) -> None:
  """Raises a ValueError naming every field where the token dataset differs from the training run.

  tok_config: the VQVAEConfig the run tokenises with (after config.model.patch_nums); input_cfg: var/data.py
  InputConfig of the run."""
  want = {"tokenizer_checksum": tokenizer_checksum, "patch_nums": tuple(tok_config.patch_nums),
          "vocab_size": tok_config.vocab_size, "resolution": input_cfg.resolution,
          "crop_scale": float(input_cfg.crop_scale), "upsample": input_cfg.upsample, "dataset": input_cfg.name,
          "split": input_cfg.train_split}
  got = {k: getattr(meta, k) for k in want}
  got["crop_scale"] = float(got["crop_scale"])
  bad = [f"{k}: tokens {got[k]!r} vs run {want[k]!r}" for k in want if got[k] != want[k]]
  if bad:
    raise ValueError(f"the tokens in input tokens_dir={tokens_dir!r} were not written for this run ("
                     f"{'; '.join(bad)}). Write them again for this config with `python -m var.tokenize_dataset "
                     "--config <the training config> --out DIR`, or train on images (input.tokens_dir=None).")


def check_for_run(config, tok_config) -> TokensMetadata:
  """Checks config.input.tokens_dir against a VAR-stage run (its tokenizer weights, patch_nums, input fields)
  before any compile; returns the metadata. Logs what the token input trades when crop_scale > 1."""
  import logging

  from var import code, data, pretrained

  input_cfg = data.input_config(config.input)
  meta = read_metadata(input_cfg.tokens_dir)
  checksum = code.tokenizer_checksum(pretrained.load_tokenizer(config.tokenizer_dir)[0])
  check_metadata(meta, tokenizer_checksum=checksum, tok_config=tok_config, input_cfg=input_cfg,
                 tokens_dir=input_cfg.tokens_dir)
  _source(input_cfg.tokens_dir, meta)  # every shard there, with the expected number of records
  if input_cfg.crop_scale > 1:
    logging.warning("tokens_dir %s holds centre crops: with crop_scale=%g the token input trains on the centre "
                    "crop (and its flip) instead of random crops", input_cfg.tokens_dir, input_cfg.crop_scale)
  return meta


@dataclasses.dataclass(frozen=True)
class DecodeTokens(grain.transforms.Map):
  """Record bytes -> {"tokens": (num_variants, L) int32, "label": int32}."""

  meta: TokensMetadata

  def map(self, record):
    label, tokens = self.meta.decode(record)
    return {"tokens": tokens, "label": label}


@dataclasses.dataclass(frozen=True)
class PickVariant(grain.transforms.RandomMap):
  """One stored variant per example and epoch: the flipped one with probability 1/2 when hflip is on.

  The draw is data.TrainAugment's flip test (its first random number), so both inputs flip the same examples."""

  hflip: bool = False

  def random_map(self, element, rng: np.random.Generator):
    variant = VARIANTS.index("center_hflip") if self.hflip and rng.random() < 0.5 else VARIANTS.index("center")
    return {"tokens": element["tokens"][variant], "label": element["label"]}


def _source(tokens_dir: str, meta: TokensMetadata):
  paths = [pathlib.Path(tokens_dir) / name for name in meta.shards]
  missing = [str(p) for p in paths if not p.is_file()]
  if missing:
    raise FileNotFoundError(f"token shards {missing} of {tokens_dir} are missing: the writer did not finish; run "
                            "`python -m var.tokenize_dataset` again")
  source = grain.sources.ArrayRecordDataSource([str(p) for p in paths])
  if len(source) != meta.num_examples:
    raise ValueError(f"{tokens_dir} holds {len(source)} records but its metadata says {meta.num_examples}: write "
                     "the tokens again")
  return source


def make_train_iterator(cfg: Any, *, seed: int, process_index: int | None = None,
                        process_count: int | None = None) -> grain.DatasetIterator:
  """The token twin of var/data.py `make_train_iterator` (same shuffle, shards, repetition and seed use).

  Returns a grain DatasetIterator of {"tokens": int32 (b, L), "label": int32 (b,)}, b = batch_size /
  process_count; checkpointable with get_state / set_state like the image iterator."""
  from var import data

  cfg = data.input_config(cfg)
  process_index, process_count = data._process(process_index, process_count)
  per_host = data._per_host(cfg.batch_size, process_count, "batch_size")
  meta = read_metadata(cfg.tokens_dir)
  source = _source(cfg.tokens_dir, meta)
  start, stop = data._shard_bounds(len(source), process_index, process_count)
  if stop <= start:
    raise ValueError(f"{cfg.tokens_dir} has {len(source)} examples, fewer than process_count={process_count}")
  host_seed = int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0])  # as data.py
  ds = (grain.MapDataset.source(source)[start:stop]
        .seed(host_seed)
        .shuffle()
        .map(DecodeTokens(meta))  # where the image input decodes: the variant draw gets the flip's generator
        .random_map(PickVariant(cfg.hflip))
        .repeat())
  ds = ds.to_iter_dataset(data._read_options(cfg, per_host)).batch(per_host, drop_remainder=True)
  if cfg.workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.workers))
  return iter(ds)
