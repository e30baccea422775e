"""The kernel-ceiling benchmark's accounting: which matmuls / convolutions a program runs, how often, and their
FLOPs (benchmarks/bench_kernels.py)."""

import jax
import jax.numpy as jnp
import pytest

from benchmarks import bench_kernels


def _program(x, w, q, k, img, kernel):
  def layer(h, w_i):  # 3 layers: (4, 8) @ (8, 8) each
    return h @ w_i, None

  h, _ = jax.lax.scan(layer, x, w)
  att = jnp.einsum("bqd,bkd->bqk", q, k)  # batched: (2, 5, 6) x (2, 7, 6) -> (2, 5, 7)
  y = jax.lax.conv_general_dilated(img, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return h.sum() + att.sum() + y.sum()


def test_collect_kernels_counts_scan_bodies_and_flops():
  args = (jnp.ones((4, 8)), jnp.ones((3, 8, 8)), jnp.ones((2, 5, 6)), jnp.ones((2, 7, 6)), jnp.ones((1, 6, 6, 3)),
          jnp.ones((3, 3, 3, 5)))
  kernels = bench_kernels.collect_kernels(jax.make_jaxpr(_program)(*args).jaxpr)
  found = {(bench_kernels._scope(eqn), count, bench_kernels.kernel_flops(eqn)) for eqn, count in kernels.values()}
  assert found == {("dense", 3, 2.0 * 4 * 8 * 8), ("attention", 1, 2.0 * 2 * 5 * 7 * 6),
                   ("conv", 1, 2.0 * 6 * 6 * 5 * 3 * 9)}


def test_collect_kernels_refuses_loops_of_unknown_length():
  def program(x, w):
    return jax.lax.while_loop(lambda c: c[1] < 3, lambda c: (c[0] @ w, c[1] + 1), (x, 0))[0]

  jaxpr = jax.make_jaxpr(program)(jnp.ones((4, 4)), jnp.ones((4, 4))).jaxpr
  with pytest.raises(ValueError, match="while holds 1 matmul/conv kinds"):
    bench_kernels.collect_kernels(jaxpr)
