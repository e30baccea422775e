"""Tokenise-once training (var/tokenize_dataset.py, var/token_data.py): the written tokens are the tokenizer's
tokens of the same images, the token input reproduces the image input's batches and resumes mid-epoch, a train
step on tokens equals the step on the images, and a dataset written for another tokenizer is refused."""

import pathlib

import jax
import numpy as np
import pytest
import train_testlib as tl

from var import data, token_data
from var.digits_builder import prepare

pytestmark = pytest.mark.usefixtures("fast_compile")

SPLIT = "train[:20]"  # 20 examples: an epoch is 2.5 batches of 8


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  from var.tokenize_dataset import write_tokens

  root = tmp_path_factory.mktemp("tokens")
  data_dir = pathlib.Path(prepare(root / "tfds"))
  tok_dir = tl.write_tokenizer_dir(root / "tok")
  config = _config(data_dir, tok_dir)
  # batch 6: 3 examples x 2 variants per call, rounded up to the 8 devices; the last call is padded
  write_tokens(config, root / "tokens", batch_size=6)
  return data_dir, tok_dir, root / "tokens", root


def _config(data_dir, tok_dir, tokens_dir=None, **overrides):
  c = tl.var_config(data_dir, tok_dir, **{"input.train_split": SPLIT, "input.hflip": True, "total_steps": 4,
                                          "log_every_steps": 1, "ckpt.every_steps": 2, "eval_batches": 1,
                                          "mesh": (8, 1, 1), **overrides})
  c.input.tokens_dir = str(tokens_dir) if tokens_dir else None
  return c


_TOKENIZERS = {}


def _reference_tokens(tok_dir, images):
  """The tokenizer's own tokens, one unsharded call per image: images (N, R, R, 3) float32 -> (N, L) int."""
  from var.pretrained import load_tokenizer

  if tok_dir not in _TOKENIZERS:
    _TOKENIZERS[tok_dir] = load_tokenizer(tok_dir)[0]
  vae = _TOKENIZERS[tok_dir]
  return np.stack([np.concatenate([np.asarray(t) for t in vae.img_to_idx(im[None])], axis=1)[0] for im in images])


def test_written_tokens_are_the_tokens_of_both_variants(dirs):
  from var import code
  from var.pretrained import load_tokenizer

  data_dir, tok_dir, tokens_dir, _ = dirs
  meta = token_data.read_metadata(tokens_dir)
  assert (meta.num_examples, meta.variants, meta.patch_nums, meta.token_dtype) == (
      20, ("center", "center_hflip"), (1, 2, 3, 4), "int16")
  assert meta.tokenizer_checksum == code.tokenizer_checksum(load_tokenizer(tok_dir)[0])
  # the prepared split's examples in record order (crop_scale 1 on 8x8 digits at 8px: the crop is the image)
  raw, _, _ = data.make_source(_config(data_dir, tok_dir).input, SPLIT)
  images = np.stack([data.upsample_digit(raw[i]["image"], 8) for i in range(20)])
  labels = np.array([raw[i]["label"] for i in range(20)])
  source = token_data._source(str(tokens_dir), meta)
  records = [meta.decode(source[i]) for i in range(20)]
  np.testing.assert_array_equal([r[0] for r in records], labels)
  as_input = lambda u8: u8.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)  # var/data.py's map
  for variant, view in enumerate((images, images[:, :, ::-1])):
    want = _reference_tokens(tok_dir, as_input(view))
    got = np.stack([r[1][variant] for r in records])
    np.testing.assert_array_equal(got, want)  # exactly the tokens of the same images
  assert (np.stack([r[1][0] for r in records]) != np.stack([r[1][1] for r in records])).any()


def test_token_iterator_reproduces_the_image_input_and_resumes_mid_epoch(dirs):
  data_dir, tok_dir, tokens_dir, _ = dirs
  images_cfg = _config(data_dir, tok_dir).input
  tokens_cfg = _config(data_dir, tok_dir, tokens_dir).input
  image_it = data.make_train_iterator(images_cfg, seed=3)
  token_it = data.make_train_iterator(tokens_cfg, seed=3)
  meta = token_data.read_metadata(tokens_dir)
  source = token_data._source(str(tokens_dir), meta)
  stored = np.stack([meta.decode(source[i])[1] for i in range(20)])  # (20, 2, L)
  token_batches, variants = [], []
  for _ in range(6):  # 48 examples: 2.4 epochs
    img, tok = next(image_it), next(token_it)
    assert set(tok) == {"tokens", "label"} and tok["tokens"].dtype == np.int32
    np.testing.assert_array_equal(tok["label"], img["label"])
    np.testing.assert_array_equal(tok["tokens"], _reference_tokens(tok_dir, img["image"]))
    token_batches.append(tok)
    match = (tok["tokens"][:, None, None] == stored[None]).all(-1)  # (8, 20, 2): which record and variant
    variants += list(np.nonzero(match.any(1))[1])
  assert 0 < np.mean(variants) < 1  # both variants are drawn

  resumed_it = data.make_train_iterator(tokens_cfg, seed=3)
  fresh = data.make_train_iterator(tokens_cfg, seed=3)
  for _ in range(3):
    next(fresh)
  resumed_it.set_state(fresh.get_state())  # mid-epoch (24 of 40 examples into epoch 2)
  for want in token_batches[3:]:
    got = next(resumed_it)
    np.testing.assert_array_equal(got["tokens"], want["tokens"])
    np.testing.assert_array_equal(got["label"], want["label"])


def test_train_step_on_tokens_equals_the_step_on_images(dirs):
  from var import sharding as shd
  from var import train_lib

  data_dir, tok_dir, tokens_dir, _ = dirs
  config = _config(data_dir, tok_dir, tokens_dir)
  mesh = shd.make_mesh((8, 1, 1))
  setup = train_lib.make_setup(config, mesh, tok_config=train_lib.load_tokenizer_config(config))
  train_lib.load_frozen_weights(setup, config)
  images = next(data.make_train_iterator(_config(data_dir, tok_dir).input, seed=0))
  tokens = {"tokens": _reference_tokens(tok_dir, images["image"]).astype(np.int32), "label": images["label"]}
  prog = (np.int32(-1), np.float32(1.0))
  out = {}
  with jax.set_mesh(mesh):
    for name, batch in (("images", images), ("tokens", tokens)):
      state = jax.tree.map(lambda x: x.copy(), setup.state)  # the step donates its state
      new_state, metrics = setup.train_step(state, shd.shard_batch(batch, mesh), *prog)
      out[name] = jax.device_get((new_state["model"], metrics))
  (model_i, m_i), (model_t, m_t) = out["images"], out["tokens"]
  # measured: loss and grad norm equal to the last bit, parameters within 0 (same tokens -> same inputs)
  np.testing.assert_allclose(m_t["loss"], m_i["loss"], rtol=1e-6)
  np.testing.assert_allclose(m_t["grad_norm"], m_i["grad_norm"], rtol=1e-6)
  assert tl.max_abs_diff(model_t, model_i) <= 1e-6
  assert m_t["loss"] > 0


def test_training_on_tokens_resumes_exactly_and_matches_training_on_images(dirs):
  from var import train_lib

  data_dir, tok_dir, tokens_dir, root = dirs
  runs = {}
  for name, tokens in (("images", None), ("tokens", tokens_dir)):
    runs[name] = train_lib.train_and_evaluate(_config(data_dir, tok_dir, tokens), root / name)
  config = _config(data_dir, tok_dir, tokens_dir)
  assert train_lib.train_and_evaluate(config, root / "resumed", stop_after=2)["step"] == 2
  runs["resumed"] = train_lib.train_and_evaluate(config, root / "resumed")
  state = {name: tl.restore_arrays(root / name / "ckpt" / "4" / "state") for name in runs}
  assert tl.max_abs_diff(state["tokens"], state["resumed"]) <= 1e-6
  # the same batches (crop_scale 1, the same flips), so the same training (measured: bitwise equal, 0.0)
  assert tl.max_abs_diff(state["tokens"]["model"], state["images"]["model"]) <= 1e-5
  assert abs(runs["tokens"]["eval"]["loss"] - runs["images"]["eval"]["loss"]) <= 1e-5
  assert (root / "tokens" / "model" / "config.json").is_file()


def test_tokens_of_another_tokenizer_or_schedule_are_refused(dirs, tmp_path):
  from var import train_lib

  data_dir, _, tokens_dir, _ = dirs
  other = tl.write_tokenizer_dir(tmp_path / "other_tok", seed=3)  # same config, other weights
  with pytest.raises(ValueError, match=r"were not written for this run \(tokenizer_checksum: tokens '[0-9a-f]{64}' "
                                       r"vs run '[0-9a-f]{64}'\)"):
    train_lib.train_and_evaluate(_config(data_dir, other, tokens_dir), tmp_path / "run")
  with pytest.raises(ValueError, match=r"split: tokens 'train\[:20\]' vs run 'train'"):
    train_lib.train_and_evaluate(_config(data_dir, dirs[1], tokens_dir, **{"input.train_split": "train"}),
                                 tmp_path / "run2")
  with pytest.raises(FileNotFoundError, match="holds no metadata.json: write the tokens once"):
    train_lib.train_and_evaluate(_config(data_dir, dirs[1], tmp_path), tmp_path / "run3")
  assert not (tmp_path / "run").exists()  # refused before the work directory was made
  with pytest.raises(ValueError, match="tokens_dir=.* is the VAR stages' token input; the tokenizer stage trains"):
    train_lib.validate_config(tl.tokenizer_config(data_dir, **{"input.tokens_dir": str(tokens_dir)}))
