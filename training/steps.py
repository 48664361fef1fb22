"""The jitted train and eval steps: weighted cross-entropy, gradient accumulation, non-finite guard.

Parameters are a pure nested dict (the model's `nnx.Param` state), merged with the model's graph
definition inside the step, so the step is a plain function of arrays that jit, shard and donate.
"""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx


@flax.struct.dataclass
class TrainState:
  """Everything a step changes, and everything a checkpoint holds.

  Attributes:
    step: Optimizer steps taken, int32.
    params: Model parameters as a pure nested dict.
    opt_state: Optimizer state.
    first_nonfinite_step: First step whose loss or gradient was NaN/Inf, or -1.
    nonfinite_count: How many updates were skipped for that reason.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  first_nonfinite_step: jax.Array
  nonfinite_count: jax.Array

  @classmethod
  def create(cls, params, tx: optax.GradientTransformation) -> "TrainState":
    return cls(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      first_nonfinite_step=jnp.full((), -1, jnp.int32),
      nonfinite_count=jnp.zeros((), jnp.int32),
    )


def weighted_losses(logits, targets, weights):
  """Summed weighted cross-entropy, weight total and number of correct argmax predictions."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # [b, t]
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  w = weights.astype(jnp.float32)
  return jnp.sum(ce * w), jnp.sum(w), jnp.sum(correct * w)


def _forward(graphdef, params, batch, forward=None):
  model = nnx.merge(graphdef, params)
  out = model(batch["inputs"]) if forward is None else forward(model, batch["inputs"])
  loss_sum, weight, correct = weighted_losses(out.logits, batch["targets"], batch["weights"])
  return loss_sum, weight, correct, out.aux_loss


def make_train_step(
  graphdef,
  tx: optax.GradientTransformation,
  *,
  grad_accum_steps: int = 1,
  nonfinite: str = "stop",
  grad_shardings=None,
  forward=None,
  opt_state_offload=None,
):
  """Builds `train_step(state, batch) -> (state, metrics)`.

  The loss is the weighted mean cross-entropy over the whole batch (plus the model's auxiliary
  loss); with accumulation the microbatch gradients of the summed loss are added and divided by
  the batch's total weight once, so the update equals the unaccumulated one.

  Args:
    graphdef: The model's graph definition (`nnx.split(model)[0]`).
    tx: The optimizer.
    grad_accum_steps: Microbatches per step; the batch's leading axis must divide by it.
    nonfinite: "stop" or "skip"; both leave parameters untouched on a non-finite loss/gradient
      and record the step; "stop" lets the host loop raise.
    grad_shardings: Optional shardings (a params-shaped pytree) the gradients are constrained
      to, e.g. the parameters' own under FSDP so XLA reduce-scatters them instead of keeping a
      full copy per device.
    forward: Optional `(model, inputs) -> ModelOutput` replacing `model(inputs)`, e.g. a
      pipelined forward (`parallel.pipeline.decoder_forward`).
    opt_state_offload: Optional (device shardings, host shardings) of the optimizer state when
      it lives in host memory between steps: it is copied to the device for the update and the
      new state back to the host.
  """
  del nonfinite  # Both policies skip the update in-graph; the host decides whether to stop.

  def offloaded(opt_state):
    if opt_state_offload is None:
      return opt_state
    return jax.device_put(opt_state, opt_state_offload[1])

  def place(grads):
    if grad_shardings is None:
      return grads
    return jax.lax.with_sharding_constraint(grads, grad_shardings)

  def micro_grads(params, batch):
    def loss_fn(p):
      loss_sum, weight, correct, aux = _forward(graphdef, p, batch, forward)
      # Aux loss is a per-call mean; weight it by this microbatch's share of the tokens.
      return loss_sum + aux * weight, (loss_sum, weight, correct)

    (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return place(grads), stats

  def train_step(state: TrainState, batch):
    if grad_accum_steps == 1:
      grads, (loss_sum, weight, correct) = micro_grads(state.params, batch)
    else:
      micro = jax.tree.map(
        lambda x: x.reshape(grad_accum_steps, x.shape[0] // grad_accum_steps, *x.shape[1:]), batch
      )

      def body(carry, mb):
        g_acc, s_acc = carry
        g, s = micro_grads(state.params, mb)
        return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, s_acc, s)), None

      zeros = place(jax.tree.map(jnp.zeros_like, state.params))
      stats0 = (jnp.zeros(()), jnp.zeros(()), jnp.zeros(()))
      (grads, (loss_sum, weight, correct)), _ = jax.lax.scan(body, (zeros, stats0), micro)

    denom = jnp.maximum(weight, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    loss = loss_sum / denom
    grad_norm = optax.tree.norm(grads)
    old_opt_state = state.opt_state
    if opt_state_offload is not None:
      old_opt_state = jax.device_put(old_opt_state, opt_state_offload[0])
    updates, opt_state = tx.update(grads, old_opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)

    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    new_state = state.replace(
      step=state.step + 1,
      params=keep(new_params, state.params),
      opt_state=offloaded(keep(opt_state, old_opt_state)),
      first_nonfinite_step=jnp.where(
        ok | (state.first_nonfinite_step >= 0), state.first_nonfinite_step, state.step
      ),
      nonfinite_count=state.nonfinite_count + (~ok).astype(jnp.int32),
    )
    metrics = {
      "loss": loss,
      "accuracy": correct / denom,
      "grad_norm": grad_norm,
      "tokens": weight,
    }
    return new_state, metrics

  return train_step


def make_eval_step(graphdef, forward=None):
  """Builds `eval_step(params, batch) -> sums` with loss_sum, weight and correct."""

  def eval_step(params, batch):
    loss_sum, weight, correct, _ = _forward(graphdef, params, batch, forward)
    return {"loss_sum": loss_sum, "weight": weight, "correct": correct}

  return eval_step


def make_multi_step(train_step, steps_per_call: int):
  """Runs `steps_per_call` train steps in one compiled call over batches stacked on axis 0.

  On small models the per-call dispatch and host round trip is a large share of a step; looping
  on device removes it. Metrics come back stacked, [steps_per_call, ...].
  """
  if steps_per_call == 1:
    return train_step

  def multi_step(state: TrainState, batches):
    return jax.lax.scan(train_step, state, batches)

  return multi_step
