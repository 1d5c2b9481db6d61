"""The JAX assignment solver against scipy's `linear_sum_assignment`: inside `jax.jit` and
`jax.vmap` it returns a valid assignment (distinct rows, every valid column matched) with
scipy's optimal total cost, on random rectangular costs, padded targets, integer ties, one
target, no targets, more targets than queries, large finite and non-finite costs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment as scipy_lsa

from segvit_jax.losses.matching import linear_sum_assignment

_solve = jax.jit(jax.vmap(linear_sum_assignment))


def _check(cost, valid, row_for_col, col_for_row, atol):
  """A valid assignment whose total equals scipy's optimum on the valid columns."""
  n, m = cost.shape
  cols = np.flatnonzero(valid)
  assert np.all(row_for_col[~valid] == -1)
  matched = cols[row_for_col[cols] >= 0]
  rows = row_for_col[matched]
  assert len(matched) == min(n, len(cols))  # every valid column, or every row
  assert len(set(rows.tolist())) == len(rows) and np.all(rows < n)  # distinct rows
  expected_col_for_row = np.full(n, -1)
  expected_col_for_row[rows] = matched
  np.testing.assert_array_equal(col_for_row, expected_col_for_row)
  sub = cost[:, cols]
  r, c = scipy_lsa(sub)
  optimum = sub[r, c].sum(dtype=np.float64)
  total = cost[rows, matched].sum(dtype=np.float64)
  assert abs(total - optimum) <= atol, (total, optimum)


def _run(costs, valid, atol=1e-4):
  row_for_col, col_for_row = map(np.asarray, _solve(jnp.asarray(costs), jnp.asarray(valid)))
  for i in range(len(costs)):
    _check(costs[i], valid[i], row_for_col[i], col_for_row[i], atol)


# N >= M (queries >= targets), N < M with few valid (150-class semantic case in miniature),
# square, a single target, a single query.
_SHAPES = [(12, 7), (20, 15), (9, 9), (10, 16), (6, 1), (1, 5), (30, 30)]


@pytest.mark.parametrize("shape", _SHAPES)
def test_random_float_costs_equal_scipy(shape):
  rng = np.random.default_rng(sum(shape))
  costs = rng.normal(size=(40, *shape)).astype(np.float32)
  n, m = shape
  valid = np.ones((40, m), bool)
  valid[20:] = rng.random((20, m)) < 0.6  # padded targets
  valid[-1] = False  # no valid target
  if m <= n:
    valid[-2] = False
    valid[-2, rng.integers(m)] = True  # a single target
  _run(costs, valid)


@pytest.mark.parametrize("shape", _SHAPES)
def test_integer_costs_with_ties_equal_scipy(shape):
  rng = np.random.default_rng(100 + sum(shape))
  n, m = shape
  costs = rng.integers(0, 3, (40, n, m)).astype(np.float32)
  costs[:5] = 1.0  # all equal
  costs[5:10] = rng.integers(0, 2, (5, n, 1))  # equal rows per query
  valid = rng.random((40, m)) < 0.8
  _run(costs, valid, atol=0)


def test_hard_structured_costs_equal_scipy():
  """Product costs a_i b_j make every augmenting path as long as it can be (the worst case:
  M (M + 1) / 2 search steps); near-identical queries are the start of training."""
  rng = np.random.default_rng(7)
  n, m = 40, 30
  product = rng.random((8, n, 1)) * rng.random((8, 1, m))
  near = rng.random((8, 1, m)) + 1e-3 * rng.random((8, n, m))
  costs = np.concatenate([product, near]).astype(np.float32)
  _run(costs, np.ones((16, m), bool), atol=1e-5)


def test_more_valid_targets_than_queries_matches_the_cheapest_targets():
  rng = np.random.default_rng(3)
  costs = rng.normal(size=(30, 4, 9)).astype(np.float32)
  valid = np.ones((30, 9), bool)
  valid[15:, :2] = False  # 7 valid targets for 4 queries
  _run(costs, valid)


def test_large_finite_and_non_finite_costs():
  """Large finite costs stand for forbidden pairs; NaN and +inf are avoided where any
  assignment avoids them, -inf is taken; values of padded targets are never read."""
  rng = np.random.default_rng(4)
  n, m = 10, 6
  costs = rng.random((10, n, m)).astype(np.float32)
  costs[rng.random((10, n, m)) < 0.5] = 1e5
  _run(costs, np.ones((10, m), bool), atol=1e-2)  # float32 spacing at 1e5: 0.008

  cost = rng.random((n, m)).astype(np.float32)
  bad = cost.copy()
  bad[:, 0] = np.nan
  bad[3, 0] = 0.5  # the only finite choice for target 0
  bad[:, 1] = np.inf
  bad[7, 1] = 0.25
  bad[2, 2] = -np.inf  # compulsory
  bad[:, 5] = np.nan  # padding: ignored whatever it holds
  valid = np.array([True] * 5 + [False])
  row_for_col, _ = map(np.asarray, jax.jit(linear_sum_assignment)(jnp.asarray(bad),
                                                                   jnp.asarray(valid)))
  assert row_for_col[0] == 3 and row_for_col[1] == 7 and row_for_col[2] == 2
  assert row_for_col[5] == -1
  # Optimal among the rest: scipy with NaN / inf as 1e6 and -inf as -1e6.
  sub = bad[:, :5].astype(np.float64)
  sub[np.isnan(sub) | (sub == np.inf)] = 1e6
  sub[sub == -np.inf] = -1e6
  r, c = scipy_lsa(sub)
  assert abs(sub[row_for_col[:5], np.arange(5)].sum() - sub[r, c].sum()) < 1e-6

  # All NaN (a diverged model): still a valid assignment, every target its own query.
  all_nan = np.full((n, m), np.nan, np.float32)
  row_for_col, _ = map(np.asarray, jax.jit(linear_sum_assignment)(jnp.asarray(all_nan)))
  assert len(set(row_for_col.tolist())) == m
  assert np.all(row_for_col >= 0) and np.all(row_for_col < n)


def test_unbatched_and_default_validity():
  rng = np.random.default_rng(5)
  cost = rng.random((7, 5)).astype(np.float32)
  row_for_col, col_for_row = map(np.asarray, jax.jit(linear_sum_assignment)(jnp.asarray(cost)))
  r, c = scipy_lsa(cost)
  assert abs(cost[row_for_col, np.arange(5)].sum() - cost[r, c].sum()) < 1e-5
  assert np.all(col_for_row[row_for_col] == np.arange(5))
  empty = linear_sum_assignment(jnp.zeros((4, 0)))
  assert empty[0].shape == (0,) and np.all(np.asarray(empty[1]) == -1)
