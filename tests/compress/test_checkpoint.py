"""A compressed checkpoint reloads into the same structure and gives the same outputs."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from reslm.compress import (
  apply_plan,
  load_compressed,
  make_plan,
  save_compressed,
  unfused_projections,
)
from reslm.compress.quantize import Int4Linear, OutlierInt8Linear, W8A8Linear
from reslm.metrics.params import param_bytes
from reslm.models import build_model
from tests.compress.common import CFG

RULES = [
  {"path": r".*/mlp/.*", "method": "int4", "settings": {"group_size": 32}},
  {"path": r".*/mixer/(q|k)", "method": "smoothquant"},
  {"path": r".*/mixer/v", "method": "llm_int8", "settings": {"threshold": 2.0}},
  {"path": r".*/mixer/o", "method": "nf4", "settings": {"block_size": 32}},
  {"path": r"lm_head", "method": "int8"},
  {"path": r".*/mixer", "method": "kv_int8"},
]


def logits_and_decode(model, tokens):
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(s, tok):
    m = nnx.merge(graphdef, s)
    out = m(tok[:, :3], cache=m.init_cache(tok.shape[0], 8), cache_index=0)
    return m(tok).logits, out.logits, out.cache

  with unfused_projections():
    return run(state, tokens)


def test_compressed_checkpoint_reloads_exactly(tmp_path):
  model = build_model(CFG)
  full_bytes = param_bytes(nnx.state(model))
  plan = make_plan(model, RULES)
  rng = np.random.default_rng(0)
  x = {t.name: rng.normal(size=(*t.lead, 64, t.in_shape[0])) for t in plan.calibration_targets()}
  result = apply_plan(model, plan, {k: v.astype(np.float32) for k, v in x.items()})
  meta = {"model": CFG.to_dict(), "compress": {"manifest": result.manifest}}
  save_compressed(str(tmp_path), model, meta, step=7)

  loaded, loaded_meta = load_compressed(str(tmp_path))
  assert loaded_meta["compress"]["manifest"] == result.manifest
  blocks = loaded.layers.groups.blocks[0]
  assert isinstance(blocks.mlp.up, Int4Linear) and blocks.mlp.up.w_packed.dtype == jnp.int8
  assert isinstance(blocks.mixer.q, W8A8Linear) and isinstance(blocks.mixer.v, OutlierInt8Linear)
  assert blocks.mixer.kv_cache_quant == "int8"
  assert param_bytes(nnx.state(loaded)) == param_bytes(nnx.state(model)) < full_bytes / 3

  tokens = jnp.asarray(rng.integers(0, 64, (2, 6)), jnp.int32)
  expected, loaded_out = logits_and_decode(model, tokens), logits_and_decode(loaded, tokens)
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(loaded_out), strict=True):
    np.testing.assert_array_equal(a, b)
  assert expected[2][0]["k"].dtype == jnp.int8  # the decode ran on the int8 KV cache
