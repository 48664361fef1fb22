"""Pareto frontiers of quality against cost (survey §9: trade-offs, not single numbers)."""

from collections.abc import Sequence


def pareto_front(
  costs: Sequence[float], qualities: Sequence[float], *, higher_quality_is_better: bool = True
) -> list[int]:
  """Indices of the points no other point beats on both axes, sorted by cost.

  A point is dominated when another costs no more and is at least as good, and is strictly better
  on one of the two. Points with a missing (None) coordinate are never on the front.

  Args:
    costs: Lower is better (bytes, FLOPs, seconds, dollars...).
    qualities: Accuracy (higher is better) or loss (set `higher_quality_is_better=False`).
    higher_quality_is_better: Direction of the quality axis.

  Returns:
    Indices into the inputs, ordered by increasing cost.
  """
  if len(costs) != len(qualities):
    raise ValueError(f"{len(costs)} costs but {len(qualities)} qualities")
  sign = 1.0 if higher_quality_is_better else -1.0
  pts = [
    (c, sign * q, i)
    for i, (c, q) in enumerate(zip(costs, qualities, strict=True))
    if c is not None and q is not None
  ]
  front = []
  for c, q, i in pts:
    dominated = any((c2 <= c and q2 >= q) and (c2 < c or q2 > q) for c2, q2, j in pts if j != i)
    if not dominated:
      front.append((c, i))
  return [i for _, i in sorted(front)]
