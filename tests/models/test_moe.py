"""Mixture of experts against its definition: dense mixture, capacity drops, losses, layouts."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from reslm.metrics.params import active_params, count_params
from reslm.models import ModelConfig, build_model
from reslm.models.moe import MoE, expert_usage, load_balancing_loss, z_loss
from tests.models.mixer_checks import (
  check_causal,
  check_decoding,
  check_one_line_error,
  first_block,
  logits,
  randomize,
)
from tests.models.mixer_checks import tokens as mixer_tokens

D, H, E = 16, 24, 4
TOL = dict(atol=1e-5, rtol=1e-5)


def make(num_experts=E, *, router_std=1.0, seed=0, **kw) -> MoE:
  moe = MoE(D, H, num_experts, rngs=nnx.Rngs(seed), init_std=0.2, out_init_std=0.2, **kw)
  # A larger router scale than the default init so routing is far from uniform.
  k = jax.random.normal(jax.random.key(seed + 1), (D, num_experts)) * router_std
  moe.router.kernel[...] = k
  return moe


def inputs(n=12, seed=2):
  return jax.random.normal(jax.random.key(seed), (2, n // 2, D), jnp.float32)


def expert_ref(moe: MoE, e: int, x_nd):
  """Expert e applied to every row, from its slice of the stacked weights."""
  ex = moe.experts
  w = lambda v: np.asarray(v[...])[e]
  if ex.kind == "swiglu":
    h = jax.nn.silu(x_nd @ w(ex.w_gate)) * (x_nd @ w(ex.w_up))
    return h @ w(ex.w_down)
  h = jax.nn.gelu(x_nd @ w(ex.w_up) + w(ex.b_up))
  return h @ w(ex.w_down) + w(ex.b_down)


def reference(moe: MoE, x, weights_ne):
  """Σ_e weights[n, e] · expert_e(x_n)."""
  x_nd = x.reshape(-1, D)
  out = sum(weights_ne[:, e : e + 1] * expert_ref(moe, e, x_nd) for e in range(moe.num_experts))
  return np.asarray(out).reshape(x.shape)


def router_probs(moe, x):
  return np.asarray(jax.nn.softmax(moe.router(x.reshape(-1, D)), axis=-1))


@pytest.mark.parametrize("expert_mlp", ["swiglu", "gelu"])
@pytest.mark.parametrize(
  "kw",
  [
    dict(dispatch="capacity", capacity_factor=1.0),
    dict(dispatch="dropless"),
    dict(routing="expert_choice", capacity_factor=float(E)),  # every expert takes every token
  ],
)
def test_all_experts_equal_dense_mixture(kw, expert_mlp):
  moe = make(top_k=E, expert_mlp=expert_mlp, **kw)
  x = inputs()
  out, aux = moe(x)
  np.testing.assert_allclose(out, reference(moe, x, router_probs(moe, x)), **TOL)
  assert aux.shape == () and np.isfinite(aux)


@pytest.mark.parametrize(("top_k", "normalize_gates"), [(1, False), (2, True)])
def test_capacity_equals_dropless_when_nothing_is_dropped(top_k, normalize_gates):
  kw = dict(top_k=top_k, normalize_gates=normalize_gates)
  cap = make(dispatch="capacity", capacity_factor=E / top_k, **kw)  # C = tokens: no drops
  drop = make(dispatch="dropless", **kw)
  x = inputs()
  (o1, a1), (o2, a2) = cap(x), drop(x)
  np.testing.assert_allclose(o1, o2, **TOL)
  np.testing.assert_allclose(a1, a2, **TOL)
  # And both equal the definition: top-k probabilities (renormalised or not) times the experts.
  p = router_probs(cap, x)
  idx = np.argsort(-p, axis=-1)[:, :top_k]
  w = np.zeros_like(p)
  np.put_along_axis(w, idx, np.take_along_axis(p, idx, -1), -1)
  if normalize_gates:
    w = w / w.sum(-1, keepdims=True)
  np.testing.assert_allclose(o1, reference(cap, x, w), **TOL)

  def loss(model):
    out, aux = model(x)
    return jnp.sum(out**2) + aux

  g1, g2 = nnx.grad(loss)(cap), nnx.grad(loss)(drop)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_pallas_grouped_matmul_path_equals_ragged_dot():
  # On CPU the kernel API dispatches to its reference under its own custom VJP: this checks the
  # wiring (shapes, dtypes, gradients through the custom VJP), the kernels have their own tests.
  xla = make(dispatch="dropless", grouped_matmul="xla")
  pallas = make(dispatch="dropless", grouped_matmul="pallas")
  x = inputs()
  np.testing.assert_allclose(pallas(x)[0], xla(x)[0], **TOL)

  def loss(model):
    out, aux = model(x)
    return jnp.sum(out**2) + aux

  for a, b in zip(
    jax.tree.leaves(nnx.grad(loss)(pallas)), jax.tree.leaves(nnx.grad(loss)(xla)), strict=True
  ):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_auto_grouped_matmul_is_ragged_dot_on_cpu(dtype):
  """The default ("auto") is jax.lax.ragged_dot on CPU: outputs and gradients equal "xla" exactly,
  also in bfloat16 (the kernel API's own CPU fallback would compute in float32)."""
  auto = make(dispatch="dropless", dtype=dtype)
  assert auto.experts.grouped_impl == "auto"
  xla = make(dispatch="dropless", grouped_matmul="xla", dtype=dtype)
  x = inputs().astype(dtype)

  def value_and_grads(model):
    def loss(model):
      out, aux = model(x)
      return jnp.sum(out.astype(jnp.float32) ** 2) + aux

    return nnx.jit(nnx.value_and_grad(loss))(model)

  (got, got_grads), (want, want_grads) = value_and_grads(auto), value_and_grads(xla)
  np.testing.assert_array_equal(got, want)
  for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
    np.testing.assert_array_equal(a, b)


def test_auto_grouped_matmul_exports_the_kernels_for_tpu_only():
  """Lowered for TPU, the dropless MoE's forward and gradient run the Pallas ragged-matmul kernels
  (forward, d lhs, d rhs); lowered for CPU there is no kernel (ragged_dot)."""
  graphdef, state = nnx.split(make(dispatch="dropless"))
  x = inputs()

  def loss(state):
    out, aux = nnx.merge(graphdef, state)(x)
    return jnp.sum(out**2) + aux

  def lowered(platform):
    return jax.export.export(jax.jit(jax.value_and_grad(loss)), platforms=[platform])(state)

  names = re.findall(r'kernel_name = "(ragged_matmul\w*)"', lowered("tpu").mlir_module())
  # 3 grouped matmuls (gate, up, down): a forward and a d rhs kernel each, and a d lhs kernel
  # only for the down projection (the gate/up inputs are token copies, not parameters).
  assert (
    sorted(names) == ["ragged_matmul"] * 3 + ["ragged_matmul_dlhs"] + ["ragged_matmul_drhs"] * 3
  )
  assert "custom_call" not in lowered("cpu").mlir_module()
  # Partitioned over a mesh (data parallel on 2 devices), the same kernels run once per device in
  # a shard_map over every mesh axis (XLA cannot partition a Mosaic kernel).
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))

  def partitioned(state):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return jax.value_and_grad(loss)(state)

  text = jax.jit(partitioned).trace(state).lower(lowering_platforms=("tpu",)).as_text()
  assert sorted(re.findall(r'kernel_name = "(ragged_matmul\w*)"', text)) == sorted(names)
  assert "sdy.manual_computation" in text


def _hand_router(moe, rows):
  """Router rows for input features 0 and 1; every other feature gets zero router weight."""
  k = np.zeros((D, moe.num_experts), np.float32)
  k[: len(rows)] = rows
  moe.router.kernel[...] = jnp.asarray(k)


def test_tokens_over_capacity_are_dropped():
  # All 8 tokens prefer expert 0 (top-1); C = ceil(1.0 · 8 · 1 / 4) = 2.
  moe = make(top_k=1, capacity_factor=1.0)
  _hand_router(moe, [[10.0, 0.0, 0.0, 0.0]])
  x = inputs(n=8).at[..., 0].set(1.0)
  out = np.asarray(moe(x)[0]).reshape(8, D)
  p = router_probs(moe, x)
  w = np.zeros_like(p)
  w[:2, 0] = p[:2, 0]  # Only the first C tokens in flattened (batch, seq) order are served.
  np.testing.assert_allclose(out, reference(moe, x, w).reshape(8, D), **TOL)
  assert np.all(out[2:] == 0) and np.all(np.abs(out[:2]).sum(-1) > 0)


def test_first_choices_queue_before_second_choices():
  # Tokens 0-3 prefer experts (0, 1), tokens 4-7 prefer (1, 2); E = 3, k = 2,
  # C = ceil(0.75 · 8 · 2 / 3) = 4. Expert 1 is filled by tokens 4-7's first choices, so tokens
  # 0-3's second choices are dropped (a token-major queue would drop tokens 4-7 instead).
  moe = make(num_experts=3, top_k=2, capacity_factor=0.75)
  _hand_router(moe, [[5.0, 3.0, 0.0], [0.0, 5.0, 3.0]])
  x = inputs(n=8).at[..., :2].set(0.0)
  x = x.reshape(8, D).at[:4, 0].set(1.0).at[4:, 1].set(1.0).reshape(2, 4, D)
  p = router_probs(moe, x)
  w = np.zeros_like(p)
  w[:4, 0] = p[:4, 0]
  w[4:, 1:] = p[4:, 1:]
  np.testing.assert_allclose(moe(x)[0], reference(moe, x, w), **TOL)


def test_causal_capacity_queues_token_major_per_sequence():
  """The same routing as above, in a decoder (causal=True): each sequence is a capacity group and
  its assignments queue in position order, so the earlier tokens 0-3 keep both choices and the
  later tokens 4-7 lose their first choice (expert 1, full) and keep their second (expert 2)."""
  moe = make(num_experts=3, top_k=2, dispatch="capacity", capacity_factor=0.75, causal=True)
  _hand_router(moe, [[5.0, 3.0, 0.0], [0.0, 5.0, 3.0]])
  x = inputs(n=16).reshape(16, D).at[:, :2].set(0.0)
  x = x.at[:4, 0].set(1.0).at[4:8, 1].set(1.0).at[8:12, 0].set(1.0).at[12:, 1].set(1.0)
  x = x.reshape(2, 8, D)  # Two sequences of 8, routed alike; C = ceil(0.75 · 8 · 2 / 3) = 4 each.
  p = router_probs(moe, x)
  w = np.zeros_like(p)
  for row in (0, 8):  # Each sequence has its own slots: the second is served like the first.
    w[row : row + 4, :2] = p[row : row + 4, :2]
    w[row + 4 : row + 8, 2] = p[row + 4 : row + 8, 2]
  np.testing.assert_allclose(moe(x)[0], reference(moe, x, w), **TOL)


def future_changes_past(moe, x, j):
  """Largest change of positions < j when the inputs from position j on change."""
  changed = x.at[:, j:].set(jax.random.normal(jax.random.key(7), x[:, j:].shape))
  return float(jnp.abs(moe(changed)[0][:, :j] - moe(x)[0][:, :j]).max())


@pytest.mark.parametrize(
  "kw",
  [
    dict(dispatch="capacity", top_k=2, capacity_factor=0.5),
    dict(dispatch="capacity", top_k=1, capacity_factor=0.5),
    dict(routing="expert_choice", capacity_factor=0.5),
  ],
)
def test_encoder_routing_lets_future_tokens_change_past_outputs(kw):
  """Why a decoder cannot use these as an encoder does: a batch-wide (or, for expert choice,
  call-wide) competition for slots makes earlier positions depend on later ones. Measured on a
  2-layer decoder before the fix: max |Δ past logits| 5.6 (top-2), 4.3 (top-1), 7.8 (expert
  choice) when one future token changes."""
  moe = make(**kw)
  assert future_changes_past(moe, inputs(n=16), j=5) > 1e-3


@pytest.mark.parametrize("top_k", [1, 2])
def test_causal_capacity_drops_but_no_future_token_changes_a_past_output(top_k):
  moe = make(top_k=top_k, dispatch="capacity", capacity_factor=0.5, causal=True)
  x = inputs(n=16)
  out = np.asarray(moe(x)[0])
  dropless = np.asarray(make(top_k=top_k, dispatch="dropless")(x)[0])
  assert not np.allclose(out, dropless, atol=1e-3)  # Assignments really are dropped.
  for j in (1, 4, 7):
    assert future_changes_past(moe, x, j) == 0.0
  # Sequences are separate groups: changing sequence 1 leaves sequence 0 alone.
  other = x.at[1].set(jax.random.normal(jax.random.key(8), x[1].shape))
  np.testing.assert_array_equal(moe(other)[0][0], out[0])


def test_load_balancing_loss_formula():
  # Balanced routing and uniform probabilities: E · Σ (1/E)(1/E) = 1.
  probs = jnp.full((4, 2), 0.5)
  assert np.isclose(load_balancing_loss(probs, jnp.array([[0], [1], [0], [1]])), 1.0)
  # Everything to expert 0 with P = (0.9, 0.1): 2 · (1 · 0.9 + 0 · 0.1) = 1.8.
  probs = jnp.tile(jnp.array([[0.9, 0.1]]), (4, 1))
  assert np.isclose(load_balancing_loss(probs, jnp.zeros((4, 1), jnp.int32)), 1.8)
  # Top-2 over 4 experts: f counts all 6 assignments; f = (2, 2, 1, 1)/6, P from the rows.
  probs = jnp.array([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
  experts = jnp.array([[0, 1], [3, 2], [0, 1]])
  f = np.array([2, 2, 1, 1]) / 6
  expected = 4 * np.sum(f * np.asarray(probs).mean(0))
  np.testing.assert_allclose(load_balancing_loss(probs, experts), expected, rtol=1e-6)


def test_z_loss_formula():
  logits = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
  expected = np.mean(np.log(np.exp(logits).sum(-1)) ** 2)
  np.testing.assert_allclose(z_loss(jnp.asarray(logits)), expected, rtol=1e-6)


@pytest.mark.parametrize("top_k", [1, 2])
def test_layer_aux_loss_on_uniform_router(top_k):
  # Zero router: uniform probabilities, ties go to the lowest indices, so f_e = 1/k for e < k and
  # the balance loss is E · k · (1/k)(1/E) = 1; logsumexp(0) = log E, so z-loss = (log E)².
  moe = make(top_k=top_k, router_std=0.0, aux_loss_weight=0.3, z_loss_weight=0.05)
  _, aux = moe(inputs())
  np.testing.assert_allclose(aux, 0.3 * 1.0 + 0.05 * math.log(E) ** 2, rtol=1e-6)


def test_expert_choice_each_expert_takes_exactly_c_tokens():
  cf = 1.5
  moe = make(routing="expert_choice", capacity_factor=cf)
  x = inputs(n=12)
  p = router_probs(moe, x)
  c = math.ceil(cf * 12 / E)  # = 5
  w = np.zeros_like(p)
  for e in range(E):
    chosen = np.argsort(-p[:, e], kind="stable")[:c]
    w[chosen, e] = p[chosen, e]
  assert np.all((w > 0).sum(0) == c)  # the reference really gives each expert C tokens
  out, aux = moe(x)
  np.testing.assert_allclose(out, reference(moe, x, w), **TOL)
  # Only the z-loss: expert choice is balanced by construction.
  np.testing.assert_allclose(aux, 1e-3 * z_loss(moe.router(x.reshape(-1, D))), rtol=1e-6)


@pytest.mark.parametrize(
  "kw",
  [
    dict(dispatch="capacity", top_k=2),
    dict(dispatch="dropless", top_k=1),
    dict(dispatch="dropless", top_k=2, expert_mlp="gelu"),
    dict(routing="expert_choice"),
  ],
)
def test_gradients_finite_and_reach_router_and_experts(kw):
  moe = make(**kw)
  x = inputs()

  def loss(model, x):
    out, aux = model(x)
    return jnp.mean(out**2) + aux

  grads, gx = jax.jit(nnx.grad(loss, argnums=(0, 1)))(moe, x)
  for leaf in [*jax.tree.leaves(grads), gx]:
    assert np.isfinite(np.asarray(leaf)).all()
  assert np.abs(grads.router.kernel[...]).sum() > 0
  assert np.abs(grads.experts.w_down[...]).sum() > 0
  assert np.abs(gx).sum() > 0


TINY = dict(vocab_size=37, d_model=32, num_layers=4, num_heads=4, max_seq_len=32, mlp="moe")


def tokens(b=2, t=10):
  return jax.random.randint(jax.random.key(0), (b, t), 0, 37, jnp.int32)


@pytest.mark.parametrize(
  ("mixer", "num_layers", "every", "group"), [("dense", 4, 2, 2), ("dense,dense,dense", 6, 2, 6)]
)
def test_every_k_places_moe_on_layers_with_index_plus_one_divisible_by_k(
  mixer, num_layers, every, group
):
  cfg = ModelConfig(**{**TINY, "num_layers": num_layers}, mixer=mixer, mlp_options={"every": every})
  assert cfg.group_size == group
  model = nnx.eval_shape(lambda: build_model(cfg))
  blocks = model.layers.groups.blocks
  assert model.layers.num_groups * len(blocks) == num_layers
  for i in range(num_layers):
    assert isinstance(blocks[i % group].mlp, MoE) == ((i + 1) % every == 0), i


def test_num_layers_must_fill_whole_groups():
  with pytest.raises(ValueError, match=r"model\.num_layers=3 .* block group length 2") as e:
    ModelConfig(**{**TINY, "num_layers": 3}, mlp_options={"every": 2})
  assert "\n" not in str(e.value)


@pytest.mark.parametrize(
  ("options", "match"),
  [
    ({"top_k": 9}, r"top_k=9 exceeds num_experts=8"),
    ({"num_experts": 0}, r"num_experts=0 is not allowed"),
    ({"routing": "hash"}, r"routing='hash' is not allowed .* topk, expert_choice"),
    ({"dispatch": "gshard"}, r"dispatch='gshard' is not allowed"),
    ({"capacity_factor": 0}, r"capacity_factor=0 is not allowed"),
    ({"expert_mlp": "relu"}, r"expert_mlp='relu' is not allowed .* swiglu, gelu"),
    ({"expert_dim": -1}, r"expert_dim=-1 is not allowed"),
    ({"aux_loss_weight": -1.0}, r"aux_loss_weight=-1.0 is not allowed"),
    ({"normalize_gates": 1}, r"normalize_gates=1 is not allowed"),
    ({"every": 0}, r"every=0 is not allowed"),
    ({"dense_mlp": "moe"}, r"dense_mlp='moe' is not allowed"),
    ({"grouped_matmul": "triton"}, r"grouped_matmul='triton' is not allowed .* auto, xla, pallas"),
    ({"experts": 4}, r"model\.mlp_options\.experts is not a setting of MLP 'moe'"),
  ],
)
def test_bad_options_give_one_line_errors(options, match):
  with pytest.raises(ValueError, match=match) as e:
    ModelConfig(**TINY, mlp_options=options)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize(
  "options",
  [
    dict(num_experts=4, top_k=1, every=2, expert_mlp="gelu", expert_dim=16),
    dict(num_experts=4, routing="expert_choice", capacity_factor=1.5, expert_dim=16),
  ],
)
def test_active_params_hand_count(options):
  kind = "encoder" if options.get("routing") == "expert_choice" else "decoder"
  cfg = ModelConfig(**TINY, kind=kind, mlp_options=options)
  state = nnx.state(nnx.eval_shape(lambda: build_model(cfg)), nnx.Param)
  d, h, e = 32, 16, 4
  gelu = options.get("expert_mlp") == "gelu"
  # gelu: w_up, b_up, w_down, b_down; swiglu: w_gate, w_up, w_down.
  per_layer = e * (d * h + h + h * d + d) if gelu else e * 3 * d * h
  moe_layers = 4 // options.get("every", 1)
  expert_total = moe_layers * per_layer
  per_token = 1.0 if options.get("routing") != "expert_choice" else 1.5
  expected = count_params(state) - expert_total + expert_total * per_token / e
  usage = expert_usage(cfg)
  assert usage == dict(num_experts=e, experts_per_token=per_token)
  assert active_params(state, **usage) == round(expected)  # via `expert` axis metadata
  assert active_params(state.to_pure_dict(), **usage) == round(expected)  # via the path


def test_active_params_of_a_dense_model_is_the_total():
  cfg = ModelConfig(**{**TINY, "mlp": "swiglu"})
  state = nnx.state(nnx.eval_shape(lambda: build_model(cfg)), nnx.Param)
  assert expert_usage(cfg) is None
  assert active_params(state) == count_params(state)


@pytest.mark.parametrize(
  "options", [dict(dispatch="dropless"), dict(dispatch="capacity", capacity_factor=E / 2)]
)
def test_cached_decoding_equals_full_forward(options):
  """Position-wise, so decoding needs no MoE state; with capacity dispatch the capacity depends
  on the tokens in each call, so the two agree only when nothing is dropped (C >= tokens)."""
  cfg = ModelConfig(
    **{**TINY, "num_layers": 2}, mlp_options={"num_experts": E, "top_k": 2, **options}
  )
  model = build_model(cfg)
  call = nnx.jit(lambda m, x, cache, i: m(x, cache=cache, cache_index=i))
  x = tokens(t=9)
  full = nnx.jit(lambda m, x: m(x).logits)(model, x)
  out = call(model, x[:, :4], model.init_cache(2, 12), 0)  # Prefill 4 tokens at once.
  steps, cache = [out.logits], out.cache
  for t in range(4, 9):  # Then one token at a time.
    out = call(model, x[:, t : t + 1], cache, jnp.asarray(t))
    steps.append(out.logits)
    cache = out.cache
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=2e-5, rtol=1e-5)


def test_decoder_default_dispatch_is_dropless_and_encoder_default_is_capacity():
  decoder = build_model(ModelConfig(**TINY))
  encoder = build_model(ModelConfig(**TINY, kind="encoder"))
  assert first_block(decoder).mlp.dispatch == "dropless" and first_block(decoder).mlp.causal
  assert first_block(encoder).mlp.dispatch == "capacity" and not first_block(encoder).mlp.causal
  assert first_block(decoder).mlp.decode_inexact is None


@pytest.mark.parametrize(
  "options",
  [
    dict(top_k=2),  # The default dispatch (dropless in a decoder).
    dict(top_k=2, dispatch="capacity", capacity_factor=0.5),
    dict(top_k=1, dispatch="capacity", capacity_factor=0.5),
  ],
)
def test_decoder_moe_is_causal(options):
  """No future token changes a past logit. The capacity cases (half the assignments dropped) fail
  before the fix, when capacity competed across the whole batch, choice-major."""
  cfg = ModelConfig(**{**TINY, "num_layers": 2}, mlp_options={"num_experts": E, **options})
  model = randomize(build_model(cfg), 0.3)
  x = mixer_tokens(b=2, t=14)
  check_causal(model, x, np.asarray(logits(model, x)))


def test_decoder_capacity_with_drops_decodes_inexactly_and_says_so():
  """A one-token step never fills an expert, the full forward does: they differ, and the layer's
  `decode_inexact` (which `generate` prints) names the reason."""
  options = {"num_experts": E, "top_k": 2, "dispatch": "capacity", "capacity_factor": 0.5}
  model = randomize(build_model(ModelConfig(**{**TINY, "num_layers": 2}, mlp_options=options)), 0.3)
  assert "capacity dispatch" in first_block(model).mlp.decode_inexact
  x = mixer_tokens(b=2, t=8)
  with pytest.raises(AssertionError):
    check_decoding(model, x, np.asarray(logits(model, x)), prefill=1)


def test_expert_choice_in_a_decoder_is_a_one_line_error():
  check_one_line_error(
    lambda: ModelConfig(**TINY, mlp_options={"routing": "expert_choice"}),
    r"model\.mlp_options\.routing='expert_choice' is not allowed in a causal decoder",
  )
  check_one_line_error(
    lambda: make(routing="expert_choice", causal=True),
    r"^routing='expert_choice' is not allowed in a causal decoder",
  )
  ModelConfig(**TINY, kind="encoder", mlp_options={"routing": "expert_choice"})  # Fine there.
