"""The shared block, the layer stack (scanned or unrolled) and the decoder / encoder LMs.

A block is pre-norm: x + mixer(norm(x)), then x + mlp(norm(x)) (`model.norm_position="post"`:
norm(x + mixer(x)), then norm(x + mlp(x)), as in BERT). Its sequence mixer and MLP are
chosen by name from `models.registry`, so attention variants, state-space layers and MoE MLPs plug
in without touching this file. A repeating mixer pattern (e.g. "mamba,mamba,dense") and a repeating
MLP pattern (e.g. MoE every second block) form a group of lcm(len(mixers), len(mlps)) blocks; the
stack holds every group's parameters stacked on a leading `layers` axis and runs them with
`jax.lax.scan` (one compiled group) or a Python loop (unrolled), which give the same outputs from
the same parameters.

Sampled mixers (Reformer's LSH rotations, KDEformer's hashes and samples) declare
`stochastic = True` and get a PRNG key per call. A training step passes `sample_key` (a fresh key
per step) to the LM; the stack derives one key per block from it (fold_in of the group and block
index, so scanned and unrolled stacks draw the same), so every layer and every step samples afresh.
Without `sample_key` (evaluation, decoding, generation) the blocks derive their keys from a fixed
key instead: the samples are still distinct per layer but identical on every call, so results are
deterministic.

Inputs: token embeddings, plus a learned position table (`model.position="learned"`, GPT-2 /
BERT; RoPE is applied inside attention instead), token-type embeddings (`model.type_vocab_size`)
and a norm over their sum (`model.embed_norm`), as BERT's embeddings. A pre-norm stack ends with a
final norm; a post-norm stack (already normalised) has none.

Axes: activations [batch, seq, embed]; logits [batch, seq, vocab]; stacked parameters get a
leading `layers` axis.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from reslm.models.config import ModelConfig
from reslm.models.embeddings import LMInputs
from reslm.models.linear import Linear
from reslm.models.mlp import activation
from reslm.models.registry import MIXERS, MLPS, NORMS
from reslm.models.sharding import constrain, sequence_parallel

REMAT_POLICIES = {
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.checkpoint_dots,
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  "everything": jax.checkpoint_policies.everything_saveable,
}


class ModelOutput(NamedTuple):
  """What a language model returns.

  Attributes:
    logits: float32 [batch, seq, vocab].
    cache: Updated decoding cache (None when called without one).
    aux_loss: Scalar auxiliary loss summed over layers (e.g. MoE load balancing); 0 if none.
    hidden: With `return_hidden=True`, the residual stream [num_groups + 1, batch, seq, embed]:
      the embedding output, then each block group's output (before the final norm); else None.
  """

  logits: jax.Array
  cache: Any
  aux_loss: jax.Array
  hidden: Any = None


EVAL_SAMPLE_KEY = 0  # Seed of the fixed key blocks derive their sample keys from without one.


class Block(nnx.Module):
  """Pre-norm residual block: x + mixer(norm1(x)); x + mlp(norm2(x)).

  With `post_norm`: norm1(x + mixer(x)); norm2(x + mlp(x)) (the original Transformer and BERT).

  A mixer with `stochastic = True` also receives `sample_key` (its PRNG key for this call); one
  with `gates_residual = True` (MEGA) also receives the un-normalised residual stream x as
  `residual_btd` and returns an update that already interpolates towards it.

  Decoding cache: the mixer's cache, or (mixer cache, MLP cache) when the MLP keeps a decoding
  state of its own (it defines `init_cache`, e.g. rwkv_cmix's token shift); such an MLP is called
  as mlp(x, cache=c) -> (out, new c) when decoding and as mlp(x) otherwise. Position-wise MLPs
  need no state and keep the plain mixer cache.

  Args:
    mixer: A sequence mixer following the `models.attention.Attention` call convention.
    mlp: A position-wise module [.., d] -> [.., d] (or one with `init_cache`, see above).
    norm1, norm2: Normalisation modules.
    post_norm: Normalise after each residual addition instead of before each sublayer.
  """

  def __init__(
    self,
    mixer: nnx.Module,
    mlp: nnx.Module,
    norm1: nnx.Module,
    norm2: nnx.Module,
    *,
    post_norm: bool = False,
  ):
    self.mixer = mixer
    self.mlp = mlp
    self.norm1 = norm1
    self.norm2 = norm2
    self.post_norm = post_norm
    self.mlp_cached = hasattr(mlp, "init_cache")

  def __call__(
    self,
    x_btd,
    *,
    positions_bt,
    segment_ids_bt=None,
    cache=None,
    cache_index=None,
    sample_key=None,
  ):
    mixer_cache, mlp_cache = cache if self.mlp_cached and cache is not None else (cache, None)
    extra = {}
    if getattr(self.mixer, "stochastic", False):
      extra["sample_key"] = sample_key
    if getattr(self.mixer, "gates_residual", False):
      extra["residual_btd"] = x_btd
    # Norm outputs are whole sequences (the mixer and MLP split heads / hidden units instead);
    # the residual stream may be split along the sequence (`residual_seq`: sequence parallelism).
    # Under sequence parallelism the norm outputs stay split too: the column-parallel projections
    # gather the sequence themselves (models.sharding.column_parallel_gather), so that the
    # gather's transpose is a reduce-scatter.
    inner = ("batch", "residual_seq" if sequence_parallel() else "seq", "embed")
    pre = (lambda x: x) if self.post_norm else (lambda x: self.norm1(x))
    h, mixer_cache = self.mixer(
      constrain(pre(x_btd), inner),
      positions_bt=positions_bt,
      segment_ids_bt=segment_ids_bt,
      cache=mixer_cache,
      cache_index=cache_index,
      **extra,
    )
    x_btd = x_btd + h.astype(x_btd.dtype)
    if self.post_norm:
      x_btd = self.norm1(x_btd)
    x_btd = constrain(x_btd, ("batch", "residual_seq", "embed"))
    y = constrain(x_btd if self.post_norm else self.norm2(x_btd), inner)
    if mlp_cache is not None:
      mlp_out, mlp_cache = self.mlp(y, cache=mlp_cache)
    else:
      mlp_out = self.mlp(y)
    # An MLP may return (output, aux_loss), e.g. a mixture of experts.
    aux = jnp.zeros((), jnp.float32)
    if isinstance(mlp_out, tuple):
      mlp_out, aux = mlp_out
    x_btd = x_btd + mlp_out.astype(x_btd.dtype)
    if self.post_norm:
      x_btd = self.norm2(x_btd)
    cache = (mixer_cache, mlp_cache) if self.mlp_cached and cache is not None else mixer_cache
    return constrain(x_btd, ("batch", "residual_seq", "embed")), cache, aux

  def init_cache(self, batch: int, max_len: int):
    init = getattr(self.mixer, "init_cache", None)
    mixer_cache = init(batch, max_len) if init is not None else None
    if self.mlp_cached:
      return mixer_cache, self.mlp.init_cache(batch, max_len)
    return mixer_cache


def build_block(
  cfg: ModelConfig, mixer: str, *, causal: bool, rngs: nnx.Rngs, mlp: str | None = None
) -> Block:
  """Assembles one block from the registries (MLP `mlp`, default cfg.mlp)."""
  return Block(
    mixer=MIXERS.build(mixer, cfg, causal=causal, rngs=rngs),
    mlp=MLPS.build(mlp or cfg.mlp, cfg, rngs=rngs),
    norm1=NORMS.build(cfg.norm, cfg, dim=cfg.d_model, rngs=rngs),
    norm2=NORMS.build(cfg.norm, cfg, dim=cfg.d_model, rngs=rngs),
    post_norm=cfg.norm_position == "post",
  )


class BlockGroup(nnx.Module):
  """One repetition of the mixer and MLP patterns: cfg.group_size blocks applied in order."""

  def __init__(self, cfg: ModelConfig, *, causal: bool, rngs: nnx.Rngs):
    mixers, mlps = cfg.mixer_pattern, cfg.mlp_pattern
    self.blocks = nnx.List(
      [
        build_block(cfg, mixers[i % len(mixers)], mlp=mlps[i % len(mlps)], causal=causal, rngs=rngs)
        for i in range(cfg.group_size)
      ]
    )

  def __call__(
    self, x, *, positions_bt, segment_ids_bt=None, caches=None, cache_index=None, sample_key=None
  ):
    """Applies the blocks; block i of a stochastic mixer samples with fold_in(sample_key, i)."""
    caches = caches if caches is not None else (None,) * len(self.blocks)
    new_caches, aux = [], jnp.zeros((), jnp.float32)
    for i, (block, cache) in enumerate(zip(self.blocks, caches, strict=True)):
      x, cache, block_aux = block(
        x,
        positions_bt=positions_bt,
        segment_ids_bt=segment_ids_bt,
        cache=cache,
        cache_index=cache_index,
        sample_key=None if sample_key is None else jax.random.fold_in(sample_key, i),
      )
      new_caches.append(cache)
      aux = aux + block_aux
    return x, tuple(new_caches), aux

  def init_cache(self, batch: int, max_len: int):
    return tuple(block.init_cache(batch, max_len) for block in self.blocks)


class LayerStack(nnx.Module):
  """All block groups, parameters stacked on a leading `layers` axis.

  Args:
    cfg: Model config (num_layers, mixer pattern, scan_layers, remat, ...).
    causal: Whether the mixers are causal.
    rngs: Random streams; each group gets its own key.
  """

  def __init__(self, cfg: ModelConfig, *, causal: bool, rngs: nnx.Rngs):
    self.num_groups = cfg.num_layers // cfg.group_size
    self.scan = cfg.scan_layers
    self.remat = cfg.remat
    keys = jax.random.split(rngs.params(), self.num_groups)

    def make(key):
      return nnx.state(BlockGroup(cfg, causal=causal, rngs=nnx.Rngs(key)))

    graphdef = nnx.graphdef(
      nnx.eval_shape(lambda: BlockGroup(cfg, causal=causal, rngs=nnx.Rngs(0)))
    )
    self.groups = nnx.merge(graphdef, jax.vmap(make)(keys))
    for _, var in nnx.iter_graph(self.groups):
      if isinstance(var, nnx.Variable) and var.get_metadata().get("out_sharding"):
        var.set_metadata(out_sharding=("layers", *var.get_metadata()["out_sharding"]))

  def init_cache(self, batch: int, max_len: int):
    """A decoding cache for every group, each leaf with a leading [num_groups] axis."""
    graphdef, state = nnx.split(self.groups)
    one = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))
    per_group = one.init_cache(batch, max_len)
    # Each mixer decides its empty state (zeros for KV caches, -inf running maxima, ...).
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (self.num_groups, *a.shape)), per_group)

  def __call__(
    self,
    x,
    *,
    positions_bt,
    segment_ids_bt=None,
    caches=None,
    cache_index=None,
    return_hidden=False,
    sample_key=None,
  ):
    """Returns (x, caches, aux) and, with `return_hidden`, each group's output stacked first.

    `sample_key`: the stochastic mixers' key for this call (training); None uses a fixed key.
    Group g's blocks sample with keys derived from fold_in(key, g).
    """
    graphdef, state = nnx.split(self.groups)
    if sample_key is None:
      sample_key = jax.random.key(EVAL_SAMPLE_KEY)
    group_keys = jax.vmap(lambda g: jax.random.fold_in(sample_key, g))(jnp.arange(self.num_groups))

    def body(x, xs):
      group_state, group_caches, group_key = xs
      group = nnx.merge(graphdef, group_state)
      x, new_caches, aux = group(
        x,
        positions_bt=positions_bt,
        segment_ids_bt=segment_ids_bt,
        caches=group_caches,
        cache_index=cache_index,
        sample_key=group_key,
      )
      return x, (new_caches, aux, x if return_hidden else None)

    if self.remat != "none":
      body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan)

    if self.scan:
      x, (new_caches, aux, hidden) = jax.lax.scan(body, x, (state, caches, group_keys))
    else:
      outs = []
      for i in range(self.num_groups):
        xs = jax.tree.map(lambda a, i=i: a[i], (state, caches, group_keys))
        x, out = body(x, xs)
        outs.append(out)
      new_caches, aux, hidden = jax.tree.map(lambda *a: jnp.stack(a), *outs)
    out = (x, (new_caches if caches is not None else None), jnp.sum(aux))
    return (*out, hidden) if return_hidden else out


def _positions(tokens_bt: jax.Array, cache_index) -> jax.Array:
  b, t = tokens_bt.shape
  start = 0 if cache_index is None else jnp.asarray(cache_index, jnp.int32)
  return jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))


class DecoderLM(LMInputs):
  """A decoder-only (causal) language model.

  Args:
    cfg: The model config; `cfg.kind` should be "decoder".
    rngs: Random streams.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self._init_inputs(cfg, rngs)
    self.layers = LayerStack(cfg, causal=True, rngs=rngs)
    self.final_norm = self._final_norm(cfg, rngs)
    self.lm_head = (
      None
      if cfg.tie_embeddings
      else Linear(
        cfg.d_model,
        cfg.vocab_size,
        axes=("embed", "vocab"),
        init_std=cfg.init_std,
        dtype=cfg.compute_dtype,
        param_dtype=cfg.storage_dtype,
        rngs=rngs,
      )
    )

  def init_cache(self, batch: int, max_len: int | None = None):
    """An empty decoding cache for `max_len` positions (default: cfg.max_seq_len)."""
    return self.layers.init_cache(batch, max_len or self.cfg.max_seq_len)

  def __call__(
    self,
    tokens_bt: jax.Array,
    *,
    positions_bt: jax.Array | None = None,
    segment_ids_bt: jax.Array | None = None,
    cache=None,
    cache_index=None,
    return_hidden: bool = False,
    sample_key: jax.Array | None = None,
    token_types_bt: jax.Array | None = None,
  ) -> ModelOutput:
    """Next-token logits.

    Args:
      tokens_bt: int32 token ids, [batch, seq].
      positions_bt: Positions, [batch, seq]; default cache_index (or 0) + arange(seq).
      segment_ids_bt: Optional segment ids for packed sequences (0 = padding).
      cache: Optional decoding cache from `init_cache`.
      cache_index: Scalar int, where the input starts in the cache.
      return_hidden: Also return the residual stream after the embedding and after each block
        group (`ModelOutput.hidden`), e.g. for hidden-state distillation.
      sample_key: PRNG key of the stochastic mixers (LSH rotations, KDEformer samples) for this
        call; a training step passes a fresh one per step. None (evaluation, decoding): fixed
        per-layer samples, so the output is deterministic.
      token_types_bt: Token types for `model.type_vocab_size` > 0, [batch, seq]; default 0.

    Returns:
      A `ModelOutput`.
    """
    if positions_bt is None:
      positions_bt = _positions(tokens_bt, cache_index)
    x = self.embed_inputs(tokens_bt, positions_bt, token_types_bt)
    embedded = x
    x, cache, aux, *hidden = self.layers(
      x,
      positions_bt=positions_bt,
      segment_ids_bt=segment_ids_bt,
      caches=cache,
      cache_index=cache_index,
      return_hidden=return_hidden,
      sample_key=sample_key,
    )
    if return_hidden:  # [groups + 1, batch, seq, embed]
      hidden = jnp.concatenate([embedded[None], hidden[0].astype(embedded.dtype)], axis=0)
    else:
      hidden = None
    return ModelOutput(self.project_logits(x), cache, aux, hidden)

  def project_logits(self, x_btd: jax.Array) -> jax.Array:
    """The last block's output -> float32 logits [batch, seq, vocab] (final norm, head)."""
    x = self.normed(x_btd)
    logits = self.embed.attend(x) if self.lm_head is None else self.lm_head(x).astype(jnp.float32)
    return constrain(logits, ("batch", "seq", "vocab"))


class EncoderLM(LMInputs):
  """A bidirectional encoder with a BERT-style masked-LM head (and optionally BERT's pooler).

  Head: dense + activation (`model.mlp_activation`; "auto" = tanh-approximate gelu) + norm, then
  the (tied or untied) vocabulary projection plus a bias. Pooler (`model.pooler`): tanh(dense(h))
  of the first token's final hidden state h (BERT's [CLS]).

  Args:
    cfg: The model config; `cfg.kind` should be "encoder".
    rngs: Random streams.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype, rngs=rngs)
    self._init_inputs(cfg, rngs)
    self.layers = LayerStack(cfg, causal=False, rngs=rngs)
    self.final_norm = self._final_norm(cfg, rngs)
    self.head_act = activation(cfg.mlp_activation, "gelu_tanh")
    self.head_dense = Linear(
      cfg.d_model, cfg.d_model, axes=("embed", "embed"), use_bias=True, init_std=cfg.init_std, **kw
    )
    self.head_norm = NORMS.build(cfg.norm, cfg, dim=cfg.d_model, rngs=rngs)
    self.decoder = (
      None
      if cfg.tie_embeddings
      else Linear(cfg.d_model, cfg.vocab_size, axes=("embed", "vocab"), init_std=cfg.init_std, **kw)
    )
    self.vocab_bias = nnx.Param(
      jnp.zeros((cfg.vocab_size,), cfg.storage_dtype), out_sharding=("vocab",), eager_sharding=False
    )
    self.pooler = (
      Linear(
        cfg.d_model,
        cfg.d_model,
        axes=("embed", "embed"),
        use_bias=True,
        init_std=cfg.init_std,
        **kw,
      )
      if cfg.pooler
      else None
    )

  def __call__(
    self,
    tokens_bt,
    *,
    positions_bt=None,
    segment_ids_bt=None,
    cache=None,
    cache_index=None,
    sample_key=None,
    token_types_bt=None,
  ) -> ModelOutput:
    """Per-position vocabulary logits; arguments as in `DecoderLM` (no cache).

    Padding: give `segment_ids_bt` (0 = padding, e.g. an attention mask); real tokens then see
    only real tokens, as under Hugging Face's attention mask (outputs at padded positions are
    not meaningful in either).
    """
    if cache is not None:
      raise ValueError("an encoder has no decoding cache")
    del cache_index
    x, aux = self.hidden_states(
      tokens_bt,
      positions_bt=positions_bt,
      segment_ids_bt=segment_ids_bt,
      token_types_bt=token_types_bt,
      sample_key=sample_key,
    )
    return ModelOutput(self.project_logits(x, normed=True), None, aux)

  def hidden_states(
    self, tokens_bt, *, positions_bt=None, segment_ids_bt=None, token_types_bt=None, sample_key=None
  ) -> tuple[jax.Array, jax.Array]:
    """The final hidden states [batch, seq, embed] (after the final norm, if any) and aux loss."""
    if positions_bt is None:
      positions_bt = _positions(tokens_bt, None)
    x = self.embed_inputs(tokens_bt, positions_bt, token_types_bt)
    x, _, aux = self.layers(
      x, positions_bt=positions_bt, segment_ids_bt=segment_ids_bt, sample_key=sample_key
    )
    return self.normed(x), aux

  def project_logits(self, x_btd: jax.Array, *, normed: bool = False) -> jax.Array:
    """Hidden states -> float32 MLM logits [batch, seq, vocab] (final norm unless `normed`)."""
    x = x_btd if normed else self.normed(x_btd)
    x = self.head_norm(self.head_act(self.head_dense(x)))
    logits = self.embed.attend(x) if self.decoder is None else self.decoder(x).astype(jnp.float32)
    logits = logits + self.vocab_bias[...].astype(jnp.float32)
    return constrain(logits, ("batch", "seq", "vocab"))

  def pool(self, hidden_btd: jax.Array) -> jax.Array:
    """BERT's pooled output tanh(dense(h[:, 0])), [batch, embed]; needs `model.pooler`."""
    if self.pooler is None:
      raise ValueError("this encoder has no pooler (model.pooler=False)")
    return jnp.tanh(self.pooler(hidden_btd[:, 0]).astype(jnp.float32))

  def sentence_embeddings(
    self, tokens_bt, mask_bt, *, token_types_bt=None, pooling: str = "mean"
  ) -> jax.Array:
    """One float32 vector per row, [batch, embed].

    Args:
      tokens_bt: Token ids, [batch, seq].
      mask_bt: 1 for real tokens, 0 for padding, [batch, seq] (padding attends to nothing real).
      token_types_bt: Optional token types.
      pooling: "mean" (the mean of the real tokens' final hidden states, as sentence-transformers'
        MiniLM models) or "pooler" (BERT's pooler on the first token).
    """
    if pooling not in ("mean", "pooler"):
      raise ValueError(f"pooling={pooling!r} is not known; choose one of: mean, pooler")
    mask_bt = jnp.asarray(mask_bt, jnp.int32)
    hidden, _ = self.hidden_states(tokens_bt, segment_ids_bt=mask_bt, token_types_bt=token_types_bt)
    if pooling == "pooler":
      return self.pool(hidden)
    weights = mask_bt.astype(jnp.float32)[..., None]
    total = jnp.sum(hidden.astype(jnp.float32) * weights, axis=1)
    return total / jnp.maximum(jnp.sum(weights, axis=1), 1.0)


MODELS = {"decoder": DecoderLM, "encoder": EncoderLM}


def build_model(cfg: ModelConfig, *, seed: int = 0) -> DecoderLM | EncoderLM:
  """Builds the model named by `cfg.kind` with parameters initialised from `seed`."""
  return MODELS[cfg.kind](cfg, rngs=nnx.Rngs(params=seed))
