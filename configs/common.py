"""Helpers shared by the config files: big_vision-style argument parsing and the common training fields."""

import ast

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses `"depth=16,runlocal"` into a ConfigDict over `defaults` (big_vision's `parse_arg`).

  A bare `key` sets a boolean default to True; values are read as Python literals when possible (so `depth=16`
  is an int and `cfg=1.5` a float), else kept as strings. Unknown keys raise, so a typo in `--config f.py:arg`
  fails before any work starts.
  """
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  for item in arg.split(","):
    item = item.strip()
    if not item:
      continue
    key, sep, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"Unknown config argument {key!r} in {arg!r}; valid arguments: {sorted(defaults)}")
    if not sep:
      if not isinstance(defaults[key], bool):
        raise ValueError(f"Config argument {key!r} needs a value ({key}=...), got a bare flag in {arg!r}")
      out[key] = True
      continue
    try:
      parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      parsed = value
    if isinstance(defaults[key], bool) and isinstance(parsed, int):
      parsed = bool(parsed)
    out[key] = type(defaults[key])(parsed) if defaults[key] is not None else parsed
  return out


def parse_patch_nums(text: str | tuple) -> tuple[int, ...]:
  """`"1-2-4-8"` (the form a `--config f.py:patch_nums=...` argument can carry) -> (1, 2, 4, 8)."""
  if isinstance(text, (tuple, list)):
    return tuple(int(p) for p in text)
  try:
    return tuple(int(p) for p in str(text).split("-"))
  except ValueError:
    raise ValueError(f"patch_nums={text!r} must be dash-separated side lengths, e.g. 1-2-4-8") from None


def input_config(name: str = "digits", *, resolution: int, batch_size: int,
                 **kw) -> ml_collections.ConfigDict:
  """The `config.input` block: exactly the fields of var/data.py `InputConfig`."""
  i = ml_collections.ConfigDict()
  i.name = name
  i.data_dir = ml_collections.FieldReference(None, field_type=str)
  i.train_split = "train"
  i.eval_split = ml_collections.FieldReference(None, field_type=str)
  i.resolution = resolution
  i.batch_size = batch_size
  i.eval_batch_size = ml_collections.FieldReference(None, field_type=int)
  i.crop_scale = 1.125
  i.hflip = False
  i.upsample = "nearest"
  i.workers = 0
  i.read_threads = 2
  # VAR stages: train on the token pyramids written by `python -m var.tokenize_dataset` (var/token_data.py)
  i.tokens_dir = ml_collections.FieldReference(None, field_type=str)
  i.update(kw)
  return i


def base_config() -> ml_collections.ConfigDict:
  """Fields every stage shares: mesh, checkpoints, logging, precision.

  The stage-specific files fill in `input`, the model section and `optim`.
  """
  c = ml_collections.ConfigDict()
  c.stage = ""  # "tokenizer", "var", "code_drafter" or "code_refiner" (var/train_lib.py STAGES)
  c.seed = 0
  c.total_steps = 1000
  # Mesh over ("data", "fsdp", "tensor"); -1 takes the remaining devices. Logical rules live in
  # var/sharding.py.
  c.mesh = (-1, 1, 1)
  # Multi-host: call jax.distributed.initialize() (also triggered by the usual coordinator env variables).
  c.distributed = False
  # Activations dtype; parameters and optimizer state always stay float32.
  c.dtype = "float32"
  # A step whose loss or gradient norm is NaN/inf stops the run with an error (no checkpoint of the bad state
  # is written). True instead skips such steps (no update; counted as `skipped_nonfinite` in the metrics).
  c.skip_nonfinite = False

  c.log_every_steps = 50
  c.eval_every_steps = 500
  c.eval_batches = 4  # held-out batches per evaluation (0: the whole held-out split)
  c.sample_every_steps = 0  # 0: no sample grids during training (VAR stage)
  c.sample_classes = ()  # classes of the grid; () = the first 10
  c.sample_kwargs = ml_collections.ConfigDict({"cfg": 1.5, "top_k": 0, "top_p": 0.0, "seed": 0})

  c.ckpt = ml_collections.ConfigDict()
  c.ckpt.every_steps = 500
  c.ckpt.max_to_keep = 2
  c.ckpt.async_save = True
  return c


def optim_config(*, tblr: float, warmup_steps: int, schedule: str = "lin0", end_ratio: float = 0.01,
                 weight_decay: float = 0.05,
                 weight_decay_end: float | None = None) -> ml_collections.ConfigDict:
  """The official VAR optimizer recipe (VAR.md section 3): AdamW(0.9, 0.95), lr = tblr * batch / 256, warmup
  from 0.005 * peak, `lin0` decay to `end_ratio` * peak, cosine weight-decay schedule, grad clip 2.0."""
  o = ml_collections.ConfigDict()
  o.tblr = tblr  # base lr per 256 images; peak lr = tblr * global_batch / 256
  o.b1 = 0.9
  o.b2 = 0.95
  o.eps = 1e-8
  o.schedule = schedule  # lin0 | lin | lin00 | cos | exp | linX (X = float plateau fraction)
  o.warmup_steps = warmup_steps
  o.warmup_start = 0.005  # wp0: warmup starts at this fraction of the peak
  o.end_ratio = end_ratio  # wpe: final lr = end_ratio * peak
  o.weight_decay = weight_decay  # twd
  o.weight_decay_end = weight_decay if weight_decay_end is None else weight_decay_end  # twde
  o.grad_clip = 2.0
  return o


def tokenizer_loss_config(**kw) -> ml_collections.ConfigDict:
  """The tokenizer-stage `config.loss` block (see var/train_lib.py `tokenizer_train_step`)."""
  loss = ml_collections.ConfigDict()
  loss.l1_weight = 1.0  # mean |rec - x|
  loss.l2_weight = 0.0  # mean (rec - x)^2
  loss.vq_weight = 1.0  # beta * commitment + codebook term of the VQVAE's training forward (VAR.md 1.6)
  # "grad": the codebook term trains the codebook; "ema": EMA of the vectors assigned to each code
  loss.codebook_update = "grad"
  loss.ema_decay = 0.99  # usage statistics (and the EMA codebook)
  loss.restart_every = 100  # dead-code restart period in steps (0: never)
  loss.restart_threshold = 0.03  # dead: EMA usage below this fraction of a uniform code's share
  loss.lpips_weight = 0.0
  loss.lpips_vgg_weights = ""  # local torchvision vgg16-397923af.pth
  loss.lpips_lin_weights = ""  # local lpips weights/v0.1/vgg.pth
  loss.gan_weight = 0.0  # PatchGAN (hinge) with taming's adaptive weight; 0 disables the discriminator
  loss.gan_start_step = 0
  loss.disc_base_channels = 64
  loss.disc_layers = 3
  loss.disc_tblr = 1e-4  # discriminator Adam lr per 256 images
  loss.disc_b1 = 0.5
  loss.disc_b2 = 0.9
  loss.update(kw)
  return loss


def make_runlocal(c: ml_collections.ConfigDict) -> None:
  """Shrinks a full-scale recipe to a few steps of small batches (`:runlocal`, plumbing checks), in place."""
  c.total_steps = 4
  c.input.batch_size = 8
  c.input.workers = 0
  c.log_every_steps = 1
  c.eval_every_steps = 0
  c.eval_batches = 1
  c.sample_every_steps = 0
  c.ckpt.every_steps = 2
