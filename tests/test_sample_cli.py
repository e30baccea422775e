"""sample.py end to end on the T1 fixture models (fully optimised XLA, 8 fake devices), and its errors."""

import json

import numpy as np
import pytest

import sample
from var import convert, pretrained
from var import model as var_model


@pytest.fixture(scope="module")
def model_dir(shared_dir, tmp_path_factory):
  """The T1 VQVAE + VAR .pth pair converted by `python -m var.convert` into one model directory."""
  root = shared_dir / "fixtures" / "var"
  tmp = tmp_path_factory.mktemp("models")
  (tmp / "t1.json").write_text(json.dumps({"ch": 32, "ch_mult": [1, 1, 1], "z_channels": 8, "vocab_size": 64,
                                           "patch_nums": [1, 2, 3, 4]}))
  out = tmp / "t1"
  assert convert.main(["--vae", str(root / "vae_shared.pth"), "--vae_config", str(tmp / "t1.json"),
                       "--var", str(root / "T1" / "var.pth"), "--out", str(out)]) == 0
  return out


def test_convert_var_errors(shared_dir, tmp_path):
  root = shared_dir / "fixtures" / "var"
  (tmp_path / "t1.json").write_text(json.dumps({"ch": 32, "ch_mult": [1, 1, 1], "z_channels": 8, "vocab_size": 64,
                                                "patch_nums": [1, 2, 3, 5]}))
  base = ["--vae", str(root / "vae_shared.pth"), "--var", str(root / "T1" / "var.pth"), "--out", str(tmp_path / "o")]
  with pytest.raises(SystemExit, match=r"does not fit the VQVAE config.*patch_nums"):
    convert.main(base + ["--vae_config", str(tmp_path / "t1.json")])
  (tmp_path / "t1.json").write_text(json.dumps({"ch": 32, "ch_mult": [1, 1, 1], "z_channels": 8, "vocab_size": 64,
                                                "patch_nums": [1, 2, 3, 4]}))
  with pytest.raises(SystemExit, match="--var_preset d16 does not match the checkpoint"):
    convert.main(base + ["--vae_config", str(tmp_path / "t1.json"), "--var_preset", "d16"])
  assert not (tmp_path / "o").exists()


def _args(model_dir, out, *extra):
  return ["--checkpoint", str(model_dir), "--out", str(out), "--compilation_cache", "", "--no_progress", *extra]


def test_greedy_cli_matches_official(model_dir, shared_dir, tmp_path):
  io = np.load(shared_dir / "fixtures" / "var" / "T1" / "io.npz")
  args = sample.build_parser().parse_args(
    _args(model_dir, tmp_path, "--classes", "3,0,9,3", "--top_k", "1", "--top_p", "0", "--cfg", "1.5",
          "--batch_size", "8"))
  summary = sample.run(args)
  assert summary["trace_count"] == 1 and summary["devices"] == 8  # AOT-compiled once, batch split over 8 devices
  npz = np.load(tmp_path / "samples.npz")
  assert npz["arr_0"].dtype == np.uint8 and npz["arr_0"].shape == (4, 16, 16, 3)
  np.testing.assert_array_equal(npz["arr_1"], [3, 0, 9, 3])
  ref = np.round(io["sample_cfg1p5_img"].transpose(0, 2, 3, 1) * 255)
  assert np.abs(npz["arr_0"].astype(np.float32) - ref).max() <= 1
  assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [
    "000000_class0003.png", "000001_class0000.png", "000002_class0009.png", "000003_class0003.png"]
  from PIL import Image

  # 16px samples are upscaled 4x by default: 4 tiles of 64 px in one row, 2 px gaps; grid.txt names the classes
  assert Image.open(tmp_path / "grid.png").size == (4 * (64 + 2) + 2, 64 + 2 + 2)
  assert (tmp_path / "grid.txt").read_text().splitlines()[1] == "row 0: classes 3,0,9,3"


def test_pretrained_roundtrip_of_the_var(model_dir, shared_dir):
  import jax.numpy as jnp

  io = np.load(shared_dir / "fixtures" / "var" / "T1" / "io.npz")
  var, cfg = pretrained.load_var(model_dir)
  assert cfg == var_model.preset("tiny")
  logits = var(jnp.asarray(io["labels_fwd"]), jnp.asarray(io["var_input"]))
  np.testing.assert_allclose(logits, io["logits_fwd"], atol=1e-4, rtol=0)


def test_cli_errors(model_dir, tmp_path):
  out = tmp_path / "o"
  with pytest.raises(SystemExit, match=r"class ids \[11\] out of range.*0\.\.9"):
    sample.main(_args(model_dir, out, "--classes", "1,11"))
  with pytest.raises(SystemExit, match="--top_k 900 exceeds the model's vocabulary of 64"):
    sample.main(_args(model_dir, out, "--classes", "1"))
  with pytest.raises(SystemExit, match="not divisible by the 8 devices"):
    sample.main(_args(model_dir, out, "--classes", "1,2", "--batch_size", "3", "--top_k", "10"))
  with pytest.raises(SystemExit, match="--grid_scale 0 must be >= 1"):
    sample.main(_args(model_dir, out, "--classes", "1", "--grid_scale", "0"))
  with pytest.raises(SystemExit, match="--image and --mask go together"):
    sample.main(_args(model_dir, out, "--classes", "1", "--mask", "0,0,.5,.5", "--top_k", "10"))
  with pytest.raises(SystemExit, match="does not exist"):
    sample.main(_args(tmp_path / "nothing", out))
  # a directory whose VAR config does not fit its tokenizer
  bad = tmp_path / "bad"
  bad.mkdir()
  for p in model_dir.iterdir():
    (bad / p.name).symlink_to(p)
  meta = json.loads((model_dir / "config.json").read_text())
  meta["var"]["patch_nums"] = [1, 2, 4]
  (bad / "config.json").unlink()
  (bad / "config.json").write_text(json.dumps(meta))
  with pytest.raises(SystemExit, match="VAR config does not match its tokenizer"):
    sample.main(_args(bad, out, "--classes", "1", "--batch_size", "8", "--top_k", "10"))
  # tokenizer-only directory
  meta["var"] = None
  (bad / "config.json").write_text(json.dumps(meta))
  with pytest.raises(SystemExit, match="holds no VAR transformer"):
    sample.main(_args(bad, out))
  assert not out.exists()


def test_technique_flags(model_dir, tmp_path):
  """FastVAR through the CLI (T1: prune its last scale, restore from scale 2) and every bad technique option failing
  before anything is loaded or compiled."""
  out = tmp_path / "pruned"
  args = sample.build_parser().parse_args(_args(model_dir, out, "--classes", "3,0", "--num_per_class", "4",
                                                "--top_k", "5", "--prune", "3:0.5", "--kv_dtype", "bfloat16"))
  summary = sample.run(args)
  assert summary["num_images"] == 8 and summary["trace_count"] == 1
  assert np.load(out / "samples.npz")["arr_0"].shape == (8, 16, 16, 3)
  bad = tmp_path / "bad"
  cases = [(["--kv_budget", "10%"], "below the observation window"),
           (["--kv_budget", "40"], "exceeds the full cache"),
           (["--prune", "3:1.5"], r"outside \[0, 1\]"),
           (["--prune", "0:0.5"], "scale 0 cannot be pruned"),
           (["--prune", "7:0.5"], "out of range"),
           (["--prune", "3:0.5", "--prune_cache_scale", "3"], "is itself pruned"),
           (["--prune", "3:0.5", "--prune_layers", "0:5"], "outside the 2-layer model"),
           (["--prune", "2:1.0"], "only trailing scales"),
           (["--prune_layers", "0:1"], "need --prune")]
  for extra, match in cases:
    with pytest.raises(SystemExit, match=match):
      sample.main(_args(model_dir, bad, "--classes", "1", "--top_k", "5", *extra))
  assert not bad.exists()
