"""Convert official PyTorch VAR checkpoints into a var-jax model directory (no torch needed).

  python -m var.convert --vae vae_ch160v4096z32.pth --out models/var_d16 [--preset vqvae_256|vqvae_512]
                        [--vae_config cfg.json] [--var var_d16.pth [--var_preset d16] [--var_dtype bfloat16]]
                        [--overwrite]

The checkpoint is read and loaded strictly (every missing / unexpected / mis-shaped key is reported) before anything
is written; the directory is then written atomically (see var/pretrained.py) and loads with
`var.pretrained.load_tokenizer(DIR)` (and, with --var, `var.pretrained.load_var(DIR)`). The VAR architecture is
read off the checkpoint (depth, width, heads, patch_nums, shared AdaLN, ...); --var_preset additionally asserts it.
"""

import argparse
import json
import os
import sys
import time

from tokenizer.official import load_official_vqvae
from tokenizer.torch_pth import load_pth
from tokenizer.vqvae import PRESETS, VQVAEConfig
from var import pretrained


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m var.convert", description=__doc__.split("\n\n")[0])
  p.add_argument("--vae", required=True, help="official VQVAE state dict (.pth), e.g. vae_ch160v4096z32.pth")
  p.add_argument("--out", required=True, help="model directory to write")
  p.add_argument(
    "--preset",
    default="vqvae_256",
    choices=sorted(PRESETS),
    help="VQVAE architecture + patch_nums (vqvae_256: 256px, vqvae_512: 512px; same weights)",
  )
  p.add_argument(
    "--vae_config",
    default=None,
    help="JSON file of VQVAEConfig fields overriding the preset (e.g. {\"patch_nums\": [1, 2, 4, 8, 16]})",
  )
  p.add_argument("--var", default=None, help="official VAR transformer state dict (.pth), e.g. var_d16.pth, or a "
                 "trainer checkpoint ar-ckpt-*.pth")
  p.add_argument("--var_preset", default=None, choices=["d16", "d20", "d24", "d30", "d36"],
                 help="expected VAR model (checked against the checkpoint); default: inferred from the weights")
  p.add_argument("--var_dtype", default="float32", choices=["float32", "bfloat16"],
                 help="activation dtype stored in the VAR config (parameters stay float32)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
  return p


def vae_config_from_args(args: argparse.Namespace) -> VQVAEConfig:
  """The VQVAEConfig chosen by --preset and --vae_config."""
  overrides = {}
  if args.vae_config:
    with open(args.vae_config) as f:
      overrides = json.load(f)
    if not isinstance(overrides, dict):
      raise ValueError(f"--vae_config {args.vae_config} must hold a JSON object of VQVAEConfig fields")
  return VQVAEConfig.from_dict({**PRESETS[args.preset].to_dict(), **overrides})


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  if os.path.exists(args.out) and not args.overwrite:
    raise SystemExit(f"error: {args.out} already exists; pass --overwrite or choose another --out")
  if not os.path.isfile(args.vae):
    raise SystemExit(f"error: --vae {args.vae} is not a file")
  config = vae_config_from_args(args)
  t0 = time.time()
  if args.var is not None and not os.path.isfile(args.var):
    raise SystemExit(f"error: --var {args.var} is not a file")
  try:
    vae = load_official_vqvae(load_pth(args.vae), config)
  except ValueError as e:  # strict-load report or unreadable checkpoint: nothing has been written
    raise SystemExit(f"error: cannot convert {args.vae}:\n{e}") from e
  var = var_config = None
  if args.var is not None:
    try:
      var, var_config = load_official_var(args.var, config, args.var_preset, args.var_dtype)
    except ValueError as e:
      raise SystemExit(f"error: cannot convert {args.var}:\n{e}") from e
  out = pretrained.save_pretrained(args.out, tokenizer=vae, tokenizer_config=config, var=var, var_config=var_config,
                                   overwrite=args.overwrite)
  what = f"tokenizer from {args.vae}" + (f", VAR depth {var_config.depth} from {args.var}" if var else "")
  print(f"wrote {out} ({what}, patch_nums {config.patch_nums}) in {time.time() - t0:.1f}s")
  return 0


def load_official_var(path: str, vae_config: VQVAEConfig, preset: str | None = None, dtype: str = "float32"):
  """Reads an official VAR .pth strictly; its architecture must fit the VQVAE config. -> (VAR, VARConfig)."""
  from var import official
  from var.model import abstract
  from var.model import preset as var_preset

  sd = official.unwrap_checkpoint(load_pth(path))
  config = official.config_from_state_dict(sd, dtype=dtype)
  if preset is not None:
    expected = var_preset(preset, dtype=dtype, init_adaln_gamma=config.init_adaln_gamma)
    if expected != config:
      diff = {k: (v, getattr(config, k)) for k, v in expected.to_dict().items()
              if v != config.to_dict()[k]}
      raise ValueError(f"--var_preset {preset} does not match the checkpoint (field: (preset, checkpoint)) {diff}")
  mismatch = {k: (getattr(config, k), getattr(vae_config, k)) for k in ("patch_nums", "vocab_size", "z_channels")
              if getattr(config, k) != getattr(vae_config, k)}
  if mismatch:
    raise ValueError(f"the VAR checkpoint does not fit the VQVAE config (field: (var, vqvae)) {mismatch}; pick the "
                     f"VQVAE preset with the same patch_nums (e.g. --preset vqvae_512 for var_d36)")
  return official.load_state_dict(abstract(config), sd), config


if __name__ == "__main__":
  sys.exit(main())
