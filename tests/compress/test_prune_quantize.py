"""Prune -> quantize: every quantizer keeps the pruned weights at exactly zero, so the zero count
and the 2:4 pattern survive (each format represents 0 exactly; GPTQ holds the zeros fixed)."""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from reslm.compress import apply_plan, make_plan
from reslm.compress.layers import CompressedLinear
from reslm.compress.targets import find_targets
from reslm.models import build_model
from tests.compress.common import CFG, random_calibration

MLP = r".*/mlp/.*"  # gate, up [32, 85] and down [85, 32]: a partial 2:4 group of one row.
QUANTIZERS = {
  "int8": ("int8", {}),
  "int4": ("int4", {"group_size": 32}),
  "nf4": ("nf4", {"block_size": 32}),
  "gptq4": ("gptq", {"bits": 4, "group_size": 32, "block_size": 32}),
  "gptq8": ("gptq", {"bits": 8, "block_size": 32}),
  "gptq4_act_order": ("gptq", {"bits": 4, "group_size": 32, "act_order": True}),
  "awq4": ("awq", {"bits": 4, "group_size": 32, "grid": 5}),
  "awq8": ("awq", {"bits": 8, "grid": 5}),
  "smoothquant": ("smoothquant", {}),
  # 64 standard-normal tokens: about one feature in six has max |x| > 3 and stays float.
  "llm_int8": ("llm_int8", {"threshold": 3.0}),
}


@pytest.fixture(scope="module")
def pruned():
  """A model whose MLP projections SparseGPT pruned to 2:4, as (graphdef, state dict)."""
  model = build_model(CFG)
  plan = make_plan(model, [{"path": MLP, "method": "sparsegpt", "settings": {"n_m": "2:4"}}])
  apply_plan(model, plan, random_calibration(plan))
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state)


def weights(module) -> np.ndarray:
  """[layers, K, N] float32 weights of a (stacked) float or compressed projection."""
  if not isinstance(module, CompressedLinear):
    return np.asarray(module.kernel[...]).reshape(
      *module.kernel.shape[:1], -1, module.kernel.shape[-1]
    )
  fn = functools.partial(type(module).weight, static=module.static(), k=module.in_features)
  return np.asarray(jax.vmap(fn)(module.layer_arrays()))


@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_quantizer_keeps_pruned_zeros_and_pattern(pruned, name):
  model = nnx.merge(*pruned)
  before = {t.name: weights(t.module) for t in find_targets(model) if "/mlp/" in t.name}
  method, settings = QUANTIZERS[name]
  plan = make_plan(model, [{"path": MLP, "method": method, "settings": settings}])
  apply_plan(model, plan, random_calibration(plan, seed=1))
  after = {t.name: t for t in find_targets(model) if "/mlp/" in t.name}
  assert not after  # Every MLP projection was replaced ...
  blocks = model.layers.groups.blocks
  for path, w0 in before.items():
    i, proj = int(path.split("/")[3]), path.split("/")[-1]
    w = weights(getattr(blocks[i].mlp, proj))  # ... by a quantized layer.
    zero = w0 == 0
    assert zero.mean() >= 0.49  # 2:4 on K = 32 or 85 (84 in full groups).
    assert (w[zero] == 0).all(), f"{path}: {int((w[zero] != 0).sum())} pruned weights now non-zero"
    assert (w == 0).sum() >= zero.sum()
    full = w.shape[1] // 4 * 4
    groups = (w[:, :full] != 0).reshape(w.shape[0], full // 4, 4, -1).sum(axis=2)
    assert (groups <= 2).all()
