"""The torch-free .pth reader against checkpoints written by torch (zip and legacy containers)."""

import gzip
import pickle

import numpy as np
import pytest

from tokenizer.torch_pth import CheckpointReadError, OpaqueObject, load_pth, load_pth_object


@pytest.fixture(scope="module")
def expected(shared_dir):
  with np.load(shared_dir / "fixtures/fid/loader_test_expected.npz") as f:
    return {k: f[k] for k in f.files}


@pytest.mark.parametrize("name", ["loader_test_zip.pth", "loader_test_legacy.pth"])
def test_reads_both_containers_exactly(shared_dir, expected, name):
  got = load_pth(shared_dir / "fixtures/fid" / name)
  assert sorted(got) == sorted(expected)
  for k, want in expected.items():
    assert got[k].dtype == want.dtype, k
    assert got[k].shape == want.shape, k
    np.testing.assert_array_equal(got[k], want, err_msg=k)
  # Views share a storage in the file but come back as independent contiguous arrays.
  np.testing.assert_array_equal(got["_loadertest.row_view"], got["_loadertest.base"][2])
  np.testing.assert_array_equal(got["_loadertest.transposed"], got["_loadertest.base"].T)
  assert got["_loadertest.transposed"].flags.c_contiguous
  assert got["_loadertest.int64_scalar"].shape == () and int(got["_loadertest.int64_scalar"]) == 7


def test_state_dict_metadata_kept_on_object(shared_dir):
  obj = load_pth_object(shared_dir / "fixtures/fid/loader_test_zip.pth")
  assert isinstance(obj, dict) and "fc.bias" in obj


def test_gzip_compressed_checkpoint(shared_dir, expected, tmp_path):
  raw = (shared_dir / "fixtures/fid/loader_test_zip.pth").read_bytes()
  p = tmp_path / "x.pth.gz"
  p.write_bytes(gzip.compress(raw))
  np.testing.assert_array_equal(load_pth(p)["fc.bias"], expected["fc.bias"])


@pytest.mark.parametrize("name", ["loader_test_zip.pth", "loader_test_legacy.pth"])
@pytest.mark.parametrize("keep", [0.3, 0.9, 0.999])
def test_truncated_file_gives_clear_error(shared_dir, tmp_path, name, keep):
  raw = (shared_dir / "fixtures/fid" / name).read_bytes()
  p = tmp_path / name
  p.write_bytes(raw[: int(len(raw) * keep)])
  with pytest.raises(CheckpointReadError, match=str(p)):
    load_pth(p)


def test_corrupted_bytes_give_clear_error(tmp_path):
  p = tmp_path / "garbage.pth"
  p.write_bytes(b"\x00not a checkpoint at all" * 10)
  with pytest.raises(CheckpointReadError, match="garbage.pth"):
    load_pth(p)


def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.pth"):
    load_pth(tmp_path / "nope.pth")


class _Evil:
  def __reduce__(self):
    return (print, ("code ran",))


def _legacy_bytes(obj) -> bytes:
  parts = [0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}, obj, []]  # magic, protocol, sys info, obj, keys
  return b"".join(pickle.dumps(p, protocol=2) for p in parts)


def test_refuses_arbitrary_code(tmp_path, capsys):
  p = tmp_path / "evil.pth"
  p.write_bytes(_legacy_bytes({"x": _Evil()}))
  with pytest.raises(CheckpointReadError, match="print"):
    load_pth(p)
  # Even when unknown objects are allowed, they become inert records: nothing is executed.
  obj = load_pth_object(p, allow_unknown_objects=True)
  assert isinstance(obj["x"], OpaqueObject) and obj["x"].qualname.endswith(".print")
  assert "code ran" not in capsys.readouterr().out


@pytest.mark.parametrize("pth,npz", [("var/vae_shared.pth", "var/vae_shared.npz"),
                                     ("var/T1/var.pth", "var/T1/var.npz")])
def test_official_fixture_checkpoints_match_their_npz(shared_dir, pth, npz):
  got = load_pth(shared_dir / "fixtures" / pth)
  with np.load(shared_dir / "fixtures" / npz) as want:
    assert sorted(got) == sorted(want.files)
    for k in want.files:
      assert got[k].dtype == want[k].dtype, k
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
