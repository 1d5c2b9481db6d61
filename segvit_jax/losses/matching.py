"""Exact minimum-cost bipartite matching in pure JAX: the Hungarian matching of Mask2Former's
set loss (Mask2Former Sec. 3.3; EoMT App. A.2 "Loss function.") runs inside the jitted train
step on TPU and GPU, with no host callback.

The solver is the shortest-augmenting-path Hungarian algorithm with dual potentials
(Jonker & Volgenant 1987) in the rectangular form of Crouse 2016, "On implementing 2D
rectangular assignment algorithms", section IV (the algorithm behind scipy's
`linear_sum_assignment`): targets are added one at a time, each by a Dijkstra search for the
cheapest augmenting path in reduced costs. It is exact for float costs (up to float rounding
of the reduced costs), not an approximation like an auction or Sinkhorn.

Shapes are static: targets are padded to M with a validity mask, and the whole search is one
`lax.while_loop` whose step scans one query column: O(N + M) vector work per step, at most
M_valid (M_valid + 1) / 2 steps (worst case O(M_valid^2 N) work), usually a few times
M_valid. The augmenting path is applied in the step that finds it, with no walk along it:
every scanned target keeps the set of targets on its search-tree path, an (M, M) bool
matrix. `jax.vmap` over a batch of cost matrices gives one loop that runs as many steps as
the slowest matrix needs; no host synchronisation beyond the loop predicate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _finite_costs(cost: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(M, N) costs with invalid rows zeroed and non-finite entries replaced, and the cost of
  a padding column (a target left unmatched).

  NaN and +inf become `forbid`, more than any assignment with fewer such entries could
  cost, so they are used only where no assignment avoids them; -inf becomes a value below
  anything finite in the same way. A padding column costs more still, so a target is left
  unmatched only when there are more valid targets than queries."""
  m = cost.shape[0]
  cost = jnp.where(valid[:, None], cost, 0)
  finite = jnp.isfinite(cost) & valid[:, None]
  any_finite = jnp.any(finite)
  lo = jnp.where(any_finite, jnp.min(jnp.where(finite, cost, jnp.inf)), 0)
  hi = jnp.where(any_finite, jnp.max(jnp.where(finite, cost, -jnp.inf)), 0)
  reach = float(m)  # no assignment has more than m entries
  neg = lo - reach * (hi - lo) - 1
  lo = jnp.where(jnp.any(cost == -jnp.inf), neg, lo)
  forbid = hi + reach * (hi - lo) + 1
  cost = jnp.where(jnp.isnan(cost) | (cost == jnp.inf), forbid,
                   jnp.where(cost == -jnp.inf, neg, cost))
  return cost, forbid + reach * (forbid - lo) + 1


def _augmenting_paths(cost: jax.Array, order: jax.Array, n_rows: jax.Array) -> jax.Array:
  """Crouse's algorithm on `cost` (R, C), R <= C, finite: rows `order[:n_rows]` each get a
  distinct column, minimising the total. Returns col4row (R,), -1 for rows not in the set."""
  r, c = cost.shape
  dtype = cost.dtype
  inf = jnp.array(jnp.inf, dtype)
  rows = jnp.arange(r)
  cols = jnp.arange(c)
  eye_first = jnp.zeros((r, r), bool).at[order[0], order[0]].set(True)

  init = dict(
      k=jnp.int32(0),  # rows done; order[k] is being added
      i=order[0],  # the row whose edges the next step relaxes
      min_val=jnp.zeros((), dtype),  # distance of the last scanned column
      spc=jnp.full((c,), inf),  # shortest reduced path cost to each column
      path=jnp.zeros((c,), jnp.int32),  # the row before each column on that path
      sr=jnp.zeros((r,), bool),  # rows scanned in this search
      sc=jnp.zeros((c,), bool),  # columns scanned in this search
      tree=eye_first,  # tree[i]: the rows on the search path from order[k] to row i
      u=jnp.zeros((r,), dtype),
      v=jnp.zeros((c,), dtype),
      col4row=jnp.full((r,), -1, jnp.int32),
      row4col=jnp.full((c,), -1, jnp.int32),
  )

  def step(s):
    cur, i = order[s["k"]], s["i"]
    sr = s["sr"].at[i].set(True)
    reduced = s["min_val"] + cost[i] - s["u"][i] - s["v"]
    better = ~s["sc"] & (reduced < s["spc"])
    path = jnp.where(better, i, s["path"])
    spc = jnp.where(better, reduced, s["spc"])
    dist = jnp.where(s["sc"], inf, spc)
    lowest = jnp.min(dist)
    free = s["row4col"] < 0
    # Among equally near columns take a free one: shorter paths with integer-like costs.
    nearest = dist == lowest
    nearest_free = nearest & free
    j = jnp.where(jnp.any(nearest_free), jnp.argmax(nearest_free), jnp.argmax(nearest))
    sc = s["sc"].at[j].set(True)
    found = free[j]

    # Not found: the search goes on from the row that holds column j.
    held_by = jnp.maximum(s["row4col"][j], 0)
    grown = s["tree"][path[j]].at[held_by].set(True)

    # Found: new potentials (Crouse, step 4), then flip the path sink ... order[k].
    matched_spc = spc[jnp.maximum(s["col4row"], 0)]
    u = jnp.where(sr & (rows != cur), s["u"] + lowest - matched_spc, s["u"])
    u = u.at[cur].add(lowest)
    v = jnp.where(sc, s["v"] - (lowest - spc), s["v"])
    on_path_rows = s["tree"][path[j]]
    on_path_cols = (cols == j) | (~free & on_path_rows[jnp.maximum(s["row4col"], 0)])
    row4col = jnp.where(on_path_cols, path, s["row4col"])
    col4row = s["col4row"].at[jnp.where(on_path_cols, path, r)].set(
        cols.astype(jnp.int32), mode="drop")
    k = s["k"] + 1
    nxt = order[jnp.minimum(k, r - 1)]

    tree_row = jnp.where(found, nxt, held_by)
    tree_val = jnp.where(found, rows == nxt, grown)
    pick = lambda a, b: jnp.where(found, a, b)  # noqa: E731
    return dict(
        k=pick(k, s["k"]),
        i=pick(nxt, held_by).astype(jnp.int32),
        min_val=pick(jnp.zeros((), dtype), lowest),
        spc=pick(jnp.full((c,), inf), spc),
        path=path,
        sr=sr & ~found,
        sc=sc & ~found,
        tree=s["tree"].at[tree_row].set(tree_val),
        u=pick(u, s["u"]),
        v=pick(v, s["v"]),
        col4row=pick(col4row, s["col4row"]),
        row4col=pick(row4col, s["row4col"]),
    )

  final = jax.lax.while_loop(lambda s: s["k"] < n_rows, step, init)
  return final["col4row"]


def linear_sum_assignment(cost: jax.Array, valid_cols: jax.Array | None = None
                          ) -> tuple[jax.Array, jax.Array]:
  """Minimum-total-cost matching of the valid columns (targets) of `cost` (N, M) to distinct
  rows (queries), like `scipy.optimize.linear_sum_assignment` on `cost[:, valid_cols]`.

  Returns (row_for_col (M,), col_for_row (N,)), int32, -1 for none: every valid column gets
  its own row when M_valid <= N; with more valid columns than rows every row gets a column
  and the cheapest set of columns is matched. Invalid (padding) columns get -1 and no row;
  M_valid = 0 matches nothing. Jit- and vmap-able; any N and M.

  Non-finite costs never raise (this runs under jit): NaN and +inf are treated as forbidden,
  -inf as compulsory, by replacing them with finite values beyond the reach of any other
  assignment; a pair with such a cost is matched only where no assignment avoids it. Finite
  costs are exact up to float rounding of sums of costs (the solver computes in the input's
  float type, float32 by default).
  """
  n, m = cost.shape
  if valid_cols is None:
    valid_cols = jnp.ones((m,), bool)
  valid_cols = valid_cols.astype(bool)
  if n == 0 or m == 0:
    return jnp.full((m,), -1, jnp.int32), jnp.full((n,), -1, jnp.int32)
  dtype = jnp.result_type(cost.dtype, jnp.float32)
  rows, pad_cost = _finite_costs(cost.astype(dtype).T, valid_cols)  # (M, N): targets as rows
  width = max(n, m)  # padding columns stand for "unmatched" when M_valid > N is possible
  if width > n:
    rows = jnp.concatenate([rows, jnp.broadcast_to(pad_cost, (m, width - n))], axis=1)
  order = jnp.argsort(~valid_cols, stable=True).astype(jnp.int32)  # valid targets first
  n_valid = jnp.sum(valid_cols).astype(jnp.int32)
  col4row = _augmenting_paths(rows, order, n_valid)
  row_for_col = jnp.where(valid_cols & (col4row < n), col4row, -1).astype(jnp.int32)
  col_for_row = jnp.full((n,), -1, jnp.int32).at[
      jnp.where(row_for_col >= 0, row_for_col, n)].set(jnp.arange(m, dtype=jnp.int32),
                                                        mode="drop")
  return row_for_col, col_for_row
