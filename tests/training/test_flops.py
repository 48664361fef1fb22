"""Model FLOPs of configured models, against definitions independent of the counter.

Exact attention variants against the hand-written transformer formula; loop-carrying mixers and
scanned layer stacks against XLA's count of the matmuls of the same forward pass with every loop
unrolled by JAX itself; the 6·N parameter count against a hand count of the matmul weights.
"""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from reslm.metrics import flops
from reslm.metrics.jaxpr_flops import xla_loop_free_flops
from reslm.models import ModelConfig, build_model
from reslm.training.flops import model_flops

BATCH, T = 2, 64
BASE = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=2, max_seq_len=T)


def _forward(cfg: ModelConfig, batch: int, seq_len: int):
  """(forward function, abstract params, abstract tokens) of the model."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(cfg)))
  tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
  return lambda p, t: nnx.merge(graphdef, p)(t).logits, nnx.to_pure_dict(state), tokens


def _jax_unrolled(cfg: ModelConfig, batch: int, seq_len: int):
  """The forward pass traced with every loop unrolled by JAX itself.

  Under `jax.disable_jit` JAX runs a scan's body once per step in Python, so the traced program
  has no loops left.
  """
  with jax.disable_jit():
    return jax.make_jaxpr(_forward(cfg, batch, seq_len)[0])(*_forward(cfg, batch, seq_len)[1:])


def _xla_unrolled_matmul_flops(cfg: ModelConfig, batch: int, seq_len: int) -> float:
  """XLA's count of every matmul of the JAX-unrolled forward pass, replayed as one program (XLA's
  `cost_analysis` counts a loop-free program exactly)."""
  jaxpr = _jax_unrolled(cfg, batch, seq_len)
  dots = []

  def collect(j):
    for eqn in (j.jaxpr if hasattr(j, "jaxpr") else j).eqns:
      assert eqn.primitive.name not in ("scan", "while", "cond"), "not a straight-line program"
      if eqn.primitive.name == "dot_general":
        dots.append(eqn)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        collect(sub)

  collect(jaxpr)
  operands = [[jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in e.invars] for e in dots]

  def replay(operands):
    return [e.primitive.bind(*ops, **e.params) for e, ops in zip(dots, operands, strict=True)]

  return jax.jit(replay).lower(operands).cost_analysis()["flops"]


@pytest.mark.parametrize("mixer", ["flash", "memory_efficient"])
def test_exact_attention_counts_as_dense_beyond_one_block(mixer):
  blocks = {"block_q": 16, "block_k": 16}  # T = 4 blocks
  cfg = ModelConfig(**BASE, mixer=mixer, mixer_options=blocks)
  dense = ModelConfig(**BASE, mixer="dense")
  formula = flops.transformer_flops_per_token(
    num_layers=2,
    d_model=32,
    num_heads=2,
    num_kv_heads=2,
    head_dim=16,
    mlp_dim=dense.mlp_dim,
    mlp_kind="swiglu",
    vocab_size=64,
    seq_len=T,
    causal=False,  # Dense attention computes the whole score matrix and masks it.
  )
  got = model_flops(cfg, batch_size=BATCH, seq_len=T)
  assert got["forward_per_token"] == formula["forward"]
  assert got["train_per_token"] == formula["train"]
  assert got["uncounted"] == []
  assert model_flops(dense, batch_size=BATCH, seq_len=T)["forward_per_token"] == formula["forward"]


@pytest.mark.parametrize(
  "options",
  [
    dict(mixer="mamba", mixer_options={"chunk_size": 16}),
    dict(mixer="rwkv", mixer_options={"chunk_size": 16, "mix_lora": 4, "decay_lora": 8}),
    dict(mixer="linear", mixer_options={"chunk_size": 16}),
    # Two groups of (mamba + dense MLP, dense attention + capacity-routed MoE; dropless routing's
    # ragged_dot is dense over every expert in XLA:CPU's count, so it has no XLA reference here).
    dict(
      mixer="mamba,dense",
      num_layers=4,
      mlp="moe",
      mlp_options={"num_experts": 4, "top_k": 2, "every": 2, "dispatch": "capacity"},
      mixer_options={"mamba": {"chunk_size": 16}},
    ),
  ],
  ids=["mamba", "rwkv", "linear", "hybrid_moe"],
)
def test_looping_models_count_as_their_unrolled_program(options):
  cfg = ModelConfig(**{**BASE, **options, "scan_layers": True})
  unrolled = ModelConfig(**{**BASE, **options, "scan_layers": False})
  got = model_flops(cfg, batch_size=BATCH, seq_len=T)
  assert got["uncounted"] == []
  assert got["forward_per_token"] * BATCH * T == _xla_unrolled_matmul_flops(unrolled, BATCH, T)
  # Scanned and unrolled layer stacks are the same model.
  assert model_flops(unrolled, batch_size=BATCH, seq_len=T) == got


def _attention_and_mlp(d, heads, kv_heads, head_dim, mlp_dim):
  return d * heads * head_dim + 2 * d * kv_heads * head_dim + heads * head_dim * d + 3 * d * mlp_dim


@pytest.mark.parametrize("tie", [True, False])
def test_matmul_params_exclude_the_lookup_and_elementwise_parameters(tie):
  cfg = ModelConfig(**{**BASE, "num_kv_heads": 1, "tie_embeddings": tie})
  expected = 2 * _attention_and_mlp(32, 2, 1, 16, cfg.mlp_dim) + 32 * 64  # + the head
  assert model_flops(cfg, batch_size=BATCH, seq_len=T)["matmul_params"] == expected


def test_matmul_params_of_mamba_and_an_moe_count_weights_and_active_experts():
  mamba = ModelConfig(**BASE, mixer="mamba", mixer_options={"expand": 2, "d_state": 4})
  e, n, r = 64, 4, 2  # inner width, state size, Δ rank ceil(32 / 16)
  # in_x, in_z, x_proj (Δ, B, C), W_Δ, out; not the conv filter, A, D or the Δ bias.
  mixer = 2 * 32 * e + e * (r + 2 * n) + r * e + e * 32
  expected = 2 * (mixer + 3 * 32 * mamba.mlp_dim) + 32 * 64
  assert model_flops(mamba, batch_size=BATCH, seq_len=T)["matmul_params"] == expected
  options = {"num_experts": 4, "top_k": 2, "expert_dim": 16, "dispatch": "dropless"}
  moe = ModelConfig(**BASE, mlp="moe", mlp_options=options)
  router, two_experts = 32 * 4, 2 * 3 * 32 * 16
  expected = 2 * (_attention_and_mlp(32, 2, 2, 16, 0) + router + two_experts) + 32 * 64
  assert model_flops(moe, batch_size=BATCH, seq_len=T)["matmul_params"] == expected


@pytest.mark.parametrize("mixer", ["mamba", "linear"])
def test_xla_loop_free_count_equals_xla_on_the_jax_unrolled_forward(mixer):
  cfg = ModelConfig(**BASE, mixer=mixer, mixer_options={"chunk_size": 16})
  jaxpr = _jax_unrolled(ModelConfig(**{**cfg.to_dict(), "scan_layers": False}), BATCH, T)
  avals = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in jaxpr.in_avals]
  expected = flops.xla_cost(jax.jit(jax.extend.core.jaxpr_as_fun(jaxpr)).lower(*avals))["flops"]
  assert xla_loop_free_flops(*_forward(cfg, BATCH, T)) == expected
  # The training figure adds the elementwise work (the selective scan, the loss) to the matmuls.
  got = model_flops(cfg, batch_size=BATCH, seq_len=T, xla_loop_free=True)
  assert got["xla_loop_free_train_per_token"] > got["train_per_token"]
