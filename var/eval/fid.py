"""The bundled FID evaluator: FID, sFID, Inception Score and precision/recall with ADM-evaluator semantics.

  python -m var.eval.fid --samples samples.npz --ref VIRTUAL_imagenet256_labeled.npz \
      --inception_weights pt_inception-2015-12-05-6726825d.pth

Samples: an ADM-style .npz (arr_0 uint8 NHWC, what sample.py writes), a folder of PNG/JPEG images, or a tfds split
(`tfds:name/split`, with --data_dir). Reference: an ADM reference batch .npz (mu, sigma, mu_s, sigma_s, arr_0) or a
file this script wrote with --save_stats (which turns any input into a reference batch of the same format).
Prints ONE JSON line with every metric and the counts on stdout; progress and warnings go to stderr.

Features are extracted by one jitted function (uint8 batch -> resize/normalise -> Inception) per image size, with
the batch split over a 1-D mesh of all devices; the last batch is padded so the shape never changes. With several
processes (`--distributed`, or JAX_COORDINATOR_ADDRESS set) the mesh spans every host: each process reads only its
rows of every batch, the features are gathered onto every process, and process 0 prints and writes.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from var.eval import inception as inception_lib
from var.eval import metrics, reference
from var.eval.preprocess import canonical_mode, preprocess, validate_images

__all__ = ["FEATURE_KEYS", "compute_features", "evaluate", "main", "make_mesh"]

FEATURE_KEYS = ("pool3", "spatial", "logits_unbiased")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
PR_NEIGHBORS = 3  # ADM's nhood_sizes=(3,)


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """1-D data-parallel mesh ("data",) over all (or the given) devices."""
  devices = np.asarray(devices if devices is not None else jax.devices())
  return jax.sharding.Mesh(devices.reshape(-1), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


@functools.partial(jax.jit, static_argnames=("graphdef", "mode"))
def _features(graphdef, state, images, mode):
  """uint8 (B, H, W, 3) -> {pool3 (B, 2048), spatial (B, 2023), logits_unbiased (B, 1008)}, float32."""
  out = nnx.merge(graphdef, state)(preprocess(images, mode))
  return {k: out[k] for k in FEATURE_KEYS}


def compute_features(source: reference.ImageSource, model: inception_lib.InceptionV3FID, *, mode: str = "adm",
                     batch_size: int = 200, mesh: jax.sharding.Mesh | None = None, limit: int | None = None,
                     progress: bool = True) -> dict[str, np.ndarray]:
  """Inception features of every image of `source` (the first `limit`), as float32 numpy arrays on the host.

  `batch_size` is the global batch; it is rounded up to a multiple of the device count. The last batch is padded
  with zeros (and the padding dropped) so that one compiled executable serves all batches.
  """
  from tqdm import tqdm

  mode = canonical_mode(mode)
  mesh = mesh or make_mesh()
  n_dev = mesh.devices.size
  batch_size = -(-batch_size // n_dev) * n_dev
  graphdef, state = nnx.split(model)
  # replicated weights (from host values, which every process holds: device_put spans all processes' devices)
  state = jax.device_put(jax.tree.map(np.asarray, state), NamedSharding(mesh, P()))
  data_sharding = NamedSharding(mesh, P("data"))
  lo, hi = _local_rows(data_sharding, batch_size)  # this process's rows of every global batch
  total = source.num_images if limit is None else min(limit, source.num_images)
  out = {k: [] for k in FEATURE_KEYS}
  pending = None  # (device result, valid count): fetching one batch overlaps computing the previous one

  def collect(item):
    result, valid = item
    if jax.process_count() > 1:  # every process gets every feature: the statistics are computed on each
      result = multihost_utils.process_allgather(result, tiled=True)
    for k in FEATURE_KEYS:
      out[k].append(np.asarray(result[k])[:valid])

  bar = tqdm(total=total, desc=f"inception {source.name}", unit="img",
             disable=not progress or jax.process_index() != 0, file=sys.stderr, leave=False)
  for start in range(0, total, batch_size):
    valid = min(batch_size, total - start)
    # Each process reads only its own rows [start + lo, start + hi); rows past the end are zero padding.
    a, b = min(start + lo, total), min(start + hi, total)
    rows = source.read(a, b) if b > a else np.zeros((0, *source.image_shape), np.uint8)
    if b > a:
      validate_images(rows, f"{source.name}[{a}:{b}]")
    if len(rows) < hi - lo:
      rows = np.concatenate([rows, np.zeros((hi - lo - len(rows), *source.image_shape), np.uint8)])
    batch = jax.make_array_from_process_local_data(data_sharding, rows, (batch_size, *rows.shape[1:]))
    result = _features(graphdef, state, batch, mode)
    if pending is not None:
      collect(pending)
    pending = (result, valid)
    bar.update(valid)
  if pending is not None:
    collect(pending)
  bar.close()
  return {k: np.concatenate(v).astype(np.float32) for k, v in out.items()}


def _local_rows(sharding: NamedSharding, batch_size: int) -> tuple[int, int]:
  """[lo, hi): the rows of a (batch_size, ...) array split by `sharding` that this process's devices hold
  (contiguous for a 1-D data mesh whose devices are ordered by process, as jax.devices() is)."""
  spans = sorted({(idx[0].start or 0, idx[0].stop or batch_size)
                  for idx in sharding.addressable_devices_indices_map((batch_size,)).values()})
  lo, hi = spans[0][0], spans[-1][1]
  if sum(b - a for a, b in spans) != hi - lo:
    raise ValueError(f"the mesh gives process {jax.process_index()} non-contiguous batch rows {spans}; build it "
                     "from jax.devices() in their order (var.eval.fid.make_mesh())")
  return lo, hi


def evaluate(sample_feats: dict[str, np.ndarray], ref: reference.ReferenceBatch | None,
             ref_feats: dict[str, np.ndarray] | None, *, is_variant: str = "adm") -> dict:
  """Every metric from precomputed features. `ref_feats` (features of the reference images) drive P/R, and the
  reference statistics when `ref` has none stored. IS comes from the samples' logits (no bias)."""
  out = {"fid": None, "sfid": None, "inception_score": None, "inception_score_std": None, "precision": None,
         "recall": None, "num_samples": int(len(sample_feats["pool3"])), "num_ref_images": 0}
  if is_variant == "adm":
    out["inception_score"], out["inception_score_std"] = metrics.inception_score(sample_feats["logits_unbiased"])
  elif is_variant == "torch_fidelity":
    out["inception_score"], out["inception_score_std"] = metrics.inception_score(
      sample_feats["logits_unbiased"], split_size=None, splits=10, shuffle_seed=2020)
  else:
    raise ValueError(f"is_variant={is_variant!r}: use 'adm' (chunks of 5000, no shuffle) or 'torch_fidelity'")
  if ref is None:
    return out
  mu, sigma = metrics.feature_statistics(sample_feats["pool3"])
  mu_s, sigma_s = metrics.feature_statistics(sample_feats["spatial"])
  if ref.has_stats:
    ref_stats = (ref.mu, ref.sigma, ref.mu_s, ref.sigma_s)
  else:
    ref_stats = (*metrics.feature_statistics(ref_feats["pool3"]), *metrics.feature_statistics(ref_feats["spatial"]))
  out["fid"] = metrics.frechet_distance(mu, sigma, ref_stats[0], ref_stats[1])
  out["sfid"] = metrics.frechet_distance(mu_s, sigma_s, ref_stats[2], ref_stats[3])
  if ref_feats is not None:
    out["num_ref_images"] = int(len(ref_feats["pool3"]))
    if min(out["num_ref_images"], out["num_samples"]) > PR_NEIGHBORS:
      out["precision"], out["recall"] = metrics.precision_recall(ref_feats["pool3"], sample_feats["pool3"],
                                                                 k=PR_NEIGHBORS)
    else:
      warnings.warn(f"precision/recall need more than {PR_NEIGHBORS} images per set (k-NN radii); got "
                    f"{out['num_samples']} samples and {out['num_ref_images']} reference images", stacklevel=2)
  return out


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m var.eval.fid", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--samples", required=True, help="sample .npz (arr_0 uint8 NHWC), image folder, or tfds:name/split")
  p.add_argument("--ref", help="ADM reference batch .npz (mu, sigma, mu_s, sigma_s, arr_0) or a --save_stats file")
  p.add_argument("--inception_weights", help=f"{inception_lib.WEIGHTS_FILENAME} (.pth, .pth.gz or .npz); "
                 f"default ${inception_lib.WEIGHTS_ENV_VAR}")
  p.add_argument("--preprocess", default="adm", choices=["adm", "tf1", "pytorch_fid"],
                 help="adm/tf1: TF1 resize and (x-128)/128 as in the ADM evaluator; pytorch_fid: half-pixel resize")
  p.add_argument("--batch_size", type=int, default=200, help="global batch (rounded up to a multiple of devices)")
  p.add_argument("--compute_dtype", default="float32", choices=sorted(DTYPES))
  p.add_argument("--save_stats", help="write the samples as an ADM reference batch (stats + arr_0) to this .npz")
  p.add_argument("--save_images", type=int, default=10000,
                 help="how many of the images --save_stats stores in arr_0 (ADM's ImageNet batch has 10000)")
  p.add_argument("--max_samples", type=int, help="use only the first N samples")
  p.add_argument("--is_variant", default="adm", choices=["adm", "torch_fidelity"],
                 help="Inception Score: adm (chunks of 5000) or torch_fidelity (10 shuffled splits, seed 2020)")
  p.add_argument("--data_dir", help="tfds data_dir for tfds:name/split inputs")
  p.add_argument("--center_crop", type=int, help="ADM center_crop_arr to this size (folder and tfds inputs)")
  p.add_argument("--no_progress", action="store_true", help="no progress bars")
  p.add_argument("--distributed", action="store_true",
                 help="multi-host: jax.distributed.initialize() (also when JAX_COORDINATOR_ADDRESS is set); every "
                      "process reads its share of each batch, process 0 prints and writes")
  return p


def main(argv: list[str] | None = None) -> dict:
  """Run the evaluator; prints the JSON line and returns it as a dict."""
  args = _parser().parse_args(argv)
  from var import sharding

  sharding.maybe_initialize_distributed(True if args.distributed else None)  # before any other jax call
  t0 = time.time()
  if args.ref is None and args.save_stats is None:
    raise SystemExit("nothing to do: give --ref (to evaluate) and/or --save_stats (to make a reference batch)")
  if args.batch_size <= 0:
    raise SystemExit(f"--batch_size must be positive, got {args.batch_size}")
  mode = canonical_mode(args.preprocess)
  # Open (and validate) every input before the slow part: weights, then images, then the reference.
  weights = inception_lib.resolve_weights_path(args.inception_weights)
  samples = reference.open_images(args.samples, args.data_dir, args.center_crop)
  ref = reference.load_reference(args.ref) if args.ref else None
  n_samples = samples.num_images if args.max_samples is None else min(args.max_samples, samples.num_images)
  if n_samples < 2:
    raise SystemExit(f"{samples.name}: {n_samples} image(s); FID needs at least 2 (standard: 50000)")
  model = inception_lib.load_inception(weights, DTYPES[args.compute_dtype])
  mesh = make_mesh()
  kw = dict(model=model, mode=mode, batch_size=args.batch_size, mesh=mesh, progress=not args.no_progress)

  sample_feats = compute_features(samples, limit=n_samples, **kw)
  ref_feats = None
  if ref is not None and ref.images is not None:
    ref_feats = compute_features(ref.images, **kw)
  elif ref is not None:
    warnings.warn(f"{args.ref} has no arr_0 images: precision/recall are not computed", stacklevel=1)
  result = evaluate(sample_feats, ref, ref_feats, is_variant=args.is_variant)

  if args.save_stats and jax.process_index() == 0:
    mu, sigma = metrics.feature_statistics(sample_feats["pool3"])
    mu_s, sigma_s = metrics.feature_statistics(sample_feats["spatial"])
    n_keep = min(args.save_images, n_samples)
    reference.save_reference(args.save_stats, mu, sigma, mu_s, sigma_s,
                             images=samples.batches(args.batch_size, limit=n_keep) if n_keep else None,
                             num_images=n_keep)
    result["saved_stats"] = args.save_stats
  result.update(samples=args.samples, ref=args.ref, preprocess=mode, compute_dtype=args.compute_dtype,
                inception_weights=str(weights), devices=mesh.devices.size, processes=jax.process_count(),
                seconds=round(time.time() - t0, 2))
  if jax.process_index() == 0:
    print(json.dumps(result), flush=True)
  return result


if __name__ == "__main__":
  main()
