"""Matmul FLOPs counted from a traced program (its jaxpr), every loop body times its trip count.

XLA's `cost_analysis()` visits a while-loop body once, so any `scan` (over layers, over a chunked
recurrence's chunks, over flash attention's blocks) is undercounted. This counter walks the jaxpr
instead, where each loop's trip count is known, and counts the operations that carry a model's
arithmetic, in real FLOPs (2 per multiply-add):

  dot_general           2 · |output| · |contracted dims|; complex operands × 4 (a complex
                        multiply-add is 4 real ones).
  ragged_dot_general    2 · |output| · |contracted dims|: each row meets its own group's matrix
                        (the routed work; XLA:CPU lowers it densely over every group instead).
  conv_general_dilated  2 · |output| · |kernel| / output features (taps on padding included).
  fft                   XLA's convention: 8 · Π⌊log2 n⌋ · |input|.

Everything else (elementwise ops, reductions, sorts, gathers) is not counted: it is lower order in
matmul-bound models, as in the usual 6·N and attention formulas. Mamba's scan recurrence, RWKV's
decays and softmax are such elementwise work.

Control flow: a `scan` body counts `length` times (`lax.map` and `fori_loop` with static bounds are
scans); a `cond` counts its most expensive branch (flash attention's skipped blocks count as
computed, as dense attention computes them); calls (`pjit`, `checkpoint`, custom derivatives,
`shard_map` times its shards) count their body once. Work the counter cannot see is reported in
`uncounted` instead of silently missing: a `while` loop whose trip count is traced (body counted
once) and `pallas_call` kernels (not counted; under `platform_dependent` the XLA branch is counted).
Count the forward pass: a backward pass traced into the program would count rematerialisation and
custom backward kernels, which are not model FLOPs.

`xla_loop_free_flops` is the other convention: XLA's count of every op (elementwise work too) of
the program with each `scan` unrolled, so no loop body is undercounted.
"""

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.extend import core

from reslm.metrics.flops import xla_cost

# Primitives whose output is the input rearranged or recast: a weight stays a weight through them.
_VIEWS = frozenset(
  {
    "broadcast_in_dim",
    "concatenate",
    "convert_element_type",
    "copy",
    "copy_p",
    "device_put",
    "dynamic_slice",
    "expand_dims",
    "pad",
    "reduce_precision",
    "reshape",
    "rev",
    "sharding_constraint",
    "slice",
    "split",
    "squeeze",
    "stack",
    "transpose",
  }
)
_NONE: frozenset[int] = frozenset()


@dataclasses.dataclass(frozen=True)
class Count:
  """What `count_jaxpr` found.

  Attributes:
    flops: Counted FLOPs of one call of the program.
    matmul_inputs: Indices of the program's inputs that reach a matmul operand directly or through
      views (casts, reshapes, slices, stacking): e.g. which parameters are matmul weights.
    uncounted: Names of primitives whose work was not counted by trip count (see the module
      docstring); empty when the count is complete.
  """

  flops: float
  matmul_inputs: frozenset[int]
  uncounted: tuple[str, ...]


def _size(shape) -> int:
  return math.prod(int(d) for d in shape)


def _is_complex(aval) -> bool:
  return np.issubdtype(aval.dtype, np.complexfloating)


def _dot_flops(eqn) -> float:
  lhs, rhs = (x.aval for x in eqn.invars[:2])
  ragged = eqn.params.get("ragged_dot_dimension_numbers")
  numbers = ragged.dot_dimension_numbers if ragged else eqn.params["dimension_numbers"]
  (lhs_contract, _), _ = numbers
  flops = 2.0 * _size(eqn.outvars[0].aval.shape) * _size(lhs.shape[d] for d in lhs_contract)
  if ragged and not ragged.rhs_group_dimensions:
    # The ragged dimension is contracted (a gradient): the output holds one slice per group, each
    # contracting only its own group's rows, so the work is that of a single slice.
    flops /= eqn.invars[2].aval.shape[-1]  # group_sizes: [..., groups]
  return flops * (4 if _is_complex(lhs) or _is_complex(rhs) else 1)


def _conv_flops(eqn) -> float:
  rhs = eqn.invars[1].aval
  out_features = rhs.shape[eqn.params["dimension_numbers"].rhs_spec[0]]
  return 2.0 * _size(eqn.outvars[0].aval.shape) * _size(rhs.shape) / out_features


def _fft_flops(eqn) -> float:
  logs = math.prod(int(n).bit_length() - 1 for n in eqn.params["fft_lengths"])
  return 8.0 * logs * _size(eqn.invars[0].aval.shape)


_RULES: dict[str, Callable[[Any], float]] = {
  "dot_general": _dot_flops,
  "ragged_dot_general": _dot_flops,
  "conv_general_dilated": _conv_flops,
  "fft": _fft_flops,
}
_OPERANDS = {"dot_general": 2, "ragged_dot_general": 2, "conv_general_dilated": 2, "fft": 0}


@dataclasses.dataclass
class _Walk:
  """One jaxpr's count: FLOPs, inputs reaching matmuls, uncounted work, each output's views."""

  flops: float = 0.0
  matmul_inputs: set = dataclasses.field(default_factory=set)
  uncounted: list = dataclasses.field(default_factory=list)
  out_views: list = dataclasses.field(default_factory=list)

  def add(self, other: "_Walk", times: float = 1.0) -> None:
    self.flops += times * other.flops
    self.matmul_inputs |= other.matmul_inputs
    self.uncounted += other.uncounted


def _open(jaxpr):
  """The Jaxpr of a Jaxpr or ClosedJaxpr (a closed one's constants are never weights)."""
  return jaxpr.jaxpr if isinstance(jaxpr, core.ClosedJaxpr) else jaxpr


def _walk(jaxpr, views: Sequence[frozenset[int]]) -> _Walk:
  """Counts `jaxpr` (Jaxpr or ClosedJaxpr) whose inputs are views of the given input indices."""
  jaxpr = _open(jaxpr)
  env: dict[Any, frozenset[int]] = dict(zip(jaxpr.invars, views, strict=True))

  def view(x) -> frozenset[int]:
    return env.get(x, _NONE) if isinstance(x, core.Var) else _NONE

  out = _Walk()
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    ins = [view(x) for x in eqn.invars]
    outs = [_NONE] * len(eqn.outvars)
    if name in _RULES:
      out.flops += _RULES[name](eqn)
      out.matmul_inputs.update(*ins[: _OPERANDS[name]])
    elif name in _VIEWS:
      outs = [frozenset().union(*ins)] * len(eqn.outvars)
    elif name == "scan":
      out.add(_walk(eqn.params["jaxpr"], ins), eqn.params["length"])
    elif name == "cond":
      branches = [_walk(b, ins[1:]) for b in eqn.params["branches"]]
      costliest = max(branches, key=lambda b: b.flops)
      out.flops += costliest.flops
      out.uncounted += costliest.uncounted
      for b in branches:
        out.matmul_inputs |= b.matmul_inputs
      outs = [frozenset().union(*v) for v in zip(*(b.out_views for b in branches), strict=True)]
    elif name == "while":
      skip = eqn.params["cond_nconsts"]
      out.add(_walk(eqn.params["body_jaxpr"], ins[skip:]))
      out.uncounted.append("while (body counted once)")
    elif name == "pallas_call":
      out.uncounted.append("pallas_call (not counted)")
    else:
      times = 1
      if name == "shard_map":  # The body sees one shard; every device runs it.
        mesh = eqn.params["mesh"]
        times = math.prod(mesh.shape[a] for a in eqn.params["newly_manual_axes"])
      for sub in core.jaxprs_in_params(eqn.params):
        n = len(_open(sub).invars)
        matched = n == len(ins)
        walk = _walk(sub, ins if matched else [_NONE] * n)
        out.add(walk, times)
        if matched and len(walk.out_views) == len(outs):
          outs = walk.out_views
    env.update(zip(eqn.outvars, outs, strict=True))
  out.out_views = [view(x) for x in jaxpr.outvars]
  return out


def count_jaxpr(jaxpr) -> Count:
  """Counts one call of a traced program (a `ClosedJaxpr`, e.g. from `jax.make_jaxpr`).

  Args:
    jaxpr: The program; its inputs are numbered in order for `Count.matmul_inputs`.

  Returns:
    A `Count`.
  """
  walk = _walk(jaxpr, [frozenset({i}) for i in range(len(_open(jaxpr).invars))])
  return Count(walk.flops, frozenset(walk.matmul_inputs), tuple(dict.fromkeys(walk.uncounted)))


def count_flops(fn: Callable[..., Any], *args: Any) -> Count:
  """Traces `fn(*args)` (args may be `jax.ShapeDtypeStruct`s: nothing runs) and counts it.

  `Count.matmul_inputs` indexes the flattened leaves of `args`, in `jax.tree.leaves(args)` order.
  """
  return count_jaxpr(jax.make_jaxpr(fn)(*args))


def unroll_loops(jaxpr):
  """The program with every `scan` (nested ones too) marked for full unrolling when lowered.

  Args:
    jaxpr: A `Jaxpr` or `ClosedJaxpr`.

  Returns:
    The same kind of object; lowered, it has no while loop left except those of `while_loop`s
    with a traced trip count.
  """
  eqns = []
  for eqn in _open(jaxpr).eqns:
    params = {k: _unroll_param(v) for k, v in eqn.params.items()}
    if eqn.primitive.name == "scan":  # An int: `True` would read as 1.
      params["unroll"] = max(1, eqn.params["length"])
    eqns.append(eqn.replace(params=params))
  inner = _open(jaxpr).replace(eqns=eqns)
  return core.ClosedJaxpr(inner, jaxpr.consts) if isinstance(jaxpr, core.ClosedJaxpr) else inner


def _unroll_param(value):
  if isinstance(value, (core.Jaxpr, core.ClosedJaxpr)):
    return unroll_loops(value)
  if isinstance(value, tuple) and any(isinstance(v, (core.Jaxpr, core.ClosedJaxpr)) for v in value):
    return tuple(_unroll_param(v) for v in value)
  return value


def xla_loop_free_flops(fn: Callable[..., Any], *args: Any) -> float | None:
  """XLA's FLOP count of `fn(*args)` with every loop unrolled: all ops, each iteration counted.

  Traces `fn` (args may be `jax.ShapeDtypeStruct`s), unrolls its scans (`unroll_loops`) and
  lowers it; the count is `cost_analysis()` of the lowered program, before XLA's optimisations
  (whose fusions may duplicate elementwise work in the compiled program's count), so nothing is
  compiled. Elementwise ops count 1 FLOP per element, transcendentals none, a `cond` its costliest
  branch. The lowered program grows with the total trip count: meant for models of test or
  ablation size.

  Returns:
    The FLOPs of one call, or None when the backend gives no cost analysis.
  """
  jaxpr = unroll_loops(jax.make_jaxpr(fn)(*args))
  avals = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in jaxpr.in_avals]
  # `xla_cost` reads `cost_analysis()`, which a Lowered has as well as a Compiled.
  return xla_cost(jax.jit(core.jaxpr_as_fun(jaxpr)).lower(*avals))["flops"]
