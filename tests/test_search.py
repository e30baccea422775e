"""Test-time search (var/search.py): schedules, k-means against scikit-learn, resampling guards, and the searches
run in the sampler on the T1 fixture against the same seeds sampled one by one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from var import sampler as sampler_lib
from var import search
from var.plan import ScalePlan, SelectStep

# ----------------------------------------------------------------------------------------------------------------
# Schedules and plans (no model)


def test_schedule_default_and_mapped():
  bs, kinds = search.candidate_schedule(13, 2)
  assert bs == tuple(2 * v for v in search.DEFAULT_SCHEDULE)
  assert [si for si, k in enumerate(kinds) if k] == [2, 5, 6, 9, 12]  # spec 4.1's selection scales
  assert [kinds[si] for si in (2, 5, 6, 9, 12)] == ["cluster", "cluster", "resample", "resample", "final"]
  bs, kinds = search.candidate_schedule(10, 1)  # VAR's 10 scales
  assert bs == (8, 8, 6, 6, 4, 2, 2, 1, 1, 1)
  assert kinds == (None, None, "cluster", None, "cluster", "resample", None, "resample", None, None)
  bs, kinds = search.candidate_schedule(4, 1)  # the digits / T1 4 scales
  assert bs == (8, 6, 2, 1) and kinds == (None, "cluster", "resample", "final")
  # token-forwards: TTS-VAR N=1 on 13 scales is the spec's 1.39x of one sample (CFG doubles both)
  pn13 = (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)
  tts = search.make_search(search.SearchSpec("tts", 1, lambda i, lab: i.mean((1, 2, 3)), lambda i, lab: i), 13, 1)
  ratio = search.token_forwards(tts.plan, pn13) / search.token_forwards(ScalePlan.plain(13, 1), pn13)
  assert round(ratio, 2) == 1.39


def test_schedule_and_spec_errors():
  reward = lambda images, labels: images.mean((1, 2, 3))
  with pytest.raises(ValueError, match="N=0 must be an integer >= 1"):
    search.candidate_schedule(4, 0)
  with pytest.raises(ValueError, match="has 3 entries but the model has 4 scales"):
    search.candidate_schedule(4, 1, (4, 2, 1))
  with pytest.raises(ValueError, match="non-increasing"):
    search.candidate_schedule(4, 1, (4, 8, 2, 1))
  with pytest.raises(ValueError, match="keeps 5 of M=4"):
    search.make_search(search.SearchSpec("reject", 4, reward, keep=5), 4, 2)
  with pytest.raises(ValueError, match="needs a feature extractor"):
    search.make_search(search.SearchSpec("tts", 1, reward), 4, 2)
  with pytest.raises(ValueError, match="potential 'best'"):
    search.SearchSpec("tts", 1, reward, potential="best").validate(4)
  with pytest.raises(ValueError, match="lambda=nan"):
    search.SearchSpec("is", 2, reward, lam=float("nan")).validate(4)


def test_plans_of_the_baselines():
  reward = lambda images, labels: images.mean((1, 2, 3))
  bon = search.make_search(search.SearchSpec("bon", 4, reward), 4, 3)
  assert [s.batch for s in bon.plan.steps] == [12] * 4 and bon.plan.out_batch == 3
  assert [s.select for s in bon.plan.steps[:3]] == [None] * 3 and bon.plan[3].select.kind == "final"
  rej = search.make_search(search.SearchSpec("reject", 4, reward, keep=2), 4, 3)
  assert rej.plan.out_batch == 6 and rej.keep == 2
  imp = search.make_search(search.SearchSpec("is", 4, reward), 4, 3, cfg=0.0)
  assert imp.plan[3].select.kind == "importance" and not imp.plan[0].cfg_on
  # no selection at all: the plain plan, and the candidates are the requested seeds themselves
  none = search.make_search(search.SearchSpec("tts", 1, reward, schedule=(1, 1, 1, 1)), 4, 2)
  assert none.plan == ScalePlan.plain(4, 2) and none.rows == 1
  labels, seeds = none.candidates([3, 7], [5, 6])
  np.testing.assert_array_equal(labels, [3, 7])
  np.testing.assert_array_equal(seeds, [5, 6])
  labels, seeds = bon.candidates([3, 7, 1], [0, 1, 2])
  np.testing.assert_array_equal(labels, np.repeat([3, 7, 1], 4))
  assert seeds[0] == 0 and seeds[4] == 1 and seeds[1] == search.SEED_STRIDE  # candidate 0 = the plain sample


def test_compose_with_a_kv_and_pruning_plan():
  from var.plan import PruneStep

  reward = lambda images, labels: images.mean((1, 2, 3))
  tts = search.make_search(search.SearchSpec("tts", 1, reward, lambda i, lab: i), 4, 2)
  prune = PruneStep(keep=4, first=0, last=2, cache_scale=1)
  other = ScalePlan.plain(4, 2).replace(2, kv_capacity=(10, 12)).replace(3, prune=prune, cfg_on=False)
  both = search.compose(tts.plan, other)
  assert [s.batch for s in both.steps] == [s.batch for s in tts.plan.steps]
  assert [s.select for s in both.steps] == [s.select for s in tts.plan.steps]
  assert both[2].kv_capacity == (10, 12) and both[3].prune == prune and not both[3].cfg_on
  with pytest.raises(ValueError, match="selects candidates itself at scales"):
    search.compose(tts.plan, tts.plan)


# ----------------------------------------------------------------------------------------------------------------
# Selection functions


def _blobs(n_per=6, k=3, d=5, seed=0):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(k, d)) * 20
  x = np.concatenate([c + rng.normal(size=(n_per, d)) for c in centres])
  return x[rng.permutation(len(x))].astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_matches_sklearn(seed):
  from sklearn.cluster import KMeans

  x = _blobs(seed=seed)
  km = KMeans(3, init="k-means++", random_state=0, n_init=1).fit(x)
  centres, assign = jax.jit(search.kmeans, static_argnums=1)(jnp.asarray(x), 3, jax.random.key(0))
  ours = {frozenset(np.flatnonzero(np.asarray(assign) == c)) for c in range(3)}
  theirs = {frozenset(np.flatnonzero(km.labels_ == c)) for c in range(3)}
  assert ours == theirs
  ref_members = {int(np.flatnonzero(km.labels_ == c)[np.argmin(((x[km.labels_ == c] - km.cluster_centers_[c]) ** 2)
                                                                 .sum(1))]) for c in range(3)}
  picked = jax.jit(search.kmeans_select, static_argnums=1)(jnp.asarray(x), 3)
  assert set(np.asarray(picked).tolist()) == ref_members


def test_kmeans_empty_clusters_do_not_crash():
  x = jnp.zeros((6, 4)).at[5].set(1.0)  # five identical points and one other: k=4 leaves clusters empty
  picked = np.asarray(jax.jit(search.kmeans_select, static_argnums=1)(x, 4))
  assert len(set(picked.tolist())) == 4 and 5 in picked  # distinct members, the outlier among them
  same = np.asarray(jax.jit(search.kmeans_select, static_argnums=1)(jnp.ones((5, 3)), 3))
  assert sorted(same.tolist()) == sorted(set(same.tolist()))


def test_pca_projection_sign_fix():
  tokens = jax.random.normal(jax.random.key(0), (16, 8))
  p = search.pca_projection(tokens)
  np.testing.assert_allclose(search.pca_projection(-tokens), p, atol=1e-5)  # same map, whatever the SVD sign
  assert p[jnp.argmax(jnp.abs(p))] > 0
  np.testing.assert_allclose(jnp.abs(search.pca_projection(tokens, sign_fix=False)), jnp.abs(p), atol=1e-5)
  assert search.reduce_features(jnp.stack([tokens, tokens]), "pool").shape == (2, 8)


def test_potentials_over_the_history():
  h = jnp.asarray([[1.0, 3.0, 2.0], [0.0, -1.0, 4.0]])
  np.testing.assert_allclose(search.potential(h, "value"), [2.0, 4.0])
  np.testing.assert_allclose(search.potential(h, "diff"), [-1.0, 5.0])
  np.testing.assert_allclose(search.potential(h, "sum"), [6.0, 3.0])
  np.testing.assert_allclose(search.potential(h, "max"), [3.0, 4.0])
  np.testing.assert_allclose(search.potential(h, "topk", 2), [5.0, 4.0])
  np.testing.assert_allclose(search.potential(h[:, :1], "diff"), [1.0, 0.0])


def test_resampling_large_lambda_nan_guards_and_uniform_fallback():
  phi = jnp.asarray([0.1, 0.9, jnp.nan, 0.5, jnp.inf, 0.3])
  keys = jax.random.split(jax.random.key(0), 200)
  draw = jax.jit(jax.vmap(lambda k, p: search.resample(p, 2, k, 1e6), in_axes=(0, None)))
  picks = np.asarray(draw(keys, phi))
  assert (np.sort(picks, 1) == [1, 3]).all()  # the best two, never the non-finite ones
  first = np.asarray(jax.vmap(lambda k: search.resample(phi, 1, k, 1.0))(keys))[:, 0]
  assert not np.isin(first, [2, 4]).any()  # NaN / inf weigh 0
  nan = jnp.full((4,), jnp.nan)
  counts = np.bincount(np.asarray(jax.vmap(lambda k: search.resample(nan, 1, k, 10.0))(
    jax.random.split(jax.random.key(1), 4000)))[:, 0], minlength=4)
  assert counts.min() > 850  # uniform: about 1000 each
  np.testing.assert_array_equal(search.top_rewards(jnp.asarray([jnp.nan, 1.0, 3.0, -jnp.inf]), 2), [2, 1])


def test_resampling_with_replacement_duplicates_the_best():
  """The paper's i.i.d. draw: lambda -> large draws the best every time; lambda 0 and all-NaN draw uniformly."""
  phi = jnp.asarray([0.1, 0.9, jnp.nan, 0.5])
  np.testing.assert_array_equal(search.resample(phi, 3, jax.random.key(0), 1e6, replacement=True), [1, 1, 1])
  keys = jax.random.split(jax.random.key(2), 1000)
  for p, lam in [(jnp.asarray([0.0, 5.0, -3.0, 1.0]), 0.0), (jnp.full((4,), jnp.nan), 10.0)]:
    draws = np.asarray(jax.vmap(lambda k, p=p, lam=lam: search.resample(p, 4, k, lam, replacement=True))(keys))
    counts = np.bincount(draws.reshape(-1), minlength=4)
    assert counts.min() > 850 and counts.max() < 1150  # about 1000 each


def _ctx(si, rewards_per_row):
  """A select context whose 'decode' gives every row a constant image equal to its reward (red channel)."""
  r = jnp.asarray(rewards_per_row, jnp.float32)
  f_hat = jnp.broadcast_to(r[:, None, None, None], (r.shape[0], 2, 2, 3))
  return dict(si=si, f_hat=f_hat, tokens=[], labels=jnp.zeros(r.shape[0], jnp.int32), decode=lambda f: f,
              carry=None)


def test_final_selections_stay_within_groups():
  red = lambda images, labels: images[..., 0].mean((1, 2))
  r = [0.1, 0.9, 0.5, 0.2, 0.8, 0.3, 0.4, 0.7]  # two groups of 4
  rej = search.make_search(search.SearchSpec("reject", 4, red, keep=2), 4, 2)
  idx, carry = rej.hooks.select["final"](_ctx(3, r), jax.random.key(0))
  np.testing.assert_array_equal(idx, [1, 2, 4, 7])  # each group's best two, group order kept
  np.testing.assert_allclose(carry["rewards"][:, 0], r, rtol=1e-6)
  imp = search.make_search(search.SearchSpec("is", 4, red, lam=1e6), 4, 2)
  idx, _ = imp.hooks.select["importance"](_ctx(3, r), jax.random.key(0))
  np.testing.assert_array_equal(idx, [1, 4])
  imp = search.make_search(search.SearchSpec("is", 4, red, lam=0.0), 4, 2)  # uniform, but never across groups
  picks = np.stack([imp.hooks.select["importance"](_ctx(3, r), jax.random.key(i))[0] for i in range(40)])
  assert (picks[:, 0] < 4).all() and (picks[:, 1] >= 4).all() and len(set(picks[:, 0])) > 1


# ----------------------------------------------------------------------------------------------------------------
# In the sampler (T1 fixture, 4 scales)


pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture(scope="module")
def t1(t1):
  """conftest's T1 fixture models without the golden io."""
  return t1[:2]


SAMPLING = sampler_lib.SamplingConfig(cfg=1.5)  # random draws: every seed gives another sample


def _reward(images, labels):  # (B, H, W, 3), (B,) -> (B,): red mean, shifted per class
  return images[..., 0].mean((1, 2)) + 0.01 * labels


def _features(images, labels):  # (B, 16, 48) row tokens
  return images.reshape(images.shape[0], images.shape[1], -1)


@pytest.fixture(scope="module")
def one_by_one(t1):
  """Plain samples of single seeds (one compiled batch-1 sampler): seed -> (tokens (L,), images (H, W, 3))."""
  var, vae = t1
  plain = sampler_lib.Sampler(var, vae, SAMPLING)
  memo = {}

  def run(label, seed):
    if (label, seed) not in memo:
      out = plain(np.asarray([label]), np.asarray([seed]))
      memo[label, seed] = np.asarray(out["tokens"][0]), np.asarray(out["images"][0])
    return memo[label, seed]

  return run


def test_tts_survivors_are_their_groups_samples(t1, one_by_one):
  """Two classes in one call; TTS-VAR N=1 (8 -> 6 clustering, -> 2 resampling with the MAX potential, final
  argmax): every returned sample equals, token for token, the plain sample of one of its OWN group's seeds (the
  loop gathered cache rows, f_hat, next input, labels and seeds correctly, and groups never mixed)."""
  var, vae = t1
  spec = search.SearchSpec("tts", 1, _reward, _features, potential="max", draw="distinct")  # no re-keyed copies
  s = search.SearchSampler(var, vae, SAMPLING, spec)
  labels, seeds = np.asarray([3, 7]), np.asarray([0, 1])
  out = s(labels, seeds)
  assert out["tokens"].shape == (2, 30) and s.trace_count == 1
  srch, _ = s.search_for(2)
  cand_labels, cand_seeds = srch.candidates(labels, seeds)
  for g in range(2):
    group = range(g * srch.rows, (g + 1) * srch.rows)
    matches = [j for j in group if (one_by_one(cand_labels[j], cand_seeds[j])[0] == np.asarray(out["tokens"][g])).all()]
    assert len(matches) == 1 and cand_labels[matches[0]] == labels[g]


def test_best_of_n_is_the_argmax_over_independent_samples(t1, one_by_one):
  var, vae = t1
  s = search.SearchSampler(var, vae, SAMPLING, search.SearchSpec("bon", 4, _reward))
  labels, seeds = np.asarray([3, 7]), np.asarray([0, 1])
  out = s(labels, seeds)
  cand_labels, cand_seeds = s.search_for(2)[0].candidates(labels, seeds)
  for g in range(2):
    runs = [one_by_one(cand_labels[j], cand_seeds[j]) for j in range(4 * g, 4 * g + 4)]
    rewards = [float(_reward(jnp.clip(im[None], 0, 1), jnp.asarray([labels[g]]))[0]) for _, im in runs]
    best = runs[int(np.argmax(rewards))]
    np.testing.assert_array_equal(out["tokens"][g], best[0])
    np.testing.assert_allclose(out["images"][g], best[1], atol=1e-5)


def test_a_search_without_selection_is_the_plain_sampler(t1, one_by_one):
  """Best-of-1 runs the plain plan (test_plans_of_the_baselines): the same tokens as single-seed runs, and the
  same images up to the float rounding of another batch size."""
  var, vae = t1
  s = search.SearchSampler(var, vae, SAMPLING, search.SearchSpec("bon", 1, _reward))
  out = s(np.asarray([3, 7]), np.asarray([5, 6]))
  assert all(step.select is None for step in s.search_for(2)[0].plan.steps)
  for g, (label, seed) in enumerate([(3, 5), (7, 6)]):
    tokens, images = one_by_one(label, seed)
    np.testing.assert_array_equal(out["tokens"][g], tokens)
    np.testing.assert_allclose(out["images"][g], images, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# sample.py


@pytest.fixture(scope="module")
def model_dir(shared_dir, tmp_path_factory):
  """The T1 pair as a model directory (as tests/test_sample_cli.py builds it) and a 10-class 16px reward
  classifier (untrained: only the plumbing is under test)."""
  import json

  from flax import nnx

  from var import convert, rewards

  root = shared_dir / "fixtures" / "var"
  tmp = tmp_path_factory.mktemp("models")
  (tmp / "t1.json").write_text(json.dumps({"ch": 32, "ch_mult": [1, 1, 1], "z_channels": 8, "vocab_size": 64,
                                           "patch_nums": [1, 2, 3, 4]}))
  assert convert.main(["--vae", str(root / "vae_shared.pth"), "--vae_config", str(tmp / "t1.json"),
                       "--var", str(root / "T1" / "var.pth"), "--out", str(tmp / "t1")]) == 0
  for name, classes, size in [("clf", 10, 16), ("clf5", 5, 16), ("clf32", 10, 32)]:
    model = rewards.DigitsCNN(size, num_classes=classes, rngs=nnx.Rngs(0))
    rewards.save_classifier(rewards.Classifier(model, size, classes), tmp / name)
  return tmp


def _cli(model_dir, out, *extra):
  return ["--checkpoint", str(model_dir / "t1"), "--out", str(out), "--compilation_cache", "", "--no_progress",
          "--top_k", "10", "--classes", "3,5", *extra]


def test_cli_search_errors_before_compiling(model_dir, tmp_path):
  import sample

  out, clf = tmp_path / "o", f"classifier:{model_dir / 'clf'}"
  cases = [
    (["--search", "bon", "--search_n", "0", "--reward", clf], "--search_n 0 must be >= 1"),
    (["--search", "tts", "--reward", clf, "--search_schedule", "4,2,1"], "has 3 entries but the model has 4"),
    (["--search", "tts", "--reward", clf, "--search_schedule", "4,8,2,1"], "non-increasing"),
    (["--search", "bon", "--reward", f"classifier:{model_dir / 'none'}"], r"none/classifier.json does not exist"),
    (["--search", "bon", "--reward", f"classifier:{model_dir / 'clf5'}"], "has 5 classes but the model has 10"),
    (["--search", "bon", "--reward", f"classifier:{model_dir / 'clf32'}"], "takes 32px images but the model"),
    (["--search", "bon"], "needs --reward"),
    (["--reward", clf], "--reward only apply with --search"),
    (["--search", "bon", "--reward", clf, "--features", "classifier"], "--features do not apply to --search bon"),
    (["--search", "reject", "--reward", clf, "--lambda", "3"], "--lambda do not apply"),
    (["--search", "tts", "--reward", clf, "--potential", "best"], "--potential 'best'"),
    (["--search", "bon", "--reward", clf, "--resample_draw", "distinct"], "--resample_draw do not apply"),
    (["--search", "tts", "--reward", "var.rewards:classifier_reward"], "has no features for TTS-VAR's clustering"),
  ]
  for extra, match in cases:
    with pytest.raises(SystemExit, match=match):
      sample.main(_cli(model_dir, out, *extra))
  assert not out.exists()


def test_cli_best_of_n_on_the_mesh_writes_the_chosen_images(model_dir, tmp_path, one_by_one):
  """--search bon on the 8 fake devices (2 candidates per requested image, the groups split across devices): the
  .npz holds one image per requested one, with its label, the best of its candidates by the classifier reward."""
  import sample
  from var import rewards

  args = sample.build_parser().parse_args(
    _cli(model_dir, tmp_path, "--search", "bon", "--search_n", "2", "--reward", f"classifier:{model_dir / 'clf'}",
         "--batch_size", "8", "--cfg", "1.5", "--top_k", "0", "--top_p", "0"))
  summary = sample.run(args)
  assert summary["devices"] == 8 and summary["trace_count"] == 1
  npz = np.load(tmp_path / "samples.npz")
  assert npz["arr_0"].shape == (2, 16, 16, 3)
  np.testing.assert_array_equal(npz["arr_1"], [3, 5])
  reward = rewards.load_classifier(model_dir / "clf").reward
  for i, label in enumerate([3, 5]):
    cands = [one_by_one(label, i + j * search.SEED_STRIDE)[1] for j in range(2)]
    best = cands[int(np.argmax([float(reward(jnp.clip(c[None], 0, 1), jnp.asarray([label]))[0]) for c in cands]))]
    assert np.abs(npz["arr_0"][i].astype(np.float32) - np.round(best * 255)).max() <= 1


def test_tts_with_fastvar_gathers_the_restoration_tensors(t1):
  """TTS-VAR on a FastVAR plan (scale 3 pruned, restored from scale 2, after the resampling at scale 2): every
  survivor equals its own seed run alone with the same pruning, so the selection gathered the recorded branch
  outputs with the cache rows."""
  from var import plan as plan_lib

  var, vae = t1
  prune = lambda p: plan_lib.apply_techniques(p, var.config, prune={3: 0.5})  # noqa: E731
  s = search.SearchSampler(var, vae, SAMPLING, search.SearchSpec("tts", 1, _reward, _features, draw="distinct"),
                           techniques=prune,
                           kv_dtype="float32")
  labels, seeds = np.asarray([3, 7]), np.asarray([0, 1])
  out = s(labels, seeds)
  srch, _ = s.search_for(2)
  assert srch.plan[3].prune is not None and srch.plan[2].select is not None
  alone = sampler_lib.Sampler(var, vae, SAMPLING, plan=plan_lib.build(var.config, 1, cfg=SAMPLING.cfg,
                                                                      prune={3: 0.5}))
  cand_labels, cand_seeds = srch.candidates(labels, seeds)
  for g in range(2):
    group = range(g * srch.rows, (g + 1) * srch.rows)
    runs = [np.asarray(alone(cand_labels[j:j + 1], cand_seeds[j:j + 1])["tokens"][0]) for j in group]
    assert sum((r == np.asarray(out["tokens"][g])).all() for r in runs) >= 1


def test_tts_on_the_mesh_equals_one_device(t1):
  """TTS-VAR (N=1: 8 -> 6 clustering, -> 2 resampling, final argmax) with two classes on the 8 fake devices: the
  candidates of one class sit on different devices and the k-means / resampling run on the global (gathered) batch
  inside the one jitted program, so the survivors and their images equal the single-device run's."""
  from var import sharding

  var, vae = t1
  spec = search.SearchSpec("tts", 1, _reward, _features, potential="max")
  labels, seeds = np.asarray([3, 7]), np.asarray([4, 9])
  alone = search.SearchSampler(var, vae, SAMPLING, spec)(labels, seeds)
  mesh = sharding.make_mesh((8, 1, 1))
  sharded = search.SearchSampler(var, vae, SAMPLING, spec, mesh=mesh)
  on_mesh = sharded(labels, seeds)
  assert sharded.search_for(2)[1].mesh is mesh and sharded.search_for(2)[0].rows == 8  # 16 candidate rows
  np.testing.assert_array_equal(np.asarray(on_mesh["tokens"]), np.asarray(alone["tokens"]))
  np.testing.assert_allclose(np.asarray(on_mesh["images"]), np.asarray(alone["images"]), atol=1e-5, rtol=0)


def test_a_candidate_kept_twice_goes_on_with_its_own_stream(t1, one_by_one):
  """A selection that keeps row 0 twice (a with-replacement draw) after scale 1: the first copy stays the plain
  sample of its seed; the second shares its tokens up to the selection and draws other tokens after it."""
  var, vae = t1
  plan = ScalePlan.plain(4, 2, SAMPLING.cfg).replace(1, select=SelectStep("twice", 2))
  hooks = sampler_lib.SamplerHooks(select={"twice": lambda ctx, key: jnp.zeros((2,), jnp.int32)})
  out = sampler_lib.Sampler(var, vae, SAMPLING, plan=plan, hooks=hooks)(np.asarray([3, 7]), np.asarray([5, 6]))
  tokens = np.asarray(out["tokens"])
  np.testing.assert_array_equal(tokens[0], one_by_one(3, 5)[0])
  np.testing.assert_array_equal(tokens[1, :5], tokens[0, :5])  # scales 0 and 1: 1 + 4 tokens
  assert (tokens[1, 5:] != tokens[0, 5:]).mean() > 0.3
