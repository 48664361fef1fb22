"""Pareto front against a brute-force definition and hand-built cases."""

import itertools

import numpy as np
import pytest

from reslm.metrics import pareto_front


def brute_force(costs, qualities):
  keep = []
  for i, (c, q) in enumerate(zip(costs, qualities, strict=True)):
    beaten = any(
      c2 <= c and q2 >= q and (c2 < c or q2 > q)
      for j, (c2, q2) in enumerate(zip(costs, qualities, strict=True))
      if j != i
    )
    if not beaten:
      keep.append(i)
  return sorted(keep, key=lambda i: costs[i])


def test_hand_built():
  costs = [1.0, 2.0, 3.0, 2.5, 4.0]
  acc = [0.5, 0.7, 0.9, 0.6, 0.9]
  assert pareto_front(costs, acc) == [0, 1, 2]
  # Loss: lower is better.
  assert pareto_front([1.0, 2.0, 3.0], [2.0, 1.5, 1.7], higher_quality_is_better=False) == [0, 1]


@pytest.mark.parametrize("seed", range(5))
def test_matches_brute_force(seed):
  rng = np.random.default_rng(seed)
  costs = rng.integers(0, 6, 20).astype(float).tolist()  # Ties exercise the strictness rule.
  qual = rng.integers(0, 6, 20).astype(float).tolist()
  assert pareto_front(costs, qual) == brute_force(costs, qual)


def test_missing_points_are_skipped_and_lengths_checked():
  assert pareto_front([1.0, None, 3.0], [0.1, 0.9, None]) == [0]
  with pytest.raises(ValueError, match="2 costs but 1 qualities"):
    pareto_front([1.0, 2.0], [0.5])
  assert list(itertools.chain(pareto_front([], []))) == []
