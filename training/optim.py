"""AdamW with linear warmup, cosine decay and global-norm clipping."""

import jax
import optax


def learning_rate_schedule(cfg) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then cosine decay to `end_learning_rate`.

  Args:
    cfg: The `train` config section.
  """
  decay_steps = cfg.decay_steps or cfg.steps
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=cfg.learning_rate,
    warmup_steps=cfg.warmup_steps,
    decay_steps=max(decay_steps, cfg.warmup_steps + 1),
    end_value=cfg.end_learning_rate,
  )


def build_optimizer(cfg, params=None) -> optax.GradientTransformation:
  """The optimizer for the `train` config section.

  Args:
    cfg: The `train` section.
    params: Parameter pytree (pure dict); its `layers` subtree has a leading stacked axis, so the
      rank test for weight decay discounts one axis there.

  Returns:
    An optax transformation: clip -> AdamW(schedule).
  """
  mask = None
  if params is not None:
    mask = jax.tree_util.tree_map_with_path(
      lambda path, p: p.ndim - (1 if _in_layers(path) else 0) >= 2, params
    )
  chain = []
  if cfg.grad_clip > 0:
    chain.append(optax.clip_by_global_norm(cfg.grad_clip))
  chain.append(
    optax.adamw(
      learning_rate=learning_rate_schedule(cfg),
      b1=cfg.b1,
      b2=cfg.b2,
      eps=cfg.eps,
      weight_decay=cfg.weight_decay,
      mask=mask,
    )
  )
  return optax.chain(*chain)


def _in_layers(path) -> bool:
  return any(getattr(k, "key", None) == "layers" for k in path)
