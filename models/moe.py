"""Mixture-of-experts MLP (survey §3.2): a learned router sends each token to a few expert MLPs.

Routing ("routing" option):
  topk           Each token picks its `top_k` most probable experts (Switch: top_k=1, GLaM: 2),
                 weighted by their router probabilities (optionally renormalised to sum to 1).
  expert_choice  Each expert picks its C = ceil(capacity_factor * tokens / experts) most probable
                 tokens (Zhou et al., 2022); a token may get 0..E experts. Balanced by construction.

Dispatch of top-k assignments ("dispatch" option):
  capacity  Every expert has C = min(m, ceil(capacity_factor * m * top_k / experts)) slots per
            group of m tokens; an assignment past its expert's C-th slot in its group is dropped
            (it contributes 0, so a token dropped by all its experts passes only through the
            residual). Groups and queue order depend on `causal`:
              encoder (causal=False): one group, the whole flattened (batch, seq) call, queued
                choice-major (every token's first choice before any token's second choice), as
                in GShard;
              decoder (causal=True): one group per sequence, queued token-major (a token's choices
                in order, then the next position's), so whether a token is dropped depends only
                on the earlier tokens of its own sequence: exactly causal. Deviation from GShard:
                a later token's first choice no longer outranks an earlier token's second choice
                (that priority is what lets a future token evict a past one).
            Positions come from a one-hot cumsum (O(tokens·k·E) memory); tokens move by
            gather/scatter into [E, groups·C, d] buffers rather than GShard's [tokens, E, C]
            dispatch einsum, whose memory is O(tokens²) and whose FLOPs grow with E.
  dropless  Token copies are sorted by expert and the experts run as one grouped matmul
            (`grouped_matmul`): by default the Pallas ragged-matmul kernel on TPU/GPU and
            `jax.lax.ragged_dot` elsewhere (option "grouped_matmul"). Nothing is dropped. XLA:CPU
            lowers ragged_dot to a dense product over every group (FLOPs grow with E; measured in
            experiments/benchmarks/moe.py).
  auto      (the default) dropless in a decoder, capacity in an encoder. A decoder gets dropless
            because it is the only dispatch whose outputs are per-token functions: exactly causal,
            and cached decoding (one token per call) equals the full forward with no extra state.
            Causal capacity is also causal, but C is computed from the call's length, so a
            one-token decoding step (C = 1, never full) drops differently from the full forward
            wherever that drops; `generate` warns (see `MoE.decode_inexact`).

Semantics worth knowing:
  - Expert choice picks each expert's tokens from the whole call, so a future token changes past
    outputs: it is an error in a decoder (causal=True, model.kind='decoder'); use it in encoders.
  - Encoder capacity competes across the whole flattened batch: with drops a token's output
    depends on every other token of the call, its batch-mates included.
  - Padding tokens are routed like any other and take capacity.

Losses (returned as the second output, already weighted):
  load balancing (Switch)  num_experts · Σ_e f_e · P_e, where f_e is the fraction of all top-k
                           assignments (counted before capacity drops, so Σ_e f_e = 1) that go
                           to e and P_e is the mean router probability of e over tokens. Uniform
                           routing gives 1. Not applied to expert choice (balanced by design).
  router z-loss            mean over tokens of logsumexp(router logits)².

Axes: x [..., embed]; router logits [tokens, expert]; expert weights [expert, embed, mlp] and
[expert, mlp, embed] (logical axis `expert` first, so parallel/ can shard experts).
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from reslm.models import sharding
from reslm.models.linear import Linear
from reslm.models.registry import MLPS, module_options
from reslm.models.sharding import param

ROUTINGS = ("topk", "expert_choice")
DISPATCHES = ("auto", "capacity", "dropless")
GROUPED_MATMULS = ("auto", "xla", "pallas")
EXPERT_MLPS = ("swiglu", "gelu")
DEFAULTS = dict(
  num_experts=8,
  top_k=2,
  routing="topk",
  dispatch="auto",  # dropless in a decoder, capacity in an encoder (module docstring).
  capacity_factor=1.25,
  normalize_gates=False,
  expert_mlp="swiglu",
  expert_dim=0,  # 0: model.mlp_dim (8/3 · d_model unless set, also for gelu experts).
  aux_loss_weight=0.01,
  z_loss_weight=1e-3,
  every=1,  # MoE in blocks with (index + 1) % every == 0, `dense_mlp` elsewhere (GLaM: 2).
  dense_mlp="swiglu",
  grouped_matmul="auto",  # Dropless: "auto" (kernel on TPU/GPU), "xla" or "pallas"; see below.
)
SETTING = "model.mlp_options"


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
  return isinstance(v, int | float) and not isinstance(v, bool)


_CHECKS = {
  "num_experts": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
  "top_k": (lambda v: _is_int(v) and v >= 1, "an integer >= 1 and <= num_experts"),
  "routing": (lambda v: v in ROUTINGS, "one of " + ", ".join(ROUTINGS)),
  "dispatch": (lambda v: v in DISPATCHES, "one of " + ", ".join(DISPATCHES)),
  "capacity_factor": (lambda v: _is_num(v) and v > 0, "a number > 0"),
  "normalize_gates": (lambda v: isinstance(v, bool), "True or False"),
  "expert_mlp": (lambda v: v in EXPERT_MLPS, "one of " + ", ".join(EXPERT_MLPS)),
  "expert_dim": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 = model.mlp_dim)"),
  "aux_loss_weight": (lambda v: _is_num(v) and v >= 0, "a number >= 0"),
  "z_loss_weight": (lambda v: _is_num(v) and v >= 0, "a number >= 0"),
  "every": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
  "dense_mlp": (lambda v: v in MLPS and v != "moe", "a registered MLP other than moe"),
  "grouped_matmul": (lambda v: v in GROUPED_MATMULS, "one of " + ", ".join(GROUPED_MATMULS)),
}


def check_options(options: dict) -> None:
  """Raises a one-line ValueError for the first MoE setting that is not allowed."""
  for name, value in options.items():
    ok, allowed = _CHECKS[name]
    if not ok(value):
      raise ValueError(f"{SETTING}.{name}={value!r} is not allowed for moe: {allowed}")
  if options.get("top_k", 1) > options.get("num_experts", 1):
    raise ValueError(
      f"{SETTING}.top_k={options['top_k']} exceeds num_experts={options['num_experts']}; "
      f"choose 1..{options['num_experts']}"
    )


def check_causal(routing: str, causal: bool, prefix: str = "") -> None:
  """Expert choice in a causal model is a one-line ValueError (future tokens pick past slots)."""
  if causal and routing == "expert_choice":
    raise ValueError(
      f"{prefix}routing='expert_choice' is not allowed in a causal decoder: each expert picks its "
      "tokens from the whole sequence, so future tokens change past outputs; use routing='topk' "
      "(or expert choice in model.kind='encoder')"
    )


def moe_options(cfg) -> dict:
  """The MoE settings from `model.mlp_options` (flat or under "moe"), validated for cfg.kind."""
  options = module_options(cfg.mlp_options, "moe", DEFAULTS, setting=SETTING, registry=MLPS)
  check_options(options)
  check_causal(options["routing"], cfg.kind == "decoder", prefix=f"{SETTING}.")
  return options


def capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
  """Slots per expert: min(tokens, ceil(capacity_factor · tokens · top_k / num_experts))."""
  # The small epsilon keeps e.g. 1.1 * 10 = 11.000000000000002 from rounding up to 12.
  c = math.ceil(capacity_factor * num_tokens * top_k / num_experts - 1e-9)
  return max(1, min(num_tokens, c))


def _partitioned() -> bool:
  """Whether the program is being partitioned automatically over more than one device."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return False
  return any(mesh.shape[a] > 1 for a in mesh.axis_names if a not in mesh.manual_axes)


def grouped_matmul(
  x_md: jax.Array, w_gkn: jax.Array, group_sizes_g: jax.Array, implementation: str = "auto"
) -> jax.Array:
  """Rows of x sorted by group times their group's matrix: y[r] = x[r] @ w[group(r)].

  Implementations:
    "auto"    the Pallas kernel of `kernels_pallas.ragged_matmul` on TPU (Mosaic) and CUDA
              (Triton), `jax.lax.ragged_dot` anywhere else, chosen per platform when the program
              is lowered (`jax.lax.platform_dependent`); on CPU it is exactly "xla". ragged_dot is
              also used everywhere for inputs the kernels do not take (dtypes other than
              float32/bfloat16) and when the program is partitioned automatically over a mesh
              (an active mesh with a non-manual axis of size > 1): XLA cannot partition a Mosaic
              kernel, and the rows' global expert order does not split into per-device shards.
              `MoE`'s dropless dispatch therefore calls this per device under a mesh (every axis
              manual, see `MoE._dropless_per_device`), where the kernel runs.
    "xla"     `jax.lax.ragged_dot` everywhere (XLA:CPU computes it densely over every group).
    "pallas"  the kernel API's own dispatch: the kernels on TPU/GPU, elsewhere its reference
              (ragged_dot on float32 inputs at HIGHEST precision, cast back to x's dtype).
  Rows past sum(group_sizes) give 0.

  Args:
    x_md: [rows, k], rows sorted by group.
    w_gkn: [groups, k, n], same dtype as x.
    group_sizes_g: int32 [groups], rows per group.
    implementation: "auto", "xla" or "pallas".

  Returns:
    [rows, n] in x's dtype.
  """
  kernel_dtype = x_md.dtype == w_gkn.dtype and x_md.dtype in (jnp.float32, jnp.bfloat16)
  if implementation == "xla" or (implementation == "auto" and (not kernel_dtype or _partitioned())):
    return jax.lax.ragged_dot(x_md, w_gkn, group_sizes_g)
  from reslm.kernels_pallas.ragged_matmul.api import ragged_matmul  # noqa: PLC0415

  if implementation == "pallas":
    return ragged_matmul(x_md, w_gkn, group_sizes_g).astype(x_md.dtype)

  def kernel(backend):
    return lambda x, w, sizes: ragged_matmul(x, w, sizes, implementation=backend)

  return jax.lax.platform_dependent(
    x_md, w_gkn, group_sizes_g, tpu=kernel("tpu"), cuda=kernel("gpu"), default=jax.lax.ragged_dot
  )


def load_balancing_loss(probs_ne: jax.Array, experts_nk: jax.Array) -> jax.Array:
  """Switch loss num_experts · Σ_e f_e · P_e; f_e over all top-k assignments (Σ_e f_e = 1).

  Args:
    probs_ne: Router probabilities, float32 [tokens, experts].
    experts_nk: Chosen experts, int [tokens, top_k].
  """
  e = probs_ne.shape[-1]
  counts_e = jnp.sum(jax.nn.one_hot(experts_nk, e, dtype=jnp.float32), axis=(0, 1))
  f_e = counts_e / experts_nk.size
  p_e = jnp.mean(probs_ne, axis=0)
  return e * jnp.sum(f_e * p_e)


def z_loss(logits_ne: jax.Array) -> jax.Array:
  """Router z-loss: mean over tokens of logsumexp(logits)² (ST-MoE)."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits_ne, axis=-1)))


class Experts(nnx.Module):
  """`num_experts` SwiGLU or GELU MLPs with their weights stacked on a leading `expert` axis.

  Args:
    num_experts: Number of experts E.
    dim: Model width d.
    hidden: Hidden width h of each expert.
    kind: "swiglu" (down(silu(gate x) * up x)) or "gelu" (down(gelu(up x + b) ) + b).
    grouped_matmul: Implementation of the dropless path's grouped matmuls ("auto", "xla" or
      "pallas"; see `grouped_matmul`).
    init_std, out_init_std: Initialiser stds of the input and output projections.
    dtype, param_dtype: Compute and storage dtypes.
    rngs: Random streams.
  """

  def __init__(
    self,
    num_experts: int,
    dim: int,
    hidden: int,
    *,
    kind: str = "swiglu",
    grouped_matmul: str = "auto",
    init_std: float = 0.02,
    out_init_std: float = 0.02,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.kind = kind
    self.grouped_impl = grouped_matmul
    self.dtype = dtype
    e, d, h = num_experts, dim, hidden

    def normal(shape, std, axes):
      return param(std * jax.random.normal(rngs.params(), shape, param_dtype), axes)

    self.w_up = normal((e, d, h), init_std, ("expert", "embed", "mlp"))
    self.w_gate = (
      normal((e, d, h), init_std, ("expert", "embed", "mlp")) if kind == "swiglu" else None
    )
    self.w_down = normal((e, h, d), out_init_std, ("expert", "mlp", "embed"))
    gelu = kind == "gelu"
    self.b_up = param(jnp.zeros((e, h), param_dtype), ("expert", "mlp")) if gelu else None
    self.b_down = param(jnp.zeros((e, d), param_dtype), ("expert", "embed")) if gelu else None

  def _w(self, v):
    return v[...].astype(self.dtype)

  def __call__(self, x_ecd: jax.Array) -> jax.Array:
    """Each expert on its own slots: [experts, slots, d] -> [experts, slots, d]."""
    x = x_ecd.astype(self.dtype)
    up = jnp.einsum("ecd,edh->ech", x, self._w(self.w_up))
    if self.kind == "swiglu":
      h = jax.nn.silu(jnp.einsum("ecd,edh->ech", x, self._w(self.w_gate))) * up
    else:
      h = jax.nn.gelu(up + self._w(self.b_up)[:, None])
    y = jnp.einsum("ech,ehd->ecd", h, self._w(self.w_down))
    return y if self.b_down is None else y + self._w(self.b_down)[:, None]

  def uses_kernel(self) -> bool:
    """Whether the grouped matmuls may lower to the Pallas kernel (see `grouped_matmul`)."""
    kernel_dtype = jnp.dtype(self.dtype) in (jnp.float32, jnp.bfloat16)
    return self.grouped_impl == "pallas" or (self.grouped_impl == "auto" and kernel_dtype)

  def grouped(
    self, x_md: jax.Array, group_sizes_e: jax.Array, experts_m: jax.Array, reduce=None
  ) -> jax.Array:
    """Rows sorted by expert, `group_sizes_e` rows per expert: [rows, d] -> [rows, d].

    `experts_m` (each row's expert) is only used to add the GELU biases. `reduce` (e.g. a psum
    over the devices holding slices of the hidden width) is applied to the down projection's
    output before its bias.
    """
    x = x_md.astype(self.dtype)
    up = grouped_matmul(x, self._w(self.w_up), group_sizes_e, self.grouped_impl)  # [rows, h]
    if self.kind == "swiglu":
      h = (
        jax.nn.silu(grouped_matmul(x, self._w(self.w_gate), group_sizes_e, self.grouped_impl)) * up
      )
    else:
      h = jax.nn.gelu(up + self._w(self.b_up)[experts_m])
    y = grouped_matmul(h, self._w(self.w_down), group_sizes_e, self.grouped_impl)  # [rows, d]
    y = y if reduce is None else reduce(y)
    return y if self.b_down is None else y + self._w(self.b_down)[experts_m]


class MoE(nnx.Module):
  """A routed mixture of expert MLPs; returns (output, weighted auxiliary loss).

  Args:
    dim: Model width d.
    hidden: Hidden width of each expert.
    num_experts: Number of experts E.
    top_k: Experts per token for "topk" routing (unused by expert choice).
    routing: "topk" or "expert_choice" (see the module docstring; not with causal=True).
    dispatch: "auto", "capacity" or "dropless" for top-k routing ("auto": dropless if causal,
      else capacity; expert choice always uses capacity).
    causal: Whether the MoE sits in a causal decoder: capacity groups per sequence, token-major
      (see the module docstring), and expert choice is an error.
    capacity_factor: Slots per expert relative to a perfectly balanced load.
    normalize_gates: Renormalise the top-k gates to sum to 1, before capacity drops (with
      top_k=1 the gate is then 1 and the router learns only from the auxiliary losses).
    expert_mlp: "swiglu" or "gelu".
    grouped_matmul: "auto" (Pallas kernel on TPU/GPU, ragged_dot elsewhere), "xla" or "pallas"
      grouped matmuls for dropless dispatch (see `grouped_matmul`).
    aux_loss_weight: Weight of the load-balancing loss.
    z_loss_weight: Weight of the router z-loss.
    init_std, out_init_std, dtype, param_dtype: As for `models.mlp.SwiGLU`; the router always
      computes in float32.
    rngs: Random streams.
  """

  def __init__(
    self,
    dim: int,
    hidden: int,
    num_experts: int = 8,
    *,
    top_k: int = 2,
    routing: str = "topk",
    dispatch: str = "auto",
    causal: bool = False,
    capacity_factor: float = 1.25,
    normalize_gates: bool = False,
    expert_mlp: str = "swiglu",
    grouped_matmul: str = "auto",
    aux_loss_weight: float = 0.01,
    z_loss_weight: float = 1e-3,
    init_std: float = 0.02,
    out_init_std: float = 0.02,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    check_options(
      dict(
        num_experts=num_experts,
        top_k=top_k,
        routing=routing,
        dispatch=dispatch,
        capacity_factor=capacity_factor,
        normalize_gates=normalize_gates,
        expert_mlp=expert_mlp,
        grouped_matmul=grouped_matmul,
        aux_loss_weight=aux_loss_weight,
        z_loss_weight=z_loss_weight,
      )
    )
    if not isinstance(causal, bool):
      raise ValueError(f"causal={causal!r} is not allowed for moe: True or False")
    check_causal(routing, causal)
    self.num_experts = num_experts
    self.top_k = top_k
    self.routing = routing
    self.causal = causal
    self.dispatch = dispatch if dispatch != "auto" else ("dropless" if causal else "capacity")
    self.capacity_factor = capacity_factor
    self.normalize_gates = normalize_gates
    self.aux_loss_weight = aux_loss_weight
    self.z_loss_weight = z_loss_weight
    self.dtype = dtype
    # Replicated (no `expert` axis): every token uses the router; it is not an expert parameter.
    self.router = Linear(
      dim,
      num_experts,
      axes=("embed", None),
      init_std=init_std,
      dtype=jnp.float32,
      param_dtype=param_dtype,
      rngs=rngs,
    )
    self.experts = Experts(
      num_experts,
      dim,
      hidden,
      kind=expert_mlp,
      grouped_matmul=grouped_matmul,
      init_std=init_std,
      out_init_std=out_init_std,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )

  @property
  def decode_inexact(self) -> str | None:
    """Why cached decoding (one token per call) differs from the full forward, or None."""
    if self.routing == "expert_choice":
      return "expert choice picks each expert's tokens from the whole call"
    if self.dispatch == "capacity" and self.capacity_factor * self.top_k < self.num_experts:
      return (
        f"capacity dispatch (capacity_factor={self.capacity_factor}) drops assignments over each "
        "expert's capacity in the full forward, but a one-token decoding step never fills an "
        "expert; use dispatch='dropless' (the decoder default) to decode exactly"
      )
    return None

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[..., d] -> ([..., d], scalar float32 auxiliary loss).

    With causal=True the leading axes are (batch, seq, ...): capacity groups are the sequences.
    """
    lead, d = x.shape[:-1], x.shape[-1]
    x_nd = x.reshape(-1, d)
    logits_ne = self.router(x_nd)  # float32 [tokens, experts]
    probs_ne = jax.nn.softmax(logits_ne, axis=-1)
    aux = self.z_loss_weight * z_loss(logits_ne)
    if self.routing == "expert_choice":
      y_nd = self._expert_choice(x_nd, probs_ne)
    else:
      gates_nk, experts_nk = jax.lax.top_k(probs_ne, self.top_k)
      if self.normalize_gates:
        gates_nk = gates_nk / jnp.sum(gates_nk, axis=-1, keepdims=True)
      aux = aux + self.aux_loss_weight * load_balancing_loss(probs_ne, experts_nk)
      if self.dispatch == "capacity":
        groups = math.prod(lead[:1]) if self.causal and len(lead) > 1 else 1
        y_nd = self._capacity(x_nd, gates_nk, experts_nk, groups)
      else:
        y_nd = self._dropless(x_nd, gates_nk, experts_nk)
    return y_nd.astype(self.dtype).reshape(*lead, d), aux

  def _capacity(self, x_nd, gates_nk, experts_nk, groups: int):
    n, k = experts_nk.shape
    e, d, g = self.num_experts, x_nd.shape[-1], groups
    m = n // g  # Tokens per group.
    c = capacity(m, e, k, self.capacity_factor)
    # Each group's assignments in queue order, [g, a = m * k]: token-major when causal (a token's
    # slot depends only on the tokens before it), else all first choices before second choices.
    if self.causal:
      experts_ga = experts_nk.reshape(g, m * k)
      token_ga = jnp.arange(n).reshape(g, m, 1).repeat(k, axis=2).reshape(g, m * k)
    else:
      experts_ga = experts_nk.T.reshape(1, k * n)
      token_ga = jnp.tile(jnp.arange(n), k)[None]
    onehot = jax.nn.one_hot(experts_ga, e, dtype=jnp.int32)  # [g, a, e]
    pos_ga = jnp.sum((jnp.cumsum(onehot, axis=1) - 1) * onehot, axis=-1)  # Queue position.
    # Expert e's buffer holds group 0's C slots, then group 1's, ...: [E, g * C] slots in all.
    slot_ga = experts_ga * (g * c) + jnp.arange(g)[:, None] * c + pos_ga
    slot_ga = jnp.where(pos_ga < c, slot_ga, e * g * c)  # e * g * c: the drop bucket.
    slot_a, token_a = slot_ga.reshape(-1), token_ga.reshape(-1)
    # Which token fills each slot (n = empty), then gather tokens into per-expert buffers.
    token_s = jnp.full((e * g * c + 1,), n, jnp.int32).at[slot_a].set(token_a)[: e * g * c]
    x_pad = jnp.concatenate([x_nd, jnp.zeros((1, d), x_nd.dtype)])
    y_ecd = self.experts(x_pad[token_s].reshape(e, g * c, d))  # [experts, groups * capacity, d]
    y_pad = jnp.concatenate([y_ecd.reshape(e * g * c, d), jnp.zeros((1, d), y_ecd.dtype)])
    y_ad = y_pad[slot_a]  # Dropped assignments read the zero row.
    y_nkd = y_ad.reshape(n, k, d) if self.causal else y_ad.reshape(k, n, d).transpose(1, 0, 2)
    return jnp.einsum("nk,nkd->nd", gates_nk.astype(y_nkd.dtype), y_nkd)

  def _dropless(self, x_nd, gates_nk, experts_nk):
    # Under "auto", a pipeline stage with other axes partitioned keeps ragged_dot (XLA code): a
    # nested kernel call would run forward only (`models.sharding.per_device`).
    auto_nested = self.experts.grouped_impl == "auto" and sharding.nested_partitioned()
    found = sharding.kernel_mesh() if self.experts.uses_kernel() and not auto_nested else None
    if found is None:
      return self._dropless_local(x_nd, gates_nk, experts_nk, self.experts)
    return self._dropless_per_device(x_nd, gates_nk, experts_nk, *found)

  def _dropless_per_device(self, x_nd, gates_nk, experts_nk, mesh, free):
    """Dropless dispatch with the grouped-matmul kernel under a mesh, one call per device.

    XLA cannot partition a Mosaic kernel, and a global expert order does not split into
    per-device shards; but a token's dropless output depends on that token only, so every device
    sorts and runs its own tokens (rows split as the rules split "batch"). Expert weights are
    split on their hidden width as the rules split "mlp" (column-parallel up/gate, row-parallel
    down with one psum) and gathered over every other axis, the `expert` axis included: expert
    parallelism is the all-to-all dispatch (`parallel.experts`), not this path.
    """
    rows = sharding.kernel_split("batch", x_nd.shape[0], mesh=mesh)
    mlp = sharding.kernel_split("mlp", self.experts.w_up.shape[-1], taken=rows, mesh=mesh)
    r, m = sharding.spec_entry(rows), sharding.spec_entry(mlp)
    graphdef, state = nnx.split(self.experts)
    hidden_dim = {"w_up": 2, "w_gate": 2, "w_down": 1, "b_up": 1}  # Where "mlp" sits.

    def spec(path, leaf):
      dim = hidden_dim.get(next((k.key for k in path if hasattr(k, "key")), None))
      return P(*(m if i == dim else None for i in range(leaf.ndim)))

    state_specs = jax.tree_util.tree_map_with_path(spec, state)

    def body(state, x_nd, gates_nk, experts_nk):
      reduce = (lambda y: jax.lax.psum(y, mlp)) if mlp else None
      experts = nnx.merge(graphdef, state)
      return self._dropless_local(x_nd, gates_nk, experts_nk, experts, reduce)

    in_specs = (state_specs, P(r), P(r), P(r))
    return sharding.per_device(body, free, in_specs, P(r), mesh=mesh)(
      state, x_nd, gates_nk, experts_nk
    )

  def _dropless_local(self, x_nd, gates_nk, experts_nk, experts, reduce=None):
    n, k = experts_nk.shape
    experts_a = experts_nk.reshape(-1)  # [n * k], token-major
    order_a = jnp.argsort(experts_a, stable=True)
    inverse_a = jnp.zeros_like(order_a).at[order_a].set(jnp.arange(n * k))
    group_sizes_e = jnp.bincount(experts_a, length=self.num_experts).astype(jnp.int32)
    x_sorted = x_nd[order_a // k]  # [n * k, d], grouped by expert
    y_sorted = experts.grouped(x_sorted, group_sizes_e, experts_a[order_a], reduce)
    y_nkd = y_sorted[inverse_a].reshape(n, k, -1)
    return jnp.einsum("nk,nkd->nd", gates_nk.astype(y_nkd.dtype), y_nkd)

  def _expert_choice(self, x_nd, probs_ne):
    n, d = x_nd.shape
    c = capacity(n, self.num_experts, 1, self.capacity_factor)
    gates_ec, token_ec = jax.lax.top_k(probs_ne.T, c)  # each expert's top-c tokens
    y_ecd = self.experts(x_nd[token_ec])  # [experts, capacity, d]
    weighted = (gates_ec[..., None].astype(y_ecd.dtype) * y_ecd).reshape(-1, d)
    return jnp.zeros((n, d), y_ecd.dtype).at[token_ec.reshape(-1)].add(weighted)


def expert_usage(cfg) -> dict | None:
  """`num_experts` and average `experts_per_token` of the config's MoE layers, as keyword
  arguments for `metrics.params.active_params`; None when the model has no MoE.

  experts_per_token is top_k for top-k routing (drops not discounted) and capacity_factor for
  expert choice (E·C / tokens).
  """
  if "moe" not in cfg.mlp_pattern:
    return None
  o = moe_options(cfg)
  per_token = o["capacity_factor"] if o["routing"] == "expert_choice" else o["top_k"]
  return dict(num_experts=o["num_experts"], experts_per_token=float(per_token))


@MLPS.register("moe")
def _build(cfg, *, rngs: nnx.Rngs) -> MoE:
  o = moe_options(cfg)
  return MoE(
    cfg.d_model,
    o["expert_dim"] or cfg.mlp_dim,
    o["num_experts"],
    top_k=o["top_k"],
    routing=o["routing"],
    dispatch=o["dispatch"],
    causal=cfg.kind == "decoder",
    capacity_factor=o["capacity_factor"],
    normalize_gates=o["normalize_gates"],
    expert_mlp=o["expert_mlp"],
    grouped_matmul=o["grouped_matmul"],
    aux_loss_weight=o["aux_loss_weight"],
    z_loss_weight=o["z_loss_weight"],
    init_std=cfg.init_std,
    out_init_std=cfg.out_init_std,
    dtype=cfg.compute_dtype,
    param_dtype=cfg.storage_dtype,
    rngs=rngs,
  )


def _layer_pattern(cfg) -> tuple[str, ...]:
  """MLPs of `every` consecutive blocks: the dense MLP, then MoE in the last (GLaM interleaving)."""
  o = moe_options(cfg)
  return (o["dense_mlp"],) * (o["every"] - 1) + ("moe",)


# `ModelConfig.mlp_pattern` reads this to interleave dense and MoE blocks.
_build.layer_pattern = _layer_pattern
