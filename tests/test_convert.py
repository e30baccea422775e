"""The model directory (var/pretrained.py) and the official-checkpoint converter (python -m var.convert)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tokenizer import VQVAEConfig, load_official_vqvae, to_official_state_dict
from var import convert, pretrained

T1_FIELDS = {"ch": 32, "ch_mult": [1, 1, 1], "z_channels": 8, "vocab_size": 64, "patch_nums": [1, 2, 3, 4]}


@pytest.fixture(scope="module")
def vae_files(shared_dir):
  root = shared_dir / "fixtures" / "var"
  return (
    root / "vae_shared.pth",
    dict(np.load(root / "vae_shared.npz")),
    dict(np.load(root / "T1" / "io.npz")),
  )


def test_convert_official_pth_then_load(vae_files, tmp_path):
  pth, sd, io = vae_files
  cfg_file = tmp_path / "t1.json"
  cfg_file.write_text(json.dumps(T1_FIELDS))
  out = tmp_path / "models" / "t1"
  assert convert.main(["--vae", str(pth), "--out", str(out), "--vae_config", str(cfg_file)]) == 0
  assert sorted(os.listdir(out)) == ["config.json", "tokenizer"]
  assert sorted(os.listdir(out.parent)) == ["t1"]  # no temporary directory left behind
  meta = json.loads((out / "config.json").read_text())
  assert meta["format"] == "var-jax-pretrained" and meta["version"] == 1 and meta["var"] is None

  model, config = pretrained.load_tokenizer(out)
  assert config == VQVAEConfig.preset("t1")
  back = to_official_state_dict(model)
  assert set(back) == set(sd) - {"quantize.ema_vocab_hit_SV"}
  for k, v in back.items():
    np.testing.assert_array_equal(v, sd[k], err_msg=k)
  # the loaded tokenizer quantises the fixture features to the official tokens
  idx = nnx.jit(lambda m, f: m.f_to_idx_or_fhat(f))(model, jnp.asarray(io["enc_f"].transpose(0, 2, 3, 1)))
  for si in range(4):
    np.testing.assert_array_equal(idx[si], io[f"idx_s{si}"])


def test_convert_is_strict_and_writes_nothing_on_error(vae_files, tmp_path, capsys):
  pth, _, _ = vae_files
  out = tmp_path / "bad"
  # the T1 checkpoint does not fit the default official 256px architecture
  with pytest.raises(SystemExit, match=r"cannot convert .*\n.*does not match") as e:
    convert.main(["--vae", str(pth), "--out", str(out)])
  msg = str(e.value)
  assert "missing key: encoder.down.4.attn.0.qkv.weight" in msg
  assert "shape mismatch: quantize.embedding.weight: checkpoint (64, 8) vs model (4096, 32)" in msg
  assert not out.exists() and os.listdir(tmp_path) == []
  with pytest.raises(SystemExit, match="is not a file"):
    convert.main(["--vae", str(tmp_path / "missing.pth"), "--out", str(out)])
  with pytest.raises(SystemExit):  # argparse: --preset must be a known preset
    convert.main(["--vae", str(pth), "--out", str(out), "--preset", "vqvae_1024"])
  assert "invalid choice" in capsys.readouterr().err
  assert not out.exists()


def test_save_pretrained_overwrite_and_errors(vae_files, tmp_path):
  _, sd, _ = vae_files
  cfg = VQVAEConfig.preset("t1")
  model = load_official_vqvae(sd, cfg)
  d = tmp_path / "m"
  assert pretrained.save_pretrained(d, tokenizer=model, tokenizer_config=cfg) == str(d)
  with pytest.raises(FileExistsError, match="overwrite=True"):
    pretrained.save_pretrained(d, tokenizer=model, tokenizer_config=cfg)
  # overwrite with different weights: the directory now holds the new ones
  model.quantize.embedding.embedding[...] = model.quantize.embedding.embedding[...] * 2
  pretrained.save_pretrained(d, tokenizer=model, tokenizer_config=cfg, overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["m"]
  loaded, _ = pretrained.load_tokenizer(d)
  np.testing.assert_array_equal(loaded.quantize.embedding.embedding[...], sd["quantize.embedding.weight"] * 2)
  with pytest.raises(ValueError, match="both var and var_config"):
    pretrained.save_pretrained(tmp_path / "x", tokenizer=model, tokenizer_config=cfg, var_config={"depth": 2})


def test_load_errors_for_missing_or_corrupt_directories(vae_files, tmp_path):
  _, sd, _ = vae_files
  cfg = VQVAEConfig.preset("t1")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    pretrained.load_tokenizer(tmp_path / "nope")
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ValueError, match="config.json is missing"):
    pretrained.load_tokenizer(empty)
  (empty / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match="cannot parse config.json"):
    pretrained.load_tokenizer(empty)
  (empty / "config.json").write_text(json.dumps({"format": "something-else"}))
  with pytest.raises(ValueError, match="is not a var-jax-pretrained config"):
    pretrained.load_tokenizer(empty)

  d = pretrained.save_pretrained(tmp_path / "m", tokenizer=load_official_vqvae(sd, cfg), tokenizer_config=cfg)
  meta = json.loads((tmp_path / "m" / "config.json").read_text())
  meta["tokenizer"]["vocab_sizee"] = 3
  (tmp_path / "m" / "config.json").write_text(json.dumps(meta))
  with pytest.raises(ValueError, match=r"corrupt tokenizer config .*vocab_sizee"):
    pretrained.load_tokenizer(d)
  del meta["tokenizer"]["vocab_sizee"]
  meta["tokenizer"]["vocab_size"] = 128  # config no longer matches the saved parameters
  (tmp_path / "m" / "config.json").write_text(json.dumps(meta))
  with pytest.raises(ValueError, match="could not restore parameters"):
    pretrained.load_tokenizer(d)
  meta["tokenizer"]["vocab_size"] = 64
  (tmp_path / "m" / "config.json").write_text(json.dumps(meta))
  pretrained.load_tokenizer(d)  # restored config: loads again
  for root, _, files in os.walk(tmp_path / "m" / "tokenizer"):  # truncate every parameter file
    for name in files:
      open(os.path.join(root, name), "w").close()
  with pytest.raises(ValueError, match="could not restore parameters"):
    pretrained.load_tokenizer(d)
