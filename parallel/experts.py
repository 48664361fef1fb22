"""Expert parallelism: MoE experts sharded on the `expert` mesh axis, tokens exchanged all-to-all.

Inside a `shard_map` over the expert axis (other axes stay automatic), each expert-parallel
group routes its own tokens (GShard-style local groups), packs them into [experts, capacity, d]
buffers, and an all-to-all sends every expert's slots to the device holding that expert; the
experts run on [experts/ep, ep·capacity, d] and a second all-to-all brings the results back.

Semantics versus `models.moe.MoE` on one device: capacity is per device's tokens, so when
tokens are dropped the two differ (as GShard's groups do); without drops (capacity_factor >=
num_experts / top_k, or the dropless setting, which here becomes a no-drop capacity) the output
is the same. The auxiliary losses are computed from global token statistics (psum over the
axis), so they match exactly. Top-k routing only (expert choice picks tokens globally).

`use_expert_parallel(model, mesh)` swaps every MoE layer of a merged model for this dispatch,
keeping the same parameters, so a train step can run it without changing the model code.
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from reslm.models import moe as moe_lib


def _dispatch(moe, x_nd, gates_nk, experts_nk, capacity: int):
  """Local capacity dispatch (as `MoE._capacity`): slots [E, c] and where each assignment went."""
  n, k = experts_nk.shape
  e, d = moe.num_experts, x_nd.shape[-1]
  experts_a = experts_nk.T.reshape(-1)  # Choice-major, as in MoE: [k * n].
  token_a = jnp.tile(jnp.arange(n), k)
  onehot_ae = jax.nn.one_hot(experts_a, e, dtype=jnp.int32)
  pos_a = jnp.sum((jnp.cumsum(onehot_ae, axis=0) - 1) * onehot_ae, axis=-1)
  slot_a = jnp.where(pos_a < capacity, experts_a * capacity + pos_a, e * capacity)
  token_s = jnp.full((e * capacity + 1,), n, jnp.int32).at[slot_a].set(token_a)[: e * capacity]
  x_pad = jnp.concatenate([x_nd, jnp.zeros((1, d), x_nd.dtype)])
  return x_pad[token_s].reshape(e, capacity, d), slot_a


def moe_all_to_all(moe, x, *, mesh, axis: str = "expert", batch_axis: str | None = "data"):
  """`moe(x)` with experts sharded over `axis` and tokens exchanged by all-to-all.

  Args:
    moe: A `models.moe.MoE` with top-k routing.
    x: [..., d] activations whose leading (batch) axis is split over (`batch_axis`, `axis`).
    mesh: The mesh holding `axis`.
    axis: The expert-parallel mesh axis.
    batch_axis: A data-parallel mesh axis made manual too (when the mesh has it with size > 1),
      so each device routes only its own tokens; None leaves it automatic.

  Returns:
    (y [..., d], weighted auxiliary loss), like `MoE.__call__`.
  """
  if moe.routing != "topk":
    raise ValueError(
      f"expert parallelism with all-to-all supports routing='topk', not {moe.routing!r}"
    )
  ep = mesh.shape[axis]
  e = moe.num_experts
  if e % ep:
    raise ValueError(f"num_experts={e} is not divisible by parallel.{axis}={ep}")
  lead, d = x.shape[:-1], x.shape[-1]
  x_nd = x.reshape(-1, d)
  dp = mesh.shape.get(batch_axis, 1) if batch_axis else 1
  manual = (batch_axis, axis) if dp > 1 else (axis,)
  if x_nd.shape[0] % (ep * dp):
    raise ValueError(f"{x_nd.shape[0]} tokens do not split over {ep * dp} devices")
  router_def, router_state = nnx.split(moe.router)
  experts_def, experts_state = nnx.split(moe.experts)

  def local(router_state, experts_state, x_nd):
    n = x_nd.shape[0]  # This group's tokens.
    logits_ne = nnx.merge(router_def, router_state)(x_nd)
    probs_ne = jax.nn.softmax(logits_ne, axis=-1)
    gates_nk, experts_nk = jax.lax.top_k(probs_ne, moe.top_k)
    if moe.normalize_gates:
      gates_nk = gates_nk / jnp.sum(gates_nk, axis=-1, keepdims=True)
    # Auxiliary losses from global statistics: sums over every group's tokens.
    total = jax.lax.psum(n, manual)
    counts_e = jax.lax.psum(jnp.sum(jax.nn.one_hot(experts_nk, e), axis=(0, 1)), manual)
    probs_e = jax.lax.psum(jnp.sum(probs_ne, axis=0), manual) / total
    balance = e * jnp.sum(counts_e / (total * moe.top_k) * probs_e)
    z = jax.lax.psum(jnp.sum(jnp.square(jax.nn.logsumexp(logits_ne, axis=-1))), manual) / total
    aux = moe.aux_loss_weight * balance + moe.z_loss_weight * z

    no_drops = moe.dispatch == "dropless"
    c = n if no_drops else moe_lib.capacity(n, e, moe.top_k, moe.capacity_factor)
    x_ecd, slot_a = _dispatch(moe, x_nd, gates_nk, experts_nk, c)
    # Send expert block j to device j: [E, c, d] -> [E/ep, ep * c, d] (this device's experts).
    x_ecd = jax.lax.all_to_all(x_ecd, axis, split_axis=0, concat_axis=1, tiled=True)
    y_ecd = nnx.merge(experts_def, experts_state)(x_ecd)
    y_ecd = jax.lax.all_to_all(y_ecd, axis, split_axis=1, concat_axis=0, tiled=True)  # Back.
    y_pad = jnp.concatenate([y_ecd.reshape(e * c, d), jnp.zeros((1, d), y_ecd.dtype)])
    y_knd = y_pad[slot_a].reshape(moe.top_k, n, d)  # Dropped assignments read the zero row.
    y_nd = jnp.einsum("nk,knd->nd", gates_nk.astype(y_knd.dtype), y_knd)
    return y_nd, aux

  expert_specs = jax.tree.map(lambda _: P(axis), experts_state)  # Leading `expert` dimension.
  y_nd, aux = jax.shard_map(
    local,
    mesh=mesh,
    in_specs=(jax.tree.map(lambda _: P(), router_state), expert_specs, P(manual)),
    out_specs=(P(manual), P()),
    axis_names=set(manual),
  )(router_state, experts_state, x_nd)
  return y_nd.astype(moe.dtype).reshape(*lead, d), aux


class ExpertParallelMoE(nnx.Module):
  """Wraps a `MoE` (same parameters) so that calling it runs `moe_all_to_all`."""

  def __init__(self, moe, mesh, axis: str = "expert"):
    self.moe = moe
    self.mesh = mesh
    self.axis = axis

  def __call__(self, x):
    return moe_all_to_all(self.moe, x, mesh=self.mesh, axis=self.axis)


def use_expert_parallel(model, mesh, axis: str = "expert"):
  """Swaps the MoE layers of a (merged) DecoderLM / EncoderLM for all-to-all dispatch in place.

  Returns:
    The number of MoE layers swapped (0: nothing to do).
  """
  swapped = 0
  for block in getattr(getattr(model, "layers", None), "groups", None).blocks:
    if isinstance(block.mlp, moe_lib.MoE):
      block.mlp = ExpertParallelMoE(block.mlp, mesh, axis)
      swapped += 1
  return swapped
