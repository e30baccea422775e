"""CoDe (var/code.py) against the official CoDe sampler (fixtures/code), its hand-over prefill, plans, sampling
order, the compiled memory of the hand-over, and the drafter/refiner pair loading."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sample
from tokenizer import VQVAE, VQVAEConfig, load_official_vqvae
from var import code, official, pretrained
from var import model as var_model
from var import sampler as sampler_lib
from var.model import PATCH_NUMS_256
from var.plan import SelectStep

pytestmark = pytest.mark.usefixtures("fast_compile")


# ----------------------------------------------------------------------------------------------------------------
# Parity with the official CoDe sampler (two different random models on the shared VQVAE, 10 scales, greedy)

@pytest.fixture(scope="module")
def fixture_pair(shared_dir):
  root = shared_dir / "fixtures"
  vae = load_official_vqvae(dict(np.load(root / "var" / "vae_shared.npz")),
                            VQVAEConfig.preset("t1", patch_nums=PATCH_NUMS_256))
  models = {}
  for role in ("drafter", "refiner"):
    sd = dict(np.load(root / "code" / f"{role}.npz"))
    models[role] = official.load_state_dict(official.abstract(official.config_from_state_dict(sd)), sd)
  return models, vae, dict(np.load(root / "code" / "io.npz"))


@pytest.fixture(scope="module")
def fixture_runs(fixture_pair):
  """Our CoDe sampler's outputs for every draft_steps N of the fixture (greedy, cfg 1.5, CoDe's temperatures)."""
  models, vae, io = fixture_pair
  runs = {}
  for n in (3, 6, 8):
    s = code.code_sampler(models["drafter"], models["refiner"], vae, draft_steps=n, batch=3,
                          sampling=sampler_lib.SamplingConfig(cfg=1.5, top_k=1), temperatures="code",
                          return_logits=True)
    runs[n] = jax.device_get(s(io["labels"], np.arange(3)))
  return runs


def test_fixture_is_two_different_models_and_code_temperatures(fixture_pair, shared_dir):
  import json

  models, _, _ = fixture_pair
  d, r = models["drafter"].config, models["refiner"].config
  assert (d.depth, d.width, r.depth, r.width) == (3, 64, 2, 32)
  meta = json.loads((shared_dir / "fixtures" / "code" / "config.json").read_text())
  assert code.code_temperatures(10) == tuple(meta["temp"])  # CoDe's 1.1 x 7, 1.0 x 3


@pytest.mark.parametrize("n", [3, 6, 8])
def test_matches_official_code_sampler(fixture_pair, fixture_runs, n):
  """Tokens exact; the refiner's CFG logits of scale N from its prefill and the images within ~5x the error
  measured on CPU float32 (7.6e-6 and 2.5e-6)."""
  models, vae, io = fixture_pair
  out = fixture_runs[n]
  np.testing.assert_array_equal(out["tokens"], io[f"n{n}_idx_BL"])
  beg, end = models["drafter"].config.begin_ends[n]
  np.testing.assert_allclose(out["logits"][:, beg:end], io[f"n{n}_handover_logits"], atol=4e-5, rtol=0)
  np.testing.assert_allclose(out["images"].transpose(0, 3, 1, 2), io[f"n{n}_img"], atol=1.5e-5, rtol=0)
  # the next-scale inputs of scales 1..N the refiner prefills with (pre word embedding) follow from the tokens
  x = vae.idx_to_var_input(vae.split_tokens(jnp.asarray(out["tokens"])))
  np.testing.assert_allclose(x[:, :end - 1], io[f"n{n}_draft_next_inputs"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("n", [3, 8])
def test_refiner_prefill_equals_teacher_forcing(fixture_pair, fixture_runs, n):
  """After the hand-over the refiner's conditional logits (scale N from its one-pass prefill, later scales from
  its cache) equal its block-causal teacher-forced logits on the drafted tokens; the drafter's scales equal the
  drafter's. Two genuinely different models (depth 3 / width 64 and depth 2 / width 32)."""
  models, vae, io = fixture_pair
  out = fixture_runs[n]
  x = vae.idx_to_var_input(vae.split_tokens(jnp.asarray(out["tokens"])))
  labels = jnp.asarray(io["labels"])
  beg = models["drafter"].config.begin_ends[n][0]
  refiner_tf = np.asarray(models["refiner"](labels, x))
  drafter_tf = np.asarray(models["drafter"](labels, x))
  np.testing.assert_allclose(out["cond_logits"][:, beg:], refiner_tf[:, beg:], atol=1e-5, rtol=0)
  np.testing.assert_allclose(out["cond_logits"][:, :beg], drafter_tf[:, :beg], atol=1e-5, rtol=0)
  assert np.abs(refiner_tf[:, beg:] - drafter_tf[:, beg:]).max() > 0.1  # the models really differ


# ----------------------------------------------------------------------------------------------------------------
# N = S / N = 0 against the plain samplers, and the hand-over's compiled memory (tiny random pair, 4 scales)

B = 4


@pytest.fixture(scope="module")
def tiny_pair():
  pn = (1, 2, 3, 4)
  with nnx.use_eager_sharding(False):
    vae = VQVAE(VQVAEConfig.preset("t1"), rngs=nnx.Rngs(0))
  base = dict(vocab_size=64, z_channels=8, patch_nums=pn, num_classes=10, init_adaln_gamma=0.1, init_head=1.0)
  drafter = var_model.build(var_model.VARConfig(depth=8, width=64, num_heads=2, **base), seed=1)
  refiner = var_model.build(var_model.VARConfig(depth=1, width=256, num_heads=2, **base), seed=2)
  return drafter, refiner, vae


@pytest.fixture(scope="module")
def tiny_samplers(tiny_pair):
  """Compiled samplers: the plain drafter, the plain refiner and CoDe at N = 0, 2, 4 (top-k/top-p sampling)."""
  drafter, refiner, vae = tiny_pair
  sampling = sampler_lib.SamplingConfig(cfg=1.5, top_k=8, top_p=0.9)
  out = {"drafter": sampler_lib.Sampler(drafter, vae, sampling), "refiner": sampler_lib.Sampler(refiner, vae, sampling)}
  for n in (0, 2, 4):
    out[n] = code.code_sampler(drafter, refiner, vae, draft_steps=n, batch=B, sampling=sampling, temperatures=None)
  for s in out.values():
    s.compile(B)
  return out


def test_extremes_equal_the_plain_models(tiny_samplers):
  labels, seeds = np.array([1, 5, 9, 10]), np.arange(B) + 7
  run = {k: jax.device_get(s(labels, seeds)) for k, s in tiny_samplers.items()}
  for n, plain in ((4, "drafter"), (0, "refiner")):
    np.testing.assert_array_equal(run[n]["tokens"], run[plain]["tokens"])
    np.testing.assert_array_equal(run[n]["images"], run[plain]["images"])
  assert (run[2]["tokens"] != run[4]["tokens"]).any()  # the hand-over changes the samples (a real second model)
  assert (run[4]["tokens"] != run[0]["tokens"]).any()


def test_drafter_cache_freed_at_the_hand_over(tiny_pair, tiny_samplers):
  """The drafter's KV cache (8 layers, 3.9 MB here) is not live during the refiner's phase: the compiled temp
  bytes of CoDe N = 2 stay within a small margin of the refiner alone (they would exceed it by the cache if the
  drafter's cache stayed allocated; the refiner phase is the peak of this pair)."""
  drafter, _, _ = tiny_pair
  c = drafter.config
  drafter_cache = 2 * c.depth * 2 * B * c.seq_len * c.width * 4  # k and v, cond + uncond rows, float32
  temp = {k: tiny_samplers[k]._compiled[(B, False)].memory_analysis().temp_size_in_bytes for k in (2, "refiner")}
  assert temp[2] < temp["refiner"] + drafter_cache // 4, (temp, drafter_cache)


def test_search_before_the_hand_over_prefills_the_survivors(tiny_pair, tiny_samplers):
  """CoDe composed with candidate selection (TTS-VAR style) in the drafter phase: 4 candidates, 2 kept after scale
  1, hand-over at scale 2. The refiner's prefill builds its cache for the survivors only; its logits equal its
  teacher-forced logits on their drafted tokens."""
  drafter, refiner, vae = tiny_pair
  plan = code.code_plan((1, 2, 3, 4), B, 2).replace(1, select=SelectStep("pick", 2))
  plan = plan.replace(2, batch=2).replace(3, batch=2)
  hooks = sampler_lib.SamplerHooks(select={"pick": lambda ctx, key: jnp.asarray([3, 1])})
  s = sampler_lib.Sampler({"drafter": drafter, "refiner": refiner}, vae,
                          sampler_lib.SamplingConfig(cfg=1.5, top_k=8, top_p=0.9), plan=plan, hooks=hooks,
                          return_logits=True)
  labels, seeds = np.array([1, 5, 9, 10]), np.arange(B) + 7
  out = jax.device_get(s(labels, seeds))
  plain = jax.device_get(tiny_samplers[2](labels, seeds))
  np.testing.assert_array_equal(out["tokens"][:, :5], plain["tokens"][[3, 1], :5])  # the drafted scales 0, 1
  x = vae.idx_to_var_input(vae.split_tokens(jnp.asarray(out["tokens"])))
  np.testing.assert_allclose(out["cond_logits"][:, 5:], refiner(jnp.asarray(labels[[3, 1]]), x)[:, 5:], atol=1e-5,
                             rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Plans and CoDe's sampling order

def test_code_plan_and_its_errors():
  plan = code.code_plan(PATCH_NUMS_256, 16, 8, cfg=1.5, temperatures=code.code_temperatures(10))
  assert [s.model for s in plan.steps] == ["drafter"] * 8 + ["refiner"] * 2
  assert [s.temperature for s in plan.steps] == [1.1] * 7 + [1.0] * 3
  assert all(s.cfg_on and s.batch == 16 for s in plan.steps)
  assert code.code_plan((1, 2, 3, 4), 2, 0).models == ("refiner",)
  assert code.code_plan((1, 2, 3, 4), 2, 4, cfg=0).models == ("drafter",)
  assert not any(s.cfg_on for s in code.code_plan((1, 2, 3, 4), 2, 4, cfg=0).steps)
  assert code.code_temperatures(4) == (1.1, 1.1, 1.1, 1.0)
  for bad in (-1, 11, 2.5, True, "8"):
    with pytest.raises(ValueError, match=r"draft_steps=.* (out of range|must be an integer)"):
      code.code_plan(PATCH_NUMS_256, 1, bad)
  with pytest.raises(ValueError, match="got 3 temperatures for the 10-scale"):
    code.code_plan(PATCH_NUMS_256, 1, 8, temperatures=(1.0, 1.0, 1.0))
  with pytest.raises(ValueError, match="must be > 0"):
    code.code_plan((1, 2), 1, 1, temperatures=(1.0, 0.0))
  assert code.sampling_preset("fid") == sampler_lib.SamplingConfig(cfg=1.5, top_k=600, top_p=0.96)
  assert code.sampling_preset("demo") == sampler_lib.SamplingConfig(cfg=4.0, top_k=600, top_p=0.95)
  with pytest.raises(ValueError, match="unknown CoDe sampling preset 'x'"):
    code.sampling_preset("x")


def _np_probs(logits, top_k, top_p, temperature, temper_first=False):
  """numpy reference: keep the top_k largest (ties kept), then drop the ascending-sorted entries whose cumulative
  softmax is <= 1 - top_p (never the largest); CoDe divides by the temperature after masking."""
  z = logits / temperature if temper_first else logits.copy()
  z = np.where(z < np.sort(z)[::-1][top_k - 1], -np.inf, z)
  order = np.argsort(z, kind="stable")
  p = np.exp(z[order] - z.max())
  remove = np.cumsum(p / p.sum()) <= 1 - top_p
  remove[-1] = False
  z[order[remove]] = -np.inf
  if not temper_first:
    z = z / temperature
  e = np.exp(z - z.max())
  return e / e.sum()


def test_temperature_after_top_k_top_p_matches_numpy():
  """20,000 draws from fixed logits: the empirical distribution is CoDe's (mask the untempered logits, then divide
  by the temperature), not the temperature-first one (which keeps more tokens here)."""
  logits = np.asarray([3.0, 2.6, 2.5, 2.0, 1.9, 1.0, 0.5, 0.2, -0.5, -1.0, 2.55, 0.0], np.float32)
  k, p, t, n = 8, 0.85, 2.0, 20_000
  ref = _np_probs(logits.astype(np.float64), k, p, t)
  other = _np_probs(logits.astype(np.float64), k, p, t, temper_first=True)
  assert (ref > 0).sum() < (other > 0).sum()  # the two orders keep different tokens
  cfg = sampler_lib.SamplingConfig(top_k=k, top_p=p)
  codebook = jnp.zeros((logits.size, 1))
  tokens, _ = sampler_lib.sample_tokens(jnp.broadcast_to(jnp.asarray(logits), (1, n, logits.size)),
                                        jax.random.key(0)[None], cfg, 0.0, codebook, temperature=t)
  freq = np.bincount(np.asarray(tokens).ravel(), minlength=logits.size) / n
  assert (freq[ref == 0] == 0).all()
  np.testing.assert_allclose(freq, ref, atol=4 * np.sqrt(0.25 / n))


# ----------------------------------------------------------------------------------------------------------------
# Loading a pair from two model directories

def _save(path, vae, vae_config, var):
  return pretrained.save_pretrained(path, tokenizer=vae, tokenizer_config=vae_config, var=var, var_config=var.config)


def _random_vae(config, seed):
  with nnx.use_eager_sharding(False):
    return VQVAE(config, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def pair_dirs(tiny_pair, tmp_path_factory):
  drafter, refiner, vae = tiny_pair
  tmp = tmp_path_factory.mktemp("code_pair")
  t1 = VQVAEConfig.preset("t1")
  dirs = {"drafter": _save(tmp / "d", vae, t1, drafter), "refiner": _save(tmp / "r", vae, t1, refiner),
          "other_weights": _save(tmp / "w", _random_vae(t1, 5), t1, refiner)}
  small = var_model.VARConfig(depth=1, width=32, num_heads=2, vocab_size=64, z_channels=8, patch_nums=(1, 2, 3, 4),
                              num_classes=10)
  for name, tok, var in (
      ("vocab", dict(vocab_size=32), dict(vocab_size=32)), ("z", dict(z_channels=4), dict(z_channels=4)),
      ("patch_nums", dict(patch_nums=(1, 2, 4)), dict(patch_nums=(1, 2, 4))), ("classes", {}, dict(num_classes=5)),
      ("tok_config", dict(beta=0.5), {})):
    cfg = VQVAEConfig.preset("t1", **tok)
    dirs[name] = _save(tmp / name, _random_vae(cfg, 0), cfg, var_model.build(small.__class__(
      **{**small.to_dict(), **var})))
  return dirs


def test_load_pair_and_mismatch_errors(pair_dirs, tiny_pair):
  models, vae, vae_config = code.load_pair(pair_dirs["drafter"], pair_dirs["refiner"], dtype="bfloat16")
  assert (models["drafter"].config.depth, models["refiner"].config.depth) == (8, 1)
  assert models["refiner"].config.dtype == "bfloat16" and vae_config == VQVAEConfig.preset("t1")
  assert code.tokenizer_checksum(vae) == code.tokenizer_checksum(tiny_pair[2])
  np.testing.assert_array_equal(models["refiner"].head.kernel[...], tiny_pair[1].head.kernel[...])
  for name, match in (("vocab", r"vocabulary \(vocab_size 64 vs 32\)"), ("z", r"z channels \(z_channels 8 vs 4\)"),
                      ("patch_nums", r"patch_nums \(patch_nums \(1, 2, 3, 4\) vs \(1, 2, 4\)\)"),
                      ("classes", r"classes \(num_classes 10 vs 5\)"),
                      ("tok_config", r"different tokenizer configs \(fields \['beta'\]"),
                      ("other_weights", "same tokenizer config but different tokenizer weights")):
    with pytest.raises(ValueError, match=match):
      code.load_pair(pair_dirs["drafter"], pair_dirs[name])


def test_sample_cli_code_flags(pair_dirs, tiny_samplers, tmp_path):
  """sample.py --refiner DIR --draft_steps N gives the Python API's images (8 devices, padded batch of 8);
  CoDe-only flags need --refiner."""
  base = ["--checkpoint", str(pair_dirs["drafter"]), "--top_k", "8", "--top_p", "0.9", "--compilation_cache", "",
          "--no_progress"]
  args = sample.build_parser().parse_args(
    base + ["--refiner", str(pair_dirs["refiner"]), "--draft_steps", "2", "--classes", "1,5,9,10", "--seed", "3",
            "--batch_size", "8", "--out", str(tmp_path)])
  summary = sample.run(args)
  assert summary["num_images"] == 4 and summary["trace_count"] == 1
  images = np.asarray(tiny_samplers[2](np.array([1, 5, 9, 10]), np.arange(4) + 3)["images"])
  u8 = np.load(tmp_path / "samples.npz")["arr_0"].astype(np.float32)
  assert np.abs(u8 - np.round(np.clip(images, 0, 1) * 255)).max() <= 1
  # FastVAR in the refiner phase: scale 3 pruned, restored from the hand-over scale 2 (recorded by the prefill)
  pruned = sample.run(sample.build_parser().parse_args(
    base + ["--refiner", str(pair_dirs["refiner"]), "--draft_steps", "2", "--prune", "3:0.5", "--classes", "1,5",
            "--batch_size", "8", "--out", str(tmp_path / "pruned")]))
  assert pruned["num_images"] == 2 and pruned["trace_count"] == 1
  for extra, match in ((["--draft_steps", "2"], "CoDe options: give the refiner with --refiner DIR"),
                       (["--code_temperatures"], "CoDe options"),
                       (["--refiner", str(pair_dirs["refiner"]), "--draft_steps", "7"],
                        "draft_steps=7 is out of range for the 4-scale schedule"),
                       (["--refiner", str(pair_dirs["vocab"])], r"vocabulary \(vocab_size 64 vs 32\)"),
                       (["--refiner", str(pair_dirs["refiner"]), "--draft_steps", "3", "--prune", "3:0.5"],
                        "must be run by the same model"),
                       (["--refiner", str(pair_dirs["refiner"]), "--draft_steps", "3", "--prune", "2:0.5"],
                        "run by model 'drafter'")):
    with pytest.raises(ValueError, match=match):
      sample.run(sample.build_parser().parse_args(base + extra + ["--out", str(tmp_path / "x")]))


def test_bench_code_digits_table(pair_dirs, tiny_pair, capsys):
  """benchmarks/bench_code.py --digits: chunked, padded sampling (10 images in calls of 4) gives the judge's
  figures of one unchunked call with the same seeds; token forwards counted by hand for patch_nums (1, 2, 3, 4)."""
  from benchmarks import bench_code
  from var.eval import digits_quality as dq

  bench_code.main(["--digits", "--large", str(pair_dirs["drafter"]), "--small", str(pair_dirs["refiner"]),
                   "--num_per_class", "1", "--digits_batch", "4", "--draft_steps_list", "2", "--top_k", "8",
                   "--top_p", "0.9", "--seed", "3"])
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  table = [r for r in rows if r["kind"] == "digits"]
  assert [(r["setting"], r["draft_steps"]) for r in table] == [("large alone", 4), ("small alone", 0),
                                                               ("CoDe training-free", 2)]
  assert [r["token_forwards"] for r in table] == [{"drafter": 30, "refiner": 0}, {"drafter": 0, "refiner": 30},
                                                  {"drafter": 5, "refiner": 30}]
  drafter, refiner, vae = tiny_pair
  labels, seeds = np.arange(10), np.arange(10) + 3
  judge = dq.default_judge(16)
  for row in table:
    s = code.code_sampler(drafter, refiner, vae, draft_steps=row["draft_steps"], batch=10, temperatures=None,
                          sampling=sampler_lib.SamplingConfig(cfg=1.5, top_k=8, top_p=0.9))
    ref = judge.report(np.asarray(s(labels, seeds)["images"]), labels, value_range="[0,1]")
    assert row["num_images"] == 10 and row["accuracy"] == ref["accuracy"]
    np.testing.assert_allclose(row["fd"], ref["fd"], rtol=1e-6)
