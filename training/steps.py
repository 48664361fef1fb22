"""The jitted train and eval steps: weighted cross-entropy, gradient accumulation, non-finite guard.

Parameters are a pure nested dict (the model's `nnx.Param` state), merged with the model's graph
definition inside the step, so the step is a plain function of arrays that jit, shard and donate.

An `Objective` (e.g. `compress.distill`) replaces the cross-entropy: it sees the model's output,
the batch, its own trainable parameters (kept under `params[OBJECTIVE_PARAMS]`, optimised and
checkpointed with the model but never merged into it) and frozen arrays passed to the step as a
third argument (e.g. a teacher's parameters, never differentiated). Without one nothing changes.

Sampled mixers (LSH rotations, KDEformer samples) draw fresh randomness every training step: the
train step passes the model `sample_key` = fold_in(key(SAMPLE_SEED), step) (and the microbatch
index under accumulation); the eval step passes none, so evaluation uses fixed samples.
"""

import dataclasses
from collections.abc import Callable
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


OBJECTIVE_PARAMS = "objective"


@dataclasses.dataclass(frozen=True)
class Objective:
  """A training loss replacing plain cross-entropy; see the module docstring.

  Attributes:
    loss: `(out, batch, objective_params, frozen) -> (loss_sum, terms)`: the weighted loss of a
      (micro)batch summed over tokens, given the model's `ModelOutput`, and named summed terms to
      log (divided by the batch's token weight, like the loss).
    forward: Optional `(model, inputs) -> ModelOutput` replacing `model(inputs)` in training,
      e.g. to return hidden states.
    frozen: A pytree of arrays every step reads and nothing updates (or None).
    init_params: Optional `() -> pytree` creating the objective's own trainable parameters.
  """

  loss: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
  forward: Callable | None = None
  frozen: Any = None
  init_params: Callable[[], Any] | None = None


def model_params(params):
  """The model's own parameters: `params` without the objective's (if any)."""
  if isinstance(params, dict) and OBJECTIVE_PARAMS in params:
    return {k: v for k, v in params.items() if k != OBJECTIVE_PARAMS}
  return params


def weighted_losses(logits, targets, weights):
  """Summed weighted cross-entropy, weight total and number of correct argmax predictions."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # [b, t]
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  w = weights.astype(jnp.float32)
  return jnp.sum(ce * w), jnp.sum(w), jnp.sum(correct * w)


SAMPLE_SEED = 0  # Root of the per-step keys of sampled mixers (see the module docstring).


def _apply(graphdef, params, inputs, forward=None, sample_key=None):
  model = nnx.merge(graphdef, model_params(params))
  if forward is not None:  # Pipelined / objective forwards sample like evaluation (fixed).
    return forward(model, inputs)
  return model(inputs) if sample_key is None else model(inputs, sample_key=sample_key)


def _forward(graphdef, params, batch, forward=None, sample_key=None):
  out = _apply(graphdef, params, batch["inputs"], forward, sample_key)
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
  objective: Objective | None = None,
):
  """Builds `train_step(state, batch[, frozen]) -> (state, metrics)`.

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
    objective: Optional `Objective` replacing the cross-entropy; the step then takes its frozen
      arrays as a third argument and also reports each of its terms.
  """
  if objective is not None and objective.forward is not None:
    if forward is not None:
      raise ValueError("an objective with its own forward cannot run with a pipelined forward")
    forward = objective.forward
  del nonfinite  # Both policies skip the update in-graph; the host decides whether to stop.

  def offloaded(opt_state):
    if opt_state_offload is None:
      return opt_state
    return jax.device_put(opt_state, opt_state_offload[1])

  def place(grads):
    if grad_shardings is None:
      return grads
    return jax.lax.with_sharding_constraint(grads, grad_shardings)

  def micro_grads(params, batch, frozen, sample_key):
    def loss_fn(p):
      if objective is None:
        loss_sum, weight, correct, aux = _forward(graphdef, p, batch, forward, sample_key)
        terms = {}
      else:
        out = _apply(graphdef, p, batch["inputs"], forward)
        _, weight, correct = weighted_losses(out.logits, batch["targets"], batch["weights"])
        loss_sum, terms = objective.loss(out, batch, p.get(OBJECTIVE_PARAMS), frozen)
        aux = out.aux_loss
      # Aux loss is a per-call mean; weight it by this microbatch's share of the tokens.
      return loss_sum + aux * weight, (loss_sum, weight, correct, terms)

    (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return place(grads), stats

  def train_step(state: TrainState, batch, frozen=None):
    step_key = jax.random.fold_in(jax.random.key(SAMPLE_SEED), state.step)
    if grad_accum_steps == 1:
      grads, (loss_sum, weight, correct, terms) = micro_grads(state.params, batch, frozen, step_key)
    else:
      micro = jax.tree.map(
        lambda x: x.reshape(grad_accum_steps, x.shape[0] // grad_accum_steps, *x.shape[1:]), batch
      )

      def body(carry, xs):
        g_acc, s_acc = carry
        mb, i = xs
        g, s = micro_grads(state.params, mb, frozen, jax.random.fold_in(step_key, i))
        return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, s_acc, s)), None

      zeros = place(jax.tree.map(jnp.zeros_like, state.params))
      first = jax.tree.map(lambda x: x[0], micro)
      stats_shape = jax.eval_shape(lambda: micro_grads(state.params, first, frozen, step_key)[1])
      stats0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), stats_shape)
      (grads, (loss_sum, weight, correct, terms)), _ = jax.lax.scan(
        body, (zeros, stats0), (micro, jnp.arange(grad_accum_steps))
      )

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
      **{name: term / denom for name, term in terms.items()},
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

  def multi_step(state: TrainState, batches, *frozen):
    return jax.lax.scan(lambda s, b: train_step(s, b, *frozen), state, batches)

  return multi_step
