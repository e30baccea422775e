"""Test-time search in the sampling loop: TTS-VAR, Best-of-N, importance sampling and rejection sampling.

Every method is a static `ScalePlan` (the batch of candidates per scale and a `SelectStep` where it shrinks) plus
select hooks (var/plan.py contract), batched over many requested images at once:

* Groups. A call samples G requested images (labels, seeds); each becomes a GROUP of candidates that are
  contiguous rows: group g holds rows [g * n, (g + 1) * n) at a scale forwarded with n candidates per group.
  Every selection reshapes the rows to (G, n, ...), chooses within each group (vmap over groups) and returns
  global indices in group order, so the survivors stay contiguous and a class never borrows another's
  candidates. Candidate j of the requested image with seed s draws from seed s + j * SEED_STRIDE (mod 2^32):
  candidate 0 is the plain sample of that seed and the candidate sets of different N are nested.
* TTS-VAR (spec ACCELERATION.md section 4). `bs_sis` (candidates per group kept after each scale) comes from a
  schedule over relative scale positions: the default is the Infinity 13-scale (8, 8, 6, 6, 6, 4, 2, 2, 2, 1, 1,
  1, 1) x N. A model with S scales takes entry round(si * (L - 1) / (S - 1)) of an L-entry schedule (half up), so
  VAR's 10 scales get (8, 8, 6, 6, 4, 2, 2, 1, 1, 1) x N and the 4-scale digits (8, 6, 2, 1) x N; a schedule of
  exactly S entries is used as is. Where the count drops after scale si the selection is CLUSTERING if the
  relative position si / (S - 1) is below `resample_from` (default 0.5: the default's first resampling scale is
  6 of 0..12, 16x16) and RESAMPLING from there on; the last scale ends with the final argmax of the reward per group.
  - Clustering: decode, features (B, T, D) from a pluggable extractor reduced per image to the projection on its
    first PCA axis (sign fixed so the largest-magnitude entry is positive; `sign_fix=False` for reference parity)
    or to the token mean ('pool'); k-means in JAX (k-means++ seeding with a fixed key, Lloyd iterations, empty
    clusters re-seeded at the farthest points), keeping the member closest to each centroid (distinct members).
  - Resampling: potential over the reward history (VALUE, DIFF, SUM, MAX, topK; the history holds the reward at
    every selection scale, kept in the select carry), weights exp(lambda * potential), non-finite potentials
    weigh 0 and an all-invalid group falls back to uniform. `draw='replacement'` (default) is the paper's i.i.d.
    draw with replacement: a candidate drawn twice continues as two candidates, the loop gives each later copy
    its own random stream (var/sampler.py `_rekey_copies`; the reference gets this from one global torch
    generator). `draw='distinct'` draws without replacement (Gumbel top-k): every survivor is another candidate.
* Best-of-N: N independent samples per requested image, the argmax of the reward at the last scale.
* Importance sampling (the TTS-VAR paper's baseline): N samples, one drawn per group with probability
  proportional to exp(lambda * reward).
* Rejection sampling (VAR's "-re"): M samples per requested image, the `keep` best by a classifier reward.

Rewards and features run inside the sampler's jit (see var/rewards.py for why). On a mesh the candidates are
split over the batch axes like any batch; the group reshape makes XLA gather a group's features where its
k-means runs (we do not shard the k-means itself: it is (n, D) per group, tiny next to the transformer).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from var.plan import ScalePlan, ScaleStep, SelectStep
from var.sampler import Sampler, SamplerHooks

DEFAULT_SCHEDULE = (8, 8, 6, 6, 6, 4, 2, 2, 2, 1, 1, 1, 1)  # spec 4.1, Infinity's 13 scales (x N)
DEFAULT_RESAMPLE_FROM = 0.5  # relative position of the default's first resampling scale (6 of 0..12: 16x16)
SEED_STRIDE = 1_000_003  # candidate j of seed s uses s + j * SEED_STRIDE
METHODS = ("tts", "bon", "is", "reject")
POTENTIALS = ("value", "diff", "sum", "max", "topk")
DRAWS = ("replacement", "distinct")  # TTS-VAR resampling: the paper's i.i.d. draw, or without replacement
KMEANS_KEY = 0  # the fixed k-means++ seeding key (the reference uses sklearn's random_state=0)


# ----------------------------------------------------------------------------------------------------------------
# Schedules


def candidate_schedule(num_scales: int, n: int, schedule: Sequence[int] = DEFAULT_SCHEDULE,
                       resample_from: float = DEFAULT_RESAMPLE_FROM) -> tuple[tuple[int, ...], tuple[str | None, ...]]:
  """(bs_sis, kinds): candidates per group kept after each scale (x n) and the selection after each scale
  (None, 'cluster', 'resample', or 'final' at the last scale when more than one candidate per group is left).

  `schedule` has one entry per scale (used as is) or more entries, mapped by relative position (module doc)."""
  schedule = tuple(int(v) for v in schedule)
  if not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"N={n} must be an integer >= 1 (the final candidates per requested image)")
  if not schedule or min(schedule) < 1 or any(a < b for a, b in zip(schedule, schedule[1:], strict=False)):
    raise ValueError(f"schedule {schedule} must be positive and non-increasing, e.g. {DEFAULT_SCHEDULE}")
  big = len(schedule)
  if big < num_scales:
    raise ValueError(f"schedule {schedule} has {big} entries but the model has {num_scales} scales; give one entry "
                     f"per scale or a longer schedule to map (e.g. the {len(DEFAULT_SCHEDULE)}-scale default)")
  if not 0 <= resample_from <= 1:
    raise ValueError(f"resample_from={resample_from} must be a relative scale position in [0, 1]")
  pos = [si if big == num_scales else math.floor(si * (big - 1) / max(num_scales - 1, 1) + 0.5)
         for si in range(num_scales)]
  bs = tuple(schedule[p] * n for p in pos)
  kinds: list[str | None] = []
  for si in range(num_scales):
    forward = bs[si - 1] if si else bs[0]
    if si == num_scales - 1:
      kinds.append("final" if forward > 1 else None)
    elif bs[si] < forward:
      kinds.append("cluster" if si / max(num_scales - 1, 1) < resample_from else "resample")
    else:
      kinds.append(None)
  return bs, tuple(kinds)


def parse_schedule(text: str) -> tuple[int, ...]:
  """'8,8,6,6,6,4,2,2,2,1,1,1,1' -> a tuple of ints (the error names the bad text)."""
  try:
    values = tuple(int(v) for v in text.split(",") if v.strip())
  except ValueError as e:
    raise ValueError(f"schedule {text!r} must be comma-separated integers, e.g. 8,8,6,6,6,4,2,2,2,1,1,1,1") from e
  if not values:
    raise ValueError(f"schedule {text!r} is empty")
  return values


def token_forwards(plan: ScalePlan, patch_nums: Sequence[int]) -> int:
  """Transformer token-forwards of one call: sum over scales of rows (x2 with CFG) x pn^2."""
  return sum(s.batch * (2 if s.cfg_on else 1) * pn * pn for s, pn in zip(plan.steps, patch_nums, strict=True))


# ----------------------------------------------------------------------------------------------------------------
# Selection within one group (pure functions of per-group arrays; the hooks vmap them over groups)


def _sqdist(x, c):  # (n, d), (k, d) -> (n, k)
  return jnp.sum(x * x, -1)[:, None] - 2.0 * x @ c.T + jnp.sum(c * c, -1)[None, :]


def kmeans(x: jax.Array, k: int, key: jax.Array, iters: int = 300, tol: float = 1e-4) -> tuple[jax.Array, jax.Array]:
  """k-means on x (n, d): k-means++ seeding (D^2 sampling with `key`), then Lloyd iterations until the centres
  move less than tol * mean feature variance (scikit-learn's criterion) or `iters`. An empty cluster is re-seeded
  at the point farthest from its centre (the i-th empty one at the i-th farthest). Returns (centres (k, d),
  assignment (n,) computed from the final centres)."""
  x = x.astype(jnp.float32)
  n = x.shape[0]
  keys = jax.random.split(key, k)
  first = jax.random.randint(keys[0], (), 0, n)
  centres = jnp.zeros((k, x.shape[1]), jnp.float32).at[0].set(x[first])
  d2 = jnp.sum((x - x[first]) ** 2, -1)

  def seed(i, state):
    centres, d2 = state
    logits = jnp.where(d2.sum() > 0, jnp.log(jnp.maximum(d2, 0.0)), 0.0)  # all points equal: uniform
    j = jax.random.categorical(keys[i], logits)
    return centres.at[i].set(x[j]), jnp.minimum(d2, jnp.sum((x - x[j]) ** 2, -1))

  centres, _ = jax.lax.fori_loop(1, k, seed, (centres, d2))
  threshold = tol * jnp.mean(jnp.var(x, axis=0))

  def lloyd(state):
    it, centres, _ = state
    d = _sqdist(x, centres)
    assign = jnp.argmin(d, -1)
    onehot = jax.nn.one_hot(assign, k, dtype=jnp.float32)  # (n, k)
    counts = onehot.sum(0)
    means = (onehot.T @ x) / jnp.maximum(counts, 1.0)[:, None]
    empty = counts == 0
    farthest = jnp.argsort(-jnp.min(d, -1))  # points by distance to their centre, farthest first
    rank = jnp.clip(jnp.cumsum(empty) - 1, 0, n - 1)
    new = jnp.where(empty[:, None], x[farthest[rank]], means)
    return it + 1, new, jnp.sum((new - centres) ** 2)

  _, centres, _ = jax.lax.while_loop(lambda s: (s[0] < iters) & (s[2] > threshold), lloyd,
                                     (0, centres, jnp.float32(jnp.inf)))
  return centres, jnp.argmin(_sqdist(x, centres), -1)


def kmeans_select(x: jax.Array, k: int, iters: int = 300, key: jax.Array | None = None) -> jax.Array:
  """(k,) distinct row indices of x (n, d): per k-means cluster, its member closest to the centroid (a cluster
  left without an untaken member takes the closest untaken point)."""
  key = jax.random.key(KMEANS_KEY) if key is None else key
  centres, assign = kmeans(x, k, key, iters)
  d = _sqdist(x.astype(jnp.float32), centres)  # (n, k)

  def pick(taken, c):
    member = (assign == c) & ~taken
    cost = jnp.where(member, d[:, c], jnp.inf)
    cost = jnp.where(member.any(), cost, jnp.where(taken, jnp.inf, d[:, c]))
    i = jnp.argmin(cost)
    return taken.at[i].set(True), i

  return jax.lax.scan(pick, jnp.zeros(x.shape[0], bool), jnp.arange(k))[1].astype(jnp.int32)


def pca_projection(tokens: jax.Array, sign_fix: bool = True) -> jax.Array:
  """tokens (T, D) -> (T,): the centred tokens projected on their first principal axis. The SVD sign is arbitrary;
  sign_fix makes the largest-magnitude entry positive (the projections sum to 0, so their sum cannot fix it)."""
  c = tokens.astype(jnp.float32) - tokens.mean(0)
  _, _, vt = jnp.linalg.svd(c, full_matrices=False)
  proj = c @ vt[0]
  if sign_fix:
    s = jnp.sign(proj[jnp.argmax(jnp.abs(proj))])
    proj = proj * jnp.where(s == 0, 1.0, s)
  return proj


def reduce_features(feats: jax.Array, mode: str = "pca", sign_fix: bool = True) -> jax.Array:
  """(B, T, D) tokens -> (B, T) PCA projections ('pca') or (B, D) means ('pool'); (B, D) vectors pass through."""
  if feats.ndim == 2:
    return feats.astype(jnp.float32)
  if mode == "pca":
    return jax.vmap(lambda t: pca_projection(t, sign_fix))(feats)
  if mode == "pool":
    return feats.astype(jnp.float32).mean(1)
  raise ValueError(f"feature mode {mode!r}: use 'pca' or 'pool'")


def potential(history: jax.Array, kind: str = "value", topk: int = 2) -> jax.Array:
  """history (n, t) rewards at the selection scales so far (last = current) -> (n,) potentials.

  value: the current reward; diff: current minus previous (the current at the first); sum, max: over the
  history; topk: sum of the `topk` largest entries."""
  if kind == "value":
    return history[:, -1]
  if kind == "diff":
    return history[:, -1] - history[:, -2] if history.shape[1] > 1 else history[:, -1]
  if kind == "sum":
    return history.sum(1)
  if kind == "max":
    return history.max(1)
  if kind == "topk":
    return jax.lax.top_k(history, min(topk, history.shape[1]))[0].sum(1)
  raise ValueError(f"potential {kind!r}: use one of {POTENTIALS}")


def resample(phi: jax.Array, keep: int, key: jax.Array, lam: float, replacement: bool = False) -> jax.Array:
  """(keep,) indices drawn from Categorical(exp(lam * phi)): i.i.d. with replacement (the TTS-VAR paper) or
  distinct, without replacement (Gumbel top-k). Non-finite potentials weigh 0 (drawn last without replacement);
  if none is finite the draw is uniform."""
  valid = jnp.isfinite(phi)
  best = jnp.max(jnp.where(valid, phi, -jnp.inf))
  logits = jnp.where(valid, lam * (phi - best), -jnp.inf)  # <= 0: exp never overflows, any lambda
  logits = jnp.where(valid.any(), logits, 0.0)
  if replacement:
    return jax.random.categorical(key, logits, shape=(keep,)).astype(jnp.int32)
  scores = logits + jax.random.gumbel(key, phi.shape)
  return jax.lax.top_k(scores, keep)[1].astype(jnp.int32)


def top_rewards(r: jax.Array, keep: int) -> jax.Array:
  """(keep,) indices of the largest rewards (non-finite ones rank last, ties by index)."""
  return jax.lax.top_k(jnp.where(jnp.isfinite(r), r, -jnp.inf), keep)[1].astype(jnp.int32)


# ----------------------------------------------------------------------------------------------------------------
# The search: plan + hooks for G requested images


@dataclasses.dataclass(frozen=True)
class SearchSpec:
  """A search method and its options, independent of the batch (see make_search)."""
  method: str
  n: int
  reward: Callable
  features: Callable | None = None  # tts only
  schedule: tuple[int, ...] = DEFAULT_SCHEDULE  # tts only
  resample_from: float = DEFAULT_RESAMPLE_FROM
  potential: str = "value"
  topk: int = 2  # the k of potential 'topk'
  lam: float = 10.0  # tts resampling and importance sampling
  draw: str = "replacement"  # tts resampling: "replacement" (the paper) or "distinct"
  feature_mode: str = "pca"
  sign_fix: bool = True
  keep: int = 1  # reject: images kept per requested image
  kmeans_iters: int = 300

  def validate(self, num_scales: int) -> None:
    """Raises a ValueError naming the bad option and the fix."""
    if self.method not in METHODS:
      raise ValueError(f"search method {self.method!r}: use one of {METHODS}")
    if not isinstance(self.n, (int, np.integer)) or self.n < 1:
      raise ValueError(f"N={self.n} must be an integer >= 1")
    if self.potential not in POTENTIALS:
      raise ValueError(f"potential {self.potential!r}: use one of {POTENTIALS}")
    if self.topk < 1:
      raise ValueError(f"topk={self.topk} must be >= 1")
    if not (math.isfinite(self.lam) and self.lam >= 0):
      raise ValueError(f"lambda={self.lam} must be finite and >= 0")
    if self.draw not in DRAWS:
      raise ValueError(f"resampling draw {self.draw!r}: use one of {DRAWS}")
    if self.feature_mode not in ("pca", "pool"):
      raise ValueError(f"feature mode {self.feature_mode!r}: use 'pca' or 'pool'")
    if self.method == "reject" and not 1 <= self.keep <= self.n:
      raise ValueError(f"rejection sampling keeps {self.keep} of M={self.n} candidates; keep 1..{self.n}")
    if self.method != "reject" and self.keep != 1:
      raise ValueError(f"keep={self.keep} is only for rejection sampling ('reject')")
    if self.method == "tts":
      _, kinds = candidate_schedule(num_scales, self.n, self.schedule, self.resample_from)
      if "cluster" in kinds and self.features is None:
        raise ValueError("TTS-VAR clusters candidates at coarse scales and needs a feature extractor (features=, "
                         "--features inception|classifier)")


@dataclasses.dataclass(frozen=True)
class Search:
  """A search for `groups` requested images: `plan` and `hooks` for var.sampler.Sampler, `rows` candidates per
  requested image at the first scale, `keep` images returned per requested image."""
  spec: SearchSpec
  groups: int
  rows: int
  keep: int
  plan: ScalePlan
  hooks: SamplerHooks

  def candidates(self, labels, seeds) -> tuple[np.ndarray, np.ndarray]:
    """Requested labels (G,), seeds (G,) -> candidate labels and seeds (G * rows,), group-contiguous."""
    labels = np.asarray(labels, np.int32).reshape(-1)
    seeds = np.asarray(seeds, np.int64).reshape(-1)
    if labels.shape[0] != self.groups or seeds.shape[0] != self.groups:
      raise ValueError(f"this search is for {self.groups} requested images, got {labels.shape[0]} labels and "
                       f"{seeds.shape[0]} seeds")
    j = np.arange(self.rows, dtype=np.int64)
    cand = (seeds[:, None] + j[None, :] * SEED_STRIDE) % (1 << 32)
    return np.repeat(labels, self.rows), cand.reshape(-1).astype(np.uint32)


def make_search(spec: SearchSpec, num_scales: int, groups: int, cfg: float = 1.5) -> Search:
  """Plan and hooks of `spec` for `groups` requested images on a model with `num_scales` scales."""
  spec.validate(num_scales)
  if groups < 1:
    raise ValueError(f"groups={groups} must be >= 1")
  if spec.method == "tts":
    per_group, kinds = candidate_schedule(num_scales, spec.n, spec.schedule, spec.resample_from)
  else:  # N (M) full samples, one selection at the last scale
    per_group = (spec.n,) * num_scales
    kinds = (None,) * (num_scales - 1) + ({"bon": "final", "is": "importance", "reject": "final"}[spec.method]
                                          if spec.n > spec.keep else None,)
  keep_last = spec.keep
  steps, forward = [], []
  for si in range(num_scales):
    fw = per_group[si - 1] if si else per_group[0]
    forward.append(fw)
    kept = keep_last if si == num_scales - 1 else per_group[si]
    select = SelectStep(kinds[si], groups * kept) if kinds[si] else None
    steps.append(ScaleStep(batch=groups * fw, cfg_on=cfg != 0, select=select))
  plan = ScalePlan(tuple(steps))
  select_scales = [si for si, k in enumerate(kinds) if k]
  hooks = SamplerHooks(select=_hooks(spec, groups, {si: (forward[si], plan[si].select.keep // groups)
                                                    for si in select_scales}, select_scales))
  return Search(spec, groups, forward[0], keep_last, plan, hooks)


def _hooks(spec: SearchSpec, groups: int, sizes: dict[int, tuple[int, int]], select_scales: list[int]) -> dict:
  """The select functions: sizes[si] = (candidates per group in, kept per group)."""
  g = groups
  cols = len(select_scales)
  history_needed = spec.potential != "value"

  def prepare(ctx):
    n, k = sizes[ctx["si"]]
    images = jnp.clip(ctx["decode"](ctx["f_hat"]), 0.0, 1.0)  # (G * n, H, W, 3); clipped as sample.py writes
    hist = ctx["carry"]["rewards"] if ctx["carry"] is not None else jnp.full((g * n, cols), jnp.nan, jnp.float32)
    return n, k, images, hist, select_scales.index(ctx["si"])

  def globalise(local, n):  # (G, k) per-group indices -> (G * k,) rows
    return (jnp.arange(g, dtype=jnp.int32)[:, None] * n + local).reshape(-1)

  def reward(images, labels):
    return spec.reward(images, labels).astype(jnp.float32).reshape(-1)

  def cluster(ctx, key):
    del key  # k-means seeds with its fixed key
    n, k, images, hist, col = prepare(ctx)
    if history_needed:
      hist = hist.at[:, col].set(reward(images, ctx["labels"]))
    feats = reduce_features(spec.features(images, ctx["labels"]), spec.feature_mode, spec.sign_fix)
    local = jax.vmap(lambda x: kmeans_select(x, k, spec.kmeans_iters))(feats.reshape(g, n, -1))
    return globalise(local, n), {"rewards": hist}

  def resampling(ctx, key):
    n, k, images, hist, col = prepare(ctx)
    hist = hist.at[:, col].set(reward(images, ctx["labels"]))
    phi = potential(hist[:, :col + 1], spec.potential, spec.topk).reshape(g, n)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(g))
    local = jax.vmap(lambda p, kk: resample(p, k, kk, spec.lam, spec.draw == "replacement"))(phi, keys)
    return globalise(local, n), {"rewards": hist}

  def final(ctx, key):
    del key
    n, k, images, hist, col = prepare(ctx)
    r = reward(images, ctx["labels"]).reshape(g, n)
    return globalise(jax.vmap(lambda x: top_rewards(x, k))(r), n), {"rewards": hist.at[:, col].set(r.reshape(-1))}

  def importance(ctx, key):
    n, k, images, hist, col = prepare(ctx)
    r = reward(images, ctx["labels"]).reshape(g, n)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(g))
    local = jax.vmap(lambda x, kk: resample(x, k, kk, spec.lam))(r, keys)
    return globalise(local, n), {"rewards": hist.at[:, col].set(r.reshape(-1))}

  return {"cluster": cluster, "resample": resampling, "final": final, "importance": importance}


def compose(search_plan: ScalePlan, other: ScalePlan) -> ScalePlan:
  """The search's per-scale batch and selections on top of another plan's model, cfg_on, prune, kv_capacity, skip
  and temperature (ScaleKV, FastVAR, CoDe). At every selection the loop gathers every model's per-row state (cache
  rows, FastVAR restoration tensors) with the candidates."""
  if len(other) != len(search_plan):
    raise ValueError(f"the plans have {len(search_plan)} and {len(other)} steps; build both for the same model")
  selecting = [si for si, step in enumerate(other.steps) if step.select is not None]
  if selecting:
    raise ValueError(f"the other plan selects candidates itself at scales {selecting}; a plan has one selector")
  return dataclasses.replace(other, steps=tuple(dataclasses.replace(o, batch=s.batch, select=s.select)
                                               for s, o in zip(search_plan.steps, other.steps, strict=True)))


class SearchSampler:
  """A var.sampler.Sampler running a search: called like one, with one label and seed per REQUESTED image; returns
  {'images', 'tokens', 'f_hat'} of the chosen candidates (search.keep per requested image, group order).

  The plan depends on the batch, so there is one compiled Sampler per batch size."""

  def __init__(self, var, vae, sampling, spec: SearchSpec, *, mesh=None, techniques=None, kv_dtype=None,
               decode_dtype=None):
    """techniques: plan -> plan applied to the search's plan (e.g. var.plan.apply_techniques with a KV budget or
    a pruning schedule); kv_dtype, decode_dtype: the cache and final-decode dtypes (var.sampler.Sampler)."""
    self.var, self.vae, self.sampling, self.spec, self.mesh = var, vae, sampling, spec, mesh
    self.techniques, self.kv_dtype, self.decode_dtype = techniques, kv_dtype, decode_dtype
    self.num_scales = len(var.config.patch_nums)
    spec.validate(self.num_scales)
    self._samplers: dict[int, tuple[Search, Sampler]] = {}

  def search_for(self, batch: int) -> tuple[Search, Sampler]:
    if batch not in self._samplers:
      search = make_search(self.spec, self.num_scales, batch, self.sampling.cfg)
      if self.techniques is not None:
        search = dataclasses.replace(search, plan=self.techniques(search.plan))
      self._samplers[batch] = search, Sampler(self.var, self.vae, self.sampling, plan=search.plan,
                                              hooks=search.hooks, mesh=self.mesh, kv_dtype=self.kv_dtype,
                                              decode_dtype=self.decode_dtype)
    return self._samplers[batch]

  @property
  def trace_count(self) -> int:
    return sum(s.trace_count for _, s in self._samplers.values())

  def token_forwards(self, batch: int) -> int:
    """Transformer token-forwards of one call of `batch` requested images."""
    return token_forwards(self.search_for(batch)[0].plan, self.var.config.patch_nums)

  def compile(self, batch: int, edit: bool = False) -> float:
    search, sampler = self.search_for(batch)
    return sampler.compile(batch * search.rows, edit)

  def __call__(self, labels, seeds, edit=None, cfg: float | None = None):
    labels = np.asarray(labels, np.int32).reshape(-1)
    search, sampler = self.search_for(labels.shape[0])
    cand_labels, cand_seeds = search.candidates(labels, seeds)
    if edit is not None:
      edit = {k: np.repeat(np.asarray(v), search.rows, axis=0) for k, v in edit.items()}
    return sampler(cand_labels, cand_seeds, edit, cfg=cfg)


def spec_from_args(args, *, num_classes: int, image_size: int, num_scales: int) -> SearchSpec | None:
  """sample.py's search flags -> a validated SearchSpec (rewards loaded), or None without --search. Every error
  names the flag and the fix, before anything is compiled."""
  from var import rewards

  draw = args.resample_draw
  only_search = {"--search_n": args.search_n, "--reward": args.reward, "--features": args.features,
                 "--potential": args.potential, "--lambda": args.lam, "--search_schedule": args.search_schedule,
                 "--resample_draw": draw}
  if args.search is None:
    given = [k for k, v in only_search.items() if v is not None]
    if given:
      raise ValueError(f"{', '.join(given)} only apply with --search tts|bon|is|reject")
    return None
  tts_only = {"--features": args.features, "--potential": args.potential, "--search_schedule": args.search_schedule,
              "--resample_draw": draw}
  wrong = [k for k, v in tts_only.items() if v is not None and args.search != "tts"]
  if args.lam is not None and args.search not in ("tts", "is"):
    wrong.append("--lambda")
  if wrong:
    raise ValueError(f"{', '.join(wrong)} do not apply to --search {args.search} (features, potential, schedule "
                     "and resample_draw are TTS-VAR's; lambda is TTS-VAR's and importance sampling's)")
  n = args.search_n if args.search_n is not None else (1 if args.search == "tts" else 4)
  if n < 1:
    raise ValueError(f"--search_n {n} must be >= 1")
  if args.reward is None:
    raise ValueError(f"--search {args.search} needs --reward classifier:DIR | inception | module:function")
  reward, reward_features = rewards.resolve_reward(args.reward, num_classes=num_classes, image_size=image_size)
  kw = {}
  if args.search == "tts":
    kw["schedule"] = parse_schedule(args.search_schedule) if args.search_schedule else DEFAULT_SCHEDULE
    if args.features is not None:
      kw["features"] = rewards.resolve_features(args.features, reward_features, num_classes=num_classes,
                                                image_size=image_size)
    elif reward_features is not None:
      kw["features"] = reward_features
    if draw is not None:
      kw["draw"] = draw
    potential = args.potential or "value"
    if potential.startswith("topk") and potential[4:].isdigit():
      kw["potential"], kw["topk"] = "topk", int(potential[4:])
    elif potential in POTENTIALS and potential != "topk":
      kw["potential"] = potential
    else:
      raise ValueError(f"--potential {potential!r}: use value, diff, sum, max or topkK (e.g. topk2)")
  if args.lam is not None:
    kw["lam"] = args.lam
  spec = SearchSpec(args.search, n, reward, **kw)
  try:
    spec.validate(num_scales)
  except ValueError as e:
    if "feature extractor" in str(e):
      raise ValueError(f"--reward {args.reward} has no features for TTS-VAR's clustering: give --features "
                       "inception|classifier:DIR|module:function") from e
    raise
  return spec
