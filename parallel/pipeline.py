"""Pipeline parallelism: stacked layers split into stages along the `pipeline` mesh axis.

The batch is cut into M microbatches that move from stage to stage with `ppermute` inside a
`shard_map` over the pipeline axis (other mesh axes stay automatic, so data parallelism and
sharding constraints inside a stage keep working). Autodiff of the forward schedule gives the
backward one (ppermutes reversed), so gradients need no extra code.

Schedules, for p stages and M microbatches:
  gpipe     Each device holds L/p consecutive layers; a microbatch enters stage 0 at step m and
            leaves stage p-1 at step m + p - 1. Steps: M + p - 1; bubble (p-1)/(M+p-1).
  circular  Interleaved / circular stages (as in Narayanan et al. 2021 and praxis/MaxText): the
            layers form r·p chunks and device s holds chunks s, s+p, ...; a microbatch goes
            around the ring r times. Each step runs one chunk (1/r of a device's layers). Steps:
            r·M + p - 1; bubble (p-1)/(r·M+p-1), ~r times smaller. Needs M >= p: outputs of
            the last stage wait on stage 0 in a buffer of M slots until their next lap. The
            layers are permuted into chunk order inside the step, which costs an all-to-all of
            the stacked parameters when they are stored contiguously per stage.

Axes: stacked parameters [layers, ...]; activations [microbatch, batch/M, seq, embed].
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

SCHEDULES = ("gpipe", "circular")


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
  """Idle share of the stage-steps: (p - 1) / (r·M + p - 1)."""
  return (stages - 1) / (repeats * microbatches + stages - 1)


def schedule_table(stages: int, microbatches: int, repeats: int = 1) -> list[list]:
  """Which (microbatch, lap) each stage works on at each step (None = idle), [step][stage]."""
  steps = repeats * microbatches + stages - 1
  table = []
  for t in range(steps):
    row = []
    for s in range(stages):
      u = t - s
      row.append((u % microbatches, u // microbatches) if 0 <= u < repeats * microbatches else None)
    table.append(row)
  return table


def check(
  num_layers: int, stages: int, microbatches: int, batch: int | None, schedule: str, repeats: int
):
  """One-line errors for a pipeline that does not fit the model (or the batch, when given)."""
  if schedule not in SCHEDULES:
    raise ValueError(
      f"parallel.pipeline_schedule={schedule!r} is not known; choose one of: {', '.join(SCHEDULES)}"
    )
  chunks = stages * (repeats if schedule == "circular" else 1)
  if num_layers % chunks:
    raise ValueError(
      f"{num_layers} stacked layer groups do not split into parallel.pipeline={stages} stages"
      + (f" x parallel.pipeline_repeats={repeats} laps" if schedule == "circular" else "")
      + f"; use a number of groups divisible by {chunks}"
    )
  if microbatches < 1 or (batch is not None and batch % microbatches):
    raise ValueError(
      f"parallel.pipeline_microbatches={microbatches} must be >= 1 and divide the batch of {batch}"
    )
  if schedule == "circular" and microbatches < stages:
    raise ValueError(
      f"the circular schedule needs parallel.pipeline_microbatches={microbatches} >= "
      f"parallel.pipeline={stages} (a microbatch's next lap starts after the others' first)"
    )


def pipeline(
  stage_fn: Callable,
  layer_params,
  x,
  *,
  mesh,
  microbatches: int,
  schedule: str = "gpipe",
  repeats: int = 1,
  axis: str = "pipeline",
  batch_axis: str | None = "data",
):
  """Applies `stage_fn` over all stacked layers, pipelined over the `axis` mesh axis.

  Equals `stage_fn(layer_params, x)` applied to the whole stack at once, i.e. the layers in
  order (tests check this, and gradients).

  Args:
    stage_fn: `(params with a leading [n] layers axis, x) -> x`, applying those n layers in
      order (e.g. a `lax.scan` over them); x is a pytree of [b, ...] arrays.
    layer_params: Pytree of stacked layer parameters, leading axis L (divisible by the stage
      count, times `repeats` for the circular schedule).
    x: Input activations, a pytree of [batch, ...] arrays, batch divisible by `microbatches`.
    mesh: The mesh holding `axis`.
    microbatches: M.
    schedule: "gpipe" or "circular".
    repeats: Laps around the ring for "circular" (chunks per device).
    axis: The pipeline mesh axis.
    batch_axis: A mesh axis the batch is split over, made manual too (when the mesh has it with
      size > 1): each of its devices cuts its own rows into microbatches, so nothing moves to
      form them, and the data-parallel gradient sum of the stage parameters happens once at the
      end rather than inside every schedule step. None leaves every other axis automatic.

  Returns:
    The output pytree, [batch, ...] leaves, replicated over `axis`.
  """
  p = mesh.shape[axis]
  r = repeats if schedule == "circular" else 1
  num_layers = jax.tree.leaves(layer_params)[0].shape[0]
  batch = jax.tree.leaves(x)[0].shape[0]
  check(num_layers, p, microbatches, batch, schedule, r)
  c = num_layers // (p * r)
  # Stage-major layout [p, r, c, ...]: device s gets chunks k·p + s for k < r (for r = 1 its
  # L/p consecutive layers, which is how `layers` -> pipeline already stores them).
  staged = jax.tree.map(
    lambda a: (
      a.reshape(r, p, c, *a.shape[1:]).swapaxes(0, 1) if r > 1 else a.reshape(p, 1, c, *a.shape[1:])
    ),
    layer_params,
  )
  m = microbatches
  tree = jax.tree.map
  dp = mesh.shape.get(batch_axis, 1) if batch_axis else 1
  if batch % (dp * m):
    raise ValueError(
      f"the batch of {batch} does not split into parallel.pipeline_microbatches={m} "
      f"microbatches on each of the {dp} {batch_axis} shards"
    )
  split = {axis} | ({batch_axis} if dp > 1 else set())
  # Size-1 axes partition nothing: manual too, so that code inside a stage (a Pallas kernel, which
  # needs every axis manual) meets no automatic axis when the mesh has none of size > 1 left.
  manual = split | {a for a in mesh.axis_names if mesh.shape[a] == 1}
  rows = P(batch_axis) if dp > 1 else P()

  def run(params, x):
    params = tree(lambda a: a[0], params)  # This device's [r, c, ...].
    # Microbatch j takes rows j, j + M, ...: [b, ...] -> [M, b/M, ...] (local rows only).
    xs = tree(lambda a: a.reshape(a.shape[0] // m, m, *a.shape[1:]).swapaxes(0, 1), x)
    s = jax.lax.axis_index(axis)
    zeros = tree(lambda a: jnp.zeros_like(a[0]), xs)
    ring = [(i, (i + 1) % p) for i in range(p)]
    pick = lambda cond, a, b: tree(lambda u, v: jnp.where(cond, u, v), a, b)

    def step(carry, t):
      state, laps, out = carry
      u = t - s  # This stage's work item: microbatch u % M on lap u // M.
      valid = (u >= 0) & (u < r * m)
      uc = jnp.clip(u, 0, r * m - 1)
      mb, lap = uc % m, uc // m
      first = pick(lap == 0, tree(lambda a: a[mb], xs), tree(lambda a: a[mb], laps))
      inp = pick(s == 0, first, state)
      chunk = tree(lambda a: a[lap], params)
      y = pick(valid, stage_fn(chunk, inp), zeros)
      done = valid & (s == p - 1) & (lap == r - 1)
      out = tree(lambda o, v: o.at[mb].set(jnp.where(done, v, o[mb])), out, y)
      received = tree(lambda v: jax.lax.ppermute(v, axis, ring), y)
      # Stage 0 receives the last stage's output of item t - (p - 1): keep it for its next lap.
      u_in = t - (p - 1)
      keep = (s == 0) & (u_in >= 0) & (u_in < r * m)
      slot = jnp.clip(u_in, 0, r * m - 1) % m
      laps = tree(lambda b, v: b.at[slot].set(jnp.where(keep, v, b[slot])), laps, received)
      return (received, laps, out), None

    def varying(a):  # Per-device values along the pipeline (and batch) axes.
      missing = tuple(sorted(split - set(jax.typeof(a).mat.varying)))
      return jax.lax.pcast(a, missing, to="varying") if missing else a

    # Cast once before the loop, so that the gradients of these replicated values (parameters
    # over the data axis, inputs over the stages) are summed once at the end, not every step.
    xs, params = tree(varying, xs), tree(varying, params)
    empty = tree(lambda a: varying(jnp.zeros_like(a)), xs)
    carry = (tree(varying, zeros), empty, empty)
    (_, _, out), _ = jax.lax.scan(step, carry, jnp.arange(r * m + p - 1))
    # Only the last stage holds outputs; the sum hands them to every stage.
    out = tree(lambda o: jax.lax.psum(jnp.where(s == p - 1, o, jnp.zeros_like(o)), axis), out)
    return tree(lambda o: o.swapaxes(0, 1).reshape(-1, *o.shape[2:]), out)

  return jax.shard_map(
    run,
    mesh=mesh,
    in_specs=(tree(lambda _: P(axis), staged), tree(lambda _: rows, x)),
    out_specs=tree(lambda _: rows, x),
    axis_names=manual,
  )(staged, x)


def decoder_forward(
  model, tokens_bt, *, mesh, microbatches: int, schedule: str = "gpipe", repeats: int = 1
):
  """A `DecoderLM` / `EncoderLM` forward pass with its layer stack pipelined.

  Same result as `model(tokens_bt)` (no cache, no segment ids). Auxiliary losses (MoE) are
  computed per microbatch and averaged, which differs from the whole-batch value when the loss
  is nonlinear in the batch (load balancing).

  Returns:
    `models.transformer.ModelOutput` (logits, None, aux_loss).
  """
  from flax import nnx

  from reslm.models import transformer
  from reslm.models.sharding import constrain

  if not isinstance(model, (transformer.DecoderLM, transformer.EncoderLM)):
    raise ValueError(f"pipeline parallelism supports DecoderLM and EncoderLM, not {type(model)}")
  stack = model.layers
  graphdef, groups = nnx.split(stack.groups)
  b, t = tokens_bt.shape

  def group(x_aux, group_state):
    x, aux = x_aux
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), x.shape[:2])
    x, _, group_aux = nnx.merge(graphdef, group_state)(x, positions_bt=positions)
    return (x, aux + group_aux), None

  if stack.remat != "none":
    group = jax.checkpoint(group, policy=transformer.REMAT_POLICIES[stack.remat])

  def stage_fn(chunk, act):
    (x, aux), _ = jax.lax.scan(group, (act["x"], act["aux"][0]), chunk)
    return {"x": x, "aux": jnp.broadcast_to(aux, act["aux"].shape)}

  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  x = constrain(model.embed_inputs(tokens_bt, positions), ("batch", "seq", "embed"))
  act = {"x": x, "aux": jnp.zeros((b,), jnp.float32)}  # Per-row copy of its microbatch's aux.
  act = pipeline(
    stage_fn, groups, act, mesh=mesh, microbatches=microbatches, schedule=schedule, repeats=repeats
  )
  # The final norm (if any) and the LM / masked-LM head, as the model's own forward.
  logits = model.project_logits(act["x"])
  return transformer.ModelOutput(logits, None, jnp.mean(act["aux"]))
