"""Exact attention variants (memory_efficient, flash, sliding_window) against dense references:
forward and gradients, masks, GQA, causality and KV-cache decoding through the model, settings
errors, and a compiled-memory check."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import reslm.models.attention.flash  # noqa: F401  (registers the variants)
import reslm.models.attention.memory_efficient  # noqa: F401
import reslm.models.attention.sliding_window  # noqa: F401
from reslm.models import ModelConfig, build_model
from reslm.models.attention.base import MaskInfo, reference_attention
from reslm.models.attention.flash import flash_attention
from reslm.models.attention.memory_efficient import chunked_attention
from reslm.models.attention.sliding_window import band_mask
from reslm.models.registry import MIXERS

HEADS, HEAD_DIM, T = 4, 8, 21  # T is not a multiple of any block size below.
BLOCKS = dict(block_q=4, block_k=8)
OPTIONS = {"memory_efficient": BLOCKS, "flash": BLOCKS, "sliding_window": dict(window=3)}
TINY = dict(vocab_size=37, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, max_seq_len=32)


def mixer(name, *, causal=True, num_kv_heads=HEADS, **options):
  cfg = ModelConfig(
    vocab_size=8,
    d_model=HEADS * HEAD_DIM,
    num_layers=1,
    num_heads=HEADS,
    num_kv_heads=num_kv_heads,
    mixer=name,
    mixer_options=options or OPTIONS[name],
  )
  return MIXERS.build(name, cfg, causal=causal, rngs=nnx.Rngs(0))


def inputs(num_kv_heads, dtype, segments, causal, t=T, seed=0):
  kq, kk, kv, kc = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(kq, (2, t, HEADS, HEAD_DIM), dtype)
  k = jax.random.normal(kk, (2, t, num_kv_heads, HEAD_DIM), dtype)
  v = jax.random.normal(kv, (2, t, num_kv_heads, HEAD_DIM), dtype)
  ct = jax.random.normal(kc, q.shape, dtype)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (2, t))
  seg = None
  if segments:  # Two packed sequences plus trailing padding; the second row is one sequence.
    first = np.array([1] * 8 + [2] * (t - 12) + [0] * 4)
    seg = jnp.asarray(np.stack([first, np.ones(t, int)]), jnp.int32)
  return (q, k, v), ct, MaskInfo(pos, pos, jnp.ones((2, t), bool), seg, seg, causal)


def dense_mask(name, info):
  mask = info.dense_mask()
  if name == "sliding_window":
    mask = mask & band_mask(info.q_pos, info.kv_pos, OPTIONS[name]["window"], info.causal)
  return mask


def forward_and_vjp(attend, args, ct):
  """Output and input gradients for a cotangent, compiled once."""

  @jax.jit
  def run(args, ct):
    out, vjp = jax.vjp(attend, *args)
    return out, vjp(ct)

  return run(args, ct)


def assert_close(a, b, tol, reduction):
  tol = tol * max(1.0, np.sqrt(reduction / 16))
  np.testing.assert_allclose(
    np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol, rtol=tol
  )


@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize(
  ("num_kv_heads", "segments"), [(HEADS, False), (HEADS // 2, True), (1, True)], ids=str
)
def test_matches_reference_f32(name, causal, num_kv_heads, segments):
  """Forward and vjp (random cotangent) w.r.t. q, k, v equal dense attention's."""
  (q, k, v), ct, info = inputs(num_kv_heads, jnp.float32, segments, causal)
  layer = mixer(name, causal=causal, num_kv_heads=num_kv_heads)
  mask = dense_mask(name, info)
  out, grads = forward_and_vjp(lambda *a: layer.attend(*a, info), (q, k, v), ct)
  ref, ref_grads = forward_and_vjp(lambda *a: reference_attention(*a, mask), (q, k, v), ct)
  assert out.shape == q.shape and out.dtype == q.dtype
  assert_close(out, ref, 1e-5, T)
  for got, want in zip(grads, ref_grads, strict=True):
    assert_close(got, want, 1e-5, T * HEADS)


@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_matches_reference_bf16(name, causal):
  """bf16 inputs stay within bf16 error of the float32 reference on the same values."""
  (q, k, v), ct, info = inputs(2, jnp.bfloat16, True, causal)
  layer = mixer(name, causal=causal, num_kv_heads=2)
  mask = dense_mask(name, info)
  out, grads = forward_and_vjp(lambda *a: layer.attend(*a, info), (q, k, v), ct)
  up = tuple(x.astype(jnp.float32) for x in (q, k, v, ct))
  ref, ref_grads = forward_and_vjp(lambda *a: reference_attention(*a, mask), up[:3], up[3])
  assert out.dtype == jnp.bfloat16
  assert_close(out, ref, 1e-2, T)
  for got, want in zip(grads, ref_grads, strict=True):
    assert got.dtype == jnp.bfloat16
    assert_close(got, want, 1e-2, T * HEADS)


def test_sliding_window_sees_only_the_window():
  """Outputs move only when a key inside the window changes."""
  (q, k, v), _, info = inputs(HEADS, jnp.float32, False, True, t=40)
  layer = mixer("sliding_window", window=5)
  base = layer.attend(q, k, v, info)
  changed = layer.attend(q, k, v.at[:, 20].add(1.0), info)
  moved = np.abs(np.asarray(changed - base)).max(axis=(0, 2, 3)) > 0
  np.testing.assert_array_equal(np.flatnonzero(moved), np.arange(20, 25))


def tiny(name, **kw) -> ModelConfig:
  return ModelConfig(**{**TINY, "mixer": name, "mixer_options": OPTIONS[name], **kw})


def compiled(model):
  """The model's call under one `jax.jit` (a traced cache_index, so decode steps share it)."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(x, cache=None, cache_index=None, segment_ids=None):
    out = nnx.merge(graphdef, state)(
      x, cache=cache, cache_index=cache_index, segment_ids_bt=segment_ids
    )
    return out.logits, out.cache

  return run


def tokens(t, seed=0):
  return jax.random.randint(jax.random.key(seed), (2, t), 0, 37, jnp.int32)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_model_is_causal(name):
  """Changing token t + 1 never changes the logits at positions <= t."""
  model = compiled(build_model(tiny(name)))
  x = tokens(16)
  base = model(x)[0]
  for t in (0, 6, 13):
    changed = model(x.at[:, t + 1].set((x[:, t + 1] + 1) % 37))[0]
    np.testing.assert_allclose(changed[:, : t + 1], base[:, : t + 1], atol=1e-6, rtol=0)
    assert not np.allclose(changed[:, t + 1 :], base[:, t + 1 :])


@pytest.mark.parametrize("name", list(OPTIONS))
def test_kv_cache_decoding_equals_full_forward(name):
  model = build_model(tiny(name))
  run = compiled(model)
  x = tokens(14)
  full, _ = run(x)
  logits, cache = run(x[:, :5], model.init_cache(batch=2, max_len=20), jnp.int32(0))
  steps = [logits]
  for t in range(5, 14):  # One token at a time; keys past the cache index are masked out.
    logits, cache = run(x[:, t : t + 1], cache, jnp.int32(t))
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(("name", "kind"), [("memory_efficient", "decoder"), ("flash", "encoder")])
def test_model_equals_dense_model(name, kind):
  """Same parameters, same logits as the dense model, with packed segments."""
  cfg = tiny(name, kind=kind)
  dense = build_model(dataclasses.replace(cfg, mixer="dense", mixer_options={}))
  model = nnx.merge(nnx.graphdef(build_model(cfg)), nnx.state(dense))
  x = tokens(13)
  seg = jnp.asarray([[1] * 6 + [2] * 5 + [0] * 2, [1] * 13], jnp.int32)
  want, _ = compiled(dense)(x, segment_ids=seg)
  got, _ = compiled(model)(x, segment_ids=seg)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(
  ("name", "options", "key"),
  [
    ("sliding_window", dict(window=0), "window"),
    ("sliding_window", dict(window=-3), "window"),
    ("sliding_window", dict(window=2, block_q=4), "block_q"),
    ("memory_efficient", dict(block_q=0), "block_q"),
    ("memory_efficient", dict(block_k=-1), "block_k"),
    ("memory_efficient", dict(chunk=4), "chunk"),
    ("flash", dict(block_q=-2), "block_q"),
    ("flash", dict(block_k=0), "block_k"),
    ("flash", dict(implementation="cuda"), "implementation"),
    ("flash", dict(implementation="pallas", block_q=32), "block_q"),
    ("flash", dict(implementation="pallas", block_k=64), "block_k"),
    ("flash", dict(implementation="pallas", interpret=True, block_q=12), "block_q"),
    ("flash", dict(implementation="pallas", interpret="yes"), "interpret"),
    ("flash", dict(interpret=True), "interpret"),  # Interpret mode needs implementation='pallas'.
  ],
)
def test_bad_settings_raise_one_line_errors(name, options, key):
  with pytest.raises(ValueError, match=rf"model\.mixer_options\.{key}") as err:
    build_model(ModelConfig(**{**TINY, "mixer": name, "mixer_options": options}))
  assert "\n" not in str(err.value)


def test_blocked_variants_use_far_less_memory_than_dense():
  """Compiled scratch memory of forward + backward at T=2048: no T² buffers."""
  t = 2048
  q = jax.ShapeDtypeStruct((1, t, 2, 32), jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (1, t))
  info = MaskInfo(pos, pos, jnp.ones((1, t), bool), None, None, True)

  def temp_bytes(attend):
    def loss(q, k, v):
      return jnp.sum(attend(q, k, v) ** 2)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, q, q).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  dense = temp_bytes(lambda q, k, v: reference_attention(q, k, v, info.dense_mask()))
  assert dense > 2 * t * t * 4  # At least the float32 score matrix for the two heads.
  for fn in (chunked_attention, flash_attention):
    blocked = temp_bytes(lambda q, k, v, fn=fn: fn(q, k, v, info, 128, 128))
    assert blocked < 0.25 * dense, (fn.__name__, blocked, dense)


PALLAS = dict(implementation="pallas", interpret=True, block_q=8, block_k=128)


@pytest.mark.parametrize(
  ("causal", "num_kv_heads", "segments"), [(True, 2, True), (False, 1, False)]
)
def test_pallas_flash_matches_reference(causal, num_kv_heads, segments):
  """implementation='pallas' (the TPU kernel, interpreted): forward and vjp equal dense attention."""
  (q, k, v), ct, info = inputs(num_kv_heads, jnp.float32, segments, causal)
  layer = mixer("flash", causal=causal, num_kv_heads=num_kv_heads, **PALLAS)

  def attend(q, k, v):
    return layer.mix(q, k, v, segment_ids_bt=info.q_seg)[0]

  out, grads = forward_and_vjp(attend, (q, k, v), ct)
  mask = info.dense_mask()
  ref, ref_grads = forward_and_vjp(lambda *a: reference_attention(*a, mask), (q, k, v), ct)
  assert_close(out, ref, 1e-5, T)
  for got, want in zip(grads, ref_grads, strict=True):
    assert_close(got, want, 1e-5, T * HEADS)


def test_pallas_flash_model_equals_xla_flash_model_and_decodes():
  """Same parameters, same logits as the XLA flash model (packed segments); decoding (which uses
  the XLA path with the cache) continues the kernel's full forward."""
  cfg = tiny("flash")
  model = build_model(dataclasses.replace(cfg, mixer_options=PALLAS))
  xla = nnx.merge(nnx.graphdef(build_model(cfg)), nnx.state(model))
  x = tokens(13)
  seg = jnp.asarray([[1] * 6 + [2] * 5 + [0] * 2, [1] * 13], jnp.int32)
  want, _ = compiled(xla)(x, segment_ids=seg)
  got, _ = compiled(model)(x, segment_ids=seg)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
  run = compiled(model)
  full, _ = run(x)
  logits, cache = run(x[:, :9], model.init_cache(batch=2, max_len=16), jnp.int32(0))
  steps = [logits]
  for t in range(9, 13):
    logits, cache = run(x[:, t : t + 1], cache, jnp.int32(t))
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=2e-5, rtol=1e-5)


def test_pallas_flash_auto_lowers_to_the_tpu_kernel():
  """With implementation='pallas' (auto dispatch) a TPU lowering contains the Mosaic kernels and a
  CPU lowering does not (it takes the reference)."""
  model = build_model(tiny("flash", mixer_options=dict(implementation="pallas")))
  graphdef, state = nnx.split(model)

  def loss(state, x):
    return nnx.merge(graphdef, state)(x).logits.sum()

  traced = jax.jit(jax.grad(loss)).trace(state, tokens(16))
  assert traced.lower(lowering_platforms=("tpu",)).as_text().count("tpu_custom_call") == 3
  assert "custom_call" not in traced.lower().as_text()


def test_flash_auto_equals_xla_on_cpu():
  """implementation='auto' (the default) lowers to the blocked XLA code on CPU: logits and parameter
  gradients equal implementation='xla' bit for bit (packed segments)."""
  assert mixer("flash").implementation == "auto"
  cfg = tiny("flash")
  xla_cfg = dataclasses.replace(cfg, mixer_options={**OPTIONS["flash"], "implementation": "xla"})
  model = build_model(cfg)
  xla = nnx.merge(nnx.graphdef(build_model(xla_cfg)), nnx.state(model))
  x = tokens(13)
  seg = jnp.asarray([[1] * 6 + [2] * 5 + [0] * 2, [1] * 13], jnp.int32)

  def value_and_grads(m):
    graphdef, state = nnx.split(m)
    loss = lambda state: nnx.merge(graphdef, state)(x, segment_ids_bt=seg).logits.sum()
    return jax.jit(jax.value_and_grad(loss))(state)

  (got, got_grads), (want, want_grads) = value_and_grads(model), value_and_grads(xla)
  np.testing.assert_array_equal(got, want)
  for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
    np.testing.assert_array_equal(a, b)


def test_flash_auto_exports_the_kernels_for_tpu_and_xla_code_for_cpu():
  """`jax.export` of the default (auto) flash model: for TPU the forward holds the Mosaic forward
  kernel and the gradient the three kernels; for CPU there is no kernel at all."""
  model = build_model(tiny("flash"))
  graphdef, state = nnx.split(model)
  x = tokens(16)

  def forward(state, x):
    return nnx.merge(graphdef, state)(x).logits

  def grads(state, x):
    return jax.grad(lambda s: forward(s, x).sum())(state)

  def export(fn, platform):
    return jax.export.export(jax.jit(fn), platforms=[platform])(state, x).mlir_module()

  names = lambda text: sorted(re.findall(r'kernel_name = "(flash_attention_\w+)"', text))
  assert names(export(forward, "tpu")) == ["flash_attention_fwd"]
  assert names(export(grads, "tpu")) == [
    "flash_attention_dkv", "flash_attention_dq", "flash_attention_fwd"
  ]  # fmt: skip
  for fn in (forward, grads):
    assert "custom_call" not in export(fn, "cpu")


SPLIT = (("batch", "data"), ("heads", "tensor"), ("kv_heads", "tensor"))


MESH_AXES = ("data", "tensor")


def sharded(fn, rules):
  """jit(fn) under a (data 2, tensor 2) mesh of CPU devices with logical sharding rules, as
  parallel/ traces a training step, its [batch, seq, heads, d] inputs split as the rules say."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2), MESH_AXES)
  table = dict(rules)
  spec = jax.sharding.PartitionSpec(*(table.get(n) for n in ("batch", "seq", "heads")))

  def wrapped(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nnx.logical_axis_rules(rules):
      return fn(*args)

  jitted = jax.jit(wrapped)
  place = lambda args: [jax.device_put(a, jax.sharding.NamedSharding(mesh, spec)) for a in args]
  run = lambda *args: jitted(*place(args))
  run.trace = lambda *args: jitted.trace(*place(args))
  return run


def test_flash_kernels_run_per_shard_under_a_mesh():
  """XLA cannot partition a Mosaic kernel: under a mesh the kernels run in a shard_map over the
  batch and whole query groups of heads. The TPU lowering of forward + gradient then holds the
  three kernels, and the interpreted TPU kernel per shard equals the unsharded XLA code."""
  (q, k, v), ct, info = inputs(2, jnp.float32, True, True)

  def forward_and_grads(layer):
    def run(q, k, v):
      out, vjp = jax.vjp(lambda *a: layer.mix(*a, segment_ids_bt=info.q_seg)[0], q, k, v)
      return out, vjp(ct)

    return run

  traced = sharded(forward_and_grads(mixer("flash", num_kv_heads=2)), SPLIT).trace(q, k, v)
  text = traced.lower(lowering_platforms=("tpu",)).as_text()
  assert sorted(re.findall(r'kernel_name = "(flash_attention_\w+)"', text)) == [
    "flash_attention_dkv", "flash_attention_dq", "flash_attention_fwd"
  ]  # fmt: skip
  got = sharded(forward_and_grads(mixer("flash", num_kv_heads=2, **PALLAS)), SPLIT)(q, k, v)
  want = forward_and_vjp(lambda *a: mixer("flash", num_kv_heads=2).attend(*a, info), (q, k, v), ct)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert_close(a, b, 1e-5, T * HEADS)


def test_flash_with_a_split_sequence_uses_the_xla_code():
  """The kernels need the whole sequence: if the rules split it, "auto" lowers to the XLA code
  (which XLA partitions) and "pallas" raises a one-line error."""
  (q, k, v), _, _ = inputs(2, jnp.float32, False, True, t=24)  # The sequence splits in 2.
  rules = (("batch", "data"), ("seq", "tensor"))
  attend = lambda layer: lambda *a: layer.mix(*a)[0]
  text = (
    sharded(attend(mixer("flash", num_kv_heads=2)), rules)
    .trace(q, k, v)
    .lower(lowering_platforms=("tpu",))
  )
  assert "tpu_custom_call" not in text.as_text()
  with pytest.raises(ValueError, match="cannot split the sequence") as err:
    sharded(attend(mixer("flash", num_kv_heads=2, **PALLAS)), rules).trace(q, k, v)
  assert "\n" not in str(err.value)
