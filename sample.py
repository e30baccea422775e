"""Sample images from a var-jax model directory (VQVAE + VAR transformer).

  python sample.py --checkpoint models/var_d16 --classes 207,360 --num_per_class 4 --out out/samples
  python sample.py --checkpoint models/var_d16 --num_per_class 50 --cfg 1.5 --top_k 900 --top_p 0.96 \\
                   --batch_size 64 --out out/fid50k          # 50 per class over all classes: the FID protocol
  python sample.py --checkpoint models/var_d16 --classes 1000 --image photo.png --mask 0.1,0.1,0.8,0.8 \\
                   --edit outpaint --out out/edit            # zero-shot out-painting (class 1000 = null class)

Writes OUT/grid.png (every sample), OUT/images/NNNNNN_classCCC.png and OUT/samples.npz (ADM-style: arr_0 uint8
NHWC, arr_1 labels). The sampler is compiled once ahead of time (persistent compilation cache on) and then run
over batches of --batch_size, which must be a multiple of the number of devices (the batch is split over all
devices). Sample i uses seed --seed + i, so images do not depend on --batch_size or the device count.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from var.sampler import sample_images  # noqa: F401  (the Python entry point: training loop, demo)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python sample.py", description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", required=True, help="model directory (var/pretrained.py; python -m var.convert)")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--classes", default=None, help="comma-separated class ids (num_classes = unconditional); "
                 "default: every class")
  p.add_argument("--num_per_class", type=int, default=1, help="samples per listed class")
  p.add_argument("--cfg", type=float, default=1.5, help="classifier-free guidance scale (ramped over the scales)")
  p.add_argument("--top_k", type=int, default=900, help="keep the k most likely tokens (0 = off)")
  p.add_argument("--top_p", type=float, default=0.96, help="nucleus sampling mass (0 = off)")
  p.add_argument("--temperature", type=float, default=1.0, help="divides the filtered logits")
  p.add_argument("--more_smooth", action="store_true", help="official Gumbel-softmax smoothing (visuals, not FID)")
  p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
  p.add_argument("--batch_size", type=int, default=None, help="samples per step, split over all devices "
                 "(default: min(N, 32) rounded up to the device count)")
  p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                 help="activation dtype of the transformer (default: as saved)")
  p.add_argument("--image", default=None, help="image to edit (zero-shot in/out-painting; resized to the model's "
                 "resolution)")
  p.add_argument("--mask", default=None, help="box y0,x0,y1,x1 in [0, 1] image fractions for --image")
  p.add_argument("--edit", default="outpaint", choices=["outpaint", "inpaint"],
                 help="outpaint: keep the image inside the box; inpaint: regenerate the box")
  p.add_argument("--grid_cols", type=int, default=None, help="columns of grid.png (default: num_per_class, or 8)")
  p.add_argument("--grid_scale", type=int, default=None, help="nearest-neighbour upscaling of grid.png tiles "
                 "(default: the smallest factor giving tiles of at least 64 px); grid.txt names each row's classes")
  p.add_argument("--compilation_cache", default=os.path.expanduser("~/.cache/var-jax/jax"),
                 help="persistent XLA compilation cache directory ('' = off)")
  p.add_argument("--no_progress", action="store_true", help="no progress bar")
  return p


def _parse_classes(text: str | None, num_classes: int) -> list[int]:
  if text is None:
    return list(range(num_classes))
  try:
    classes = [int(c) for c in text.split(",") if c.strip()]
  except ValueError as e:
    raise ValueError(f"--classes {text!r} must be comma-separated integers, e.g. 207,360") from e
  bad = [c for c in classes if not 0 <= c <= num_classes]
  if bad or not classes:
    raise ValueError(f"--classes {text!r}: class ids {bad} out of range; this model has classes 0..{num_classes - 1} "
                     f"(and {num_classes} = unconditional)")
  return classes


def _parse_box(text: str) -> tuple[float, ...]:
  try:
    box = tuple(float(v) for v in text.split(","))
  except ValueError:
    box = ()
  if len(box) != 4:
    raise ValueError(f"--mask {text!r} must be four numbers y0,x0,y1,x1 in [0, 1], e.g. 0.1,0.1,0.8,0.8")
  return box


def _load_image(path: str, size: int) -> np.ndarray:
  """(size, size, 3) float32 in [-1, 1]: centre crop to a square, then resize (bicubic)."""
  from PIL import Image

  img = Image.open(path).convert("RGB")
  w, h = img.size
  s = min(w, h)
  img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size),
                                                                                           Image.BICUBIC)
  return np.asarray(img, np.float32) / 127.5 - 1.0


def run(args: argparse.Namespace) -> dict:
  """Samples per the parsed arguments; returns a summary dict (paths, timings, sampler trace count)."""
  import jax

  if args.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

  from flax import nnx
  from PIL import Image

  from var import editing, pretrained, sampler
  from var import sharding as shd

  if args.num_per_class < 1:
    raise ValueError(f"--num_per_class {args.num_per_class} must be >= 1")
  if args.grid_scale is not None and args.grid_scale < 1:
    raise ValueError(f"--grid_scale {args.grid_scale} must be >= 1 (an integer upscaling factor)")
  if (args.image is None) != (args.mask is None):
    raise ValueError("--image and --mask go together (zero-shot editing needs both)")
  box = _parse_box(args.mask) if args.mask else None
  meta = pretrained.read_config(args.checkpoint)
  if not isinstance(meta.get("var"), dict):
    raise ValueError(f"{args.checkpoint} holds no VAR transformer (tokenizer only); convert one with "
                     "python -m var.convert --var var_dXX.pth or train one")
  num_classes = int(meta["var"].get("num_classes", 1000))
  classes = _parse_classes(args.classes, num_classes)
  vocab = int(meta["var"].get("vocab_size", 4096))
  if args.top_k > vocab:
    raise ValueError(f"--top_k {args.top_k} exceeds the model's vocabulary of {vocab} tokens; use --top_k <= {vocab} "
                     "(0 = off)")
  labels = np.repeat(np.asarray(classes, np.int32), args.num_per_class)
  n = labels.shape[0]
  devices = jax.device_count()
  batch = args.batch_size or -(-min(n, 32) // devices) * devices
  if batch % devices:
    raise ValueError(f"--batch_size {batch} is not divisible by the {devices} devices; use a multiple of {devices}")
  sampling = sampler.SamplingConfig(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p,
                                    temperature=args.temperature, more_smooth=args.more_smooth)

  t0 = time.perf_counter()
  var, var_config, vae, vae_config = pretrained.load_pretrained(args.checkpoint)
  if args.dtype and args.dtype != var_config.dtype:
    from var.model import VAR

    var_config = var_config.__class__(**{**var_config.to_dict(), "dtype": args.dtype})
    with nnx.use_eager_sharding(False):
      fresh = nnx.eval_shape(lambda: VAR(var_config, rngs=nnx.Rngs(0)))
    nnx.update(fresh, nnx.state(var, nnx.Param))
    var = fresh
  load_s = time.perf_counter() - t0
  edit_args = None
  if args.image is not None:
    size = vae_config.image_size
    img = jax.numpy.asarray(_load_image(args.image, size))[None]
    p = vae_config.patch_nums[-1]
    mask = editing.outpaint_mask(p, box) if args.edit == "outpaint" else editing.inpaint_mask(p, box)
    one = editing.edit_inputs(vae, img, mask)
    edit_args = {k: np.repeat(np.asarray(v), batch, axis=0) for k, v in one.items()}

  mesh = shd.make_mesh((devices, 1, 1)) if devices > 1 else None
  s = sampler.Sampler(var, vae, sampling, mesh=mesh)
  compile_s = s.compile(batch, edit=edit_args is not None)

  seeds = (args.seed + np.arange(n)).astype(np.uint32)
  images = []
  starts = range(0, n, batch)
  if not args.no_progress:
    from tqdm import tqdm

    starts = tqdm(starts, desc=f"sampling {n} images", unit="batch")
  t1 = time.perf_counter()
  for start in starts:
    lab, sd = labels[start:start + batch], seeds[start:start + batch]
    pad = batch - lab.shape[0]
    if pad:  # the last batch is padded to the compiled size; padding samples are dropped
      lab, sd = np.concatenate([lab, np.repeat(lab[-1:], pad)]), np.concatenate([sd, np.repeat(sd[-1:], pad)])
    out = s(lab, sd, edit_args)
    images.append(np.asarray(jax.device_get(out["images"]))[:batch - pad])
  images = np.concatenate(images)
  sample_s = time.perf_counter() - t1

  os.makedirs(os.path.join(args.out, "images"), exist_ok=True)
  u8 = np.clip(np.round(images * 255), 0, 255).astype(np.uint8)  # (N, H, W, 3)
  for i, (im, c) in enumerate(zip(u8, labels, strict=True)):
    Image.fromarray(im).save(os.path.join(args.out, "images", f"{i:06d}_class{c:04d}.png"))
  np.savez(os.path.join(args.out, "samples.npz"), arr_0=u8, arr_1=labels.astype(np.int64))
  cols = args.grid_cols or (args.num_per_class if args.num_per_class > 1 else min(n, 8))
  grid_path = _save_grid(u8, os.path.join(args.out, "grid.png"), cols, args.grid_scale)
  _save_grid_legend(labels, os.path.join(args.out, "grid.txt"), cols)
  return {"num_images": n, "batch_size": batch, "devices": devices, "load_s": load_s, "compile_s": compile_s,
          "sample_s": sample_s, "images_per_s": n / sample_s, "grid": grid_path, "trace_count": s.trace_count,
          "npz": os.path.join(args.out, "samples.npz")}


def _save_grid(u8: np.ndarray, path: str, cols: int, scale: int | None = None) -> str:
  from PIL import Image

  if scale is None:  # small images (16px digits) become tiles a person can see
    scale = max(1, -(-64 // min(u8.shape[1:3])))
  u8 = u8.repeat(scale, axis=1).repeat(scale, axis=2)
  n, h, w, _ = u8.shape
  rows = -(-n // cols)
  grid = np.full((rows * (h + 2) + 2, cols * (w + 2) + 2, 3), 255, np.uint8)
  for i, im in enumerate(u8):
    r, c = divmod(i, cols)
    grid[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + c * (w + 2):2 + c * (w + 2) + w] = im
  Image.fromarray(grid).save(path)
  return path


def _save_grid_legend(labels: np.ndarray, path: str, cols: int) -> str:
  """grid.txt: one line per row of grid.png naming the classes of its tiles (the grid's caption)."""
  rows = [labels[i:i + cols] for i in range(0, len(labels), cols)]
  lines = [f"row {r}: classes {','.join(str(int(c)) for c in row)}" for r, row in enumerate(rows)]
  with open(path, "w") as f:
    f.write("grid.png, left to right, top to bottom\n" + "\n".join(lines) + "\n")
  return path


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    summary = run(args)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"error: {e}") from e
  print(f"wrote {summary['num_images']} images to {args.out} (grid {summary['grid']}, {summary['npz']}): "
        f"compile {summary['compile_s']:.1f}s, {summary['images_per_s']:.3f} images/s on {summary['devices']} "
        "device(s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
