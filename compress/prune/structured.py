"""Structured pruning (LLM-Pruner style): remove whole attention heads and MLP neurons.

Unlike the unstructured methods, the shapes really shrink: the model is rebuilt with a smaller
`num_heads` / `num_kv_heads` / `mlp_dim` and the kept slices of its weights. One whole-model method,
`structured` (stage prune), after Ma et al., "LLM-Pruner" (2023):

  units     Attention: a KV group, i.e. one key/value head and the num_heads / num_kv_heads query
            heads that read it (a single head without GQA): its q columns, k and v columns and o
            rows. MLP (SwiGLU or GELU): a hidden neuron, i.e. its gate and up columns (and up bias)
            and its down row. Removing a unit removes exactly these slices, so the pruned model
            computes what the original computes with the unit's output zeroed (the heads' attention
            outputs before `o`, the neuron's activation before `down`).
  scores    "taylor": sum over the unit's weights of |w · dL/dw|, L the mean next-token loss on the
            calibration sequences (LLM-Pruner's element-wise first-order score, summed per unit);
            "magnitude": the L2 norm of the unit's weights (a data-free baseline).
  counts    Every layer removes the same number of units, each layer its own lowest-scored ones:
            the model config has one num_heads / num_kv_heads / mlp_dim, and a scanned
            `LayerStack` holds all layers' parameters in one array, so all layers keep one shape.
            heads=r removes r * num_kv_heads KV groups (an exact count is required, so shapes stay
            valid under GQA); neurons=r removes round(r * mlp_dim) neurons.
  rebuild   A model of the shrunk config (head_dim set explicitly, since d_model // num_heads
            changes) receives the kept slices; norms, embeddings and the output head are copied.
            `model.cfg` and `model.layers` are replaced in place; the compressed checkpoint stores
            `model.cfg`, so `compress.load_compressed` rebuilds the new shapes.
  recovery  recover_steps > 0: that many AdamW steps (the run's optimizer settings, peak learning
            rate recover_lr, 10% warmup, cosine decay to recover_lr / 10) on the run's training
            batches 0, 1, ..., through `training.steps.make_train_step`, on every parameter
            (LLM-Pruner tunes LoRA adapters; a full fine-tune is the simple equivalent at our size).

The rule selects the attention mixers and/or MLPs, each by its own path (`.*/mixer`) or any of
its projections (`.*/mixer/.*`, `.*/mlp/.*`); with heads > 0 (neurons > 0) it must select every
mixer (every MLP) of the model, since the config changes for all layers. It runs first in the prune stage (whole-model steps precede per-layer
ones); later stages see the shrunk layers, and calibration inputs captured for `o` and `down`
(GPTQ, AWQ, ...) are sliced to the kept units.
"""

import dataclasses
from collections.abc import MutableMapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from reslm.compress.registry import ModelData, integer, is_num, number, one_of, register
from reslm.compress.targets import Target, path_name
from reslm.models import build_model
from reslm.models.attention.base import Attention
from reslm.models.linear import Linear, ProjectOut
from reslm.models.mlp import GeluMLP, SwiGLU
from reslm.models.transformer import Block

CRITERIA = ("taylor", "magnitude")
_RATIO = (lambda v: is_num(v) and 0 <= v < 1, "a number in [0, 1) (1 would remove every unit)")

# Where a unit lives in one layer's arrays: (projection, parameter) -> (axis, indexed by).
# Query-head slices ("head") are summed per KV group; "group" and "neuron" index units directly.
ATTENTION_SLICES = {
  ("q", "kernel"): (1, "head"),  # [embed, heads, head_dim]
  ("q", "bias"): (0, "head"),  # [heads, head_dim]
  ("k", "kernel"): (1, "group"),  # [embed, kv_heads, head_dim]
  ("k", "bias"): (0, "group"),
  ("v", "kernel"): (1, "group"),
  ("v", "bias"): (0, "group"),
  ("o", "kernel"): (0, "head"),  # [heads, head_dim, embed]
}
MLP_SLICES = {
  ("gate", "kernel"): (1, "neuron"),  # [embed, mlp]
  ("gate", "bias"): (0, "neuron"),
  ("up", "kernel"): (1, "neuron"),
  ("up", "bias"): (0, "neuron"),
  ("down", "kernel"): (0, "neuron"),  # [mlp, embed]; its bias [embed] is kept whole
}


@dataclasses.dataclass(frozen=True)
class Site:
  """One stacked module whose units are pruned.

  Attributes:
    path: Graph path of the attention mixer or the MLP.
    kind: "heads" or "neurons".
    layers: Model layer index of each stacked slice.
  """

  path: tuple
  kind: str
  layers: tuple[int, ...]

  @property
  def name(self) -> str:
    return path_name(self.path)

  @property
  def slices(self) -> dict:
    return ATTENTION_SLICES if self.kind == "heads" else MLP_SLICES


def _validate(settings: dict, where: str) -> None:
  if settings["heads"] == 0 and settings["neurons"] == 0:
    raise ValueError(f"{where} removes nothing: set heads and/or neurons to a ratio in (0, 1)")


def find_sites(model: nnx.Module, targets: list[Target], settings: dict) -> list[Site]:
  """The mixers and MLPs to prune: every one of the model's, all selected by the rule.

  Raises:
    ValueError: A block the rule leaves out, or a mixer / MLP structured pruning cannot shrink.
  """
  if not all(hasattr(model, a) for a in ("cfg", "layers")):
    raise ValueError(
      f"structured pruning needs a DecoderLM / EncoderLM, got {type(model).__name__}"
    )
  chosen = {t.path: t for t in targets if t.kind == "attention"}
  for t in targets:  # A mixer or MLP also counts as selected through any of its projections.
    chosen.setdefault(t.path[:-1], t)
  sites = []
  for path, node in nnx.iter_graph(model):
    if not isinstance(node, Block):
      continue
    wanted = (("heads", "mixer", node.mixer), ("neurons", "mlp", node.mlp))
    for kind, attr, module in wanted:
      if settings[kind] == 0:
        continue
      where = path_name((*path, attr))
      _check_module(kind, where, module)
      if (*path, attr) not in chosen:
        raise ValueError(
          f"structured {kind}={settings[kind]} changes every layer's shape, but the rule does not "
          f"select {where}; select all {'mixers' if kind == 'heads' else 'MLPs'} "
          f"(e.g. {'.*/mixer/.*' if kind == 'heads' else '.*/mlp/.*'})"
        )
      sites.append(Site(tuple((*path, attr)), kind, chosen[(*path, attr)].layers))
  if not sites:
    raise ValueError("structured pruning found no transformer block in the model")
  return sites


def _check_module(kind: str, where: str, module) -> None:
  if kind == "heads":
    names = ("q", "k", "v", "o")
    ok = isinstance(module, Attention) and set(nnx.to_pure_dict(nnx.state(module))) <= set(names)
    expected = "attention mixers whose only parameters are q/k/v/o"
  else:
    names = ("gate", "up", "down") if isinstance(module, SwiGLU) else ("up", "down")
    ok = isinstance(module, SwiGLU | GeluMLP)
    expected = "swiglu or gelu MLPs"
  if not ok:
    raise ValueError(
      f"structured {kind} pruning supports {expected}; {where} is a {type(module).__name__}"
    )
  for name in names:
    proj = getattr(module, name)
    if type(proj) not in (Linear, ProjectOut):
      raise ValueError(
        f"structured pruning needs float projections; {where}/{name} is a {type(proj).__name__} "
        "(run the prune stage before lowrank / quantize)"
      )


def _subtree(tree: dict, path) -> dict:
  for key in path:
    tree = tree[key]
  return tree


def _unit_axis(x: np.ndarray, axis: int, by: str, ratio: int) -> np.ndarray:
  """A stacked array [L, ...] reduced to [L, units, rest], query heads grouped per KV group."""
  x = np.moveaxis(x, axis + 1, 1)  # +1: the stacked `layers` axis
  x = x.reshape(x.shape[0], x.shape[1], -1)
  if by == "head":
    x = x.reshape(x.shape[0], x.shape[1] // ratio, -1)  # consecutive query heads share a KV head
  return x


def site_scores(
  site: Site, params: dict, grads: dict | None, criterion: str, group_ratio: int
) -> np.ndarray:
  """Importance of every unit of one site, float64 [layers, units] (see the module docstring)."""
  total = None
  w_tree = _subtree(params, site.path)
  g_tree = None if grads is None else _subtree(grads, site.path)
  for (proj, name), (axis, by) in site.slices.items():
    if name not in w_tree.get(proj, {}):
      continue  # e.g. no bias
    w = np.asarray(w_tree[proj][name], np.float64)
    g = None if g_tree is None else np.asarray(g_tree[proj][name], np.float64)
    x = np.abs(w * g) if criterion == "taylor" else w * w  # summed: |w·g|, or ‖w‖²
    part = _unit_axis(x, axis, by, group_ratio).sum(-1)
    total = part if total is None else total + part
  return total if criterion == "taylor" else np.sqrt(total)


def _loss_sum(graphdef, params, rest, tokens_nt, rows_n):
  """Summed next-token cross-entropy of the rows with rows_n = 1 (padding rows weigh 0)."""
  logits = nnx.merge(graphdef, params, rest)(tokens_nt[:, :-1]).logits.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens_nt[:, 1:])  # [n, t - 1]
  return jnp.sum(ce * rows_n[:, None])


# Module-level, graph definition static: models of one config share the compilation.
_loss_jit = jax.jit(_loss_sum, static_argnums=0)
_loss_and_grad_jit = jax.jit(jax.value_and_grad(_loss_sum, argnums=1), static_argnums=0)


def next_token_loss(model: nnx.Module, tokens_nt, batch_size: int, *, grads: bool = False):
  """Mean next-token cross-entropy on `tokens` [n, t] (and its gradient as a pure dict).

  Sequences run `batch_size` at a time, the last batch padded with weightless rows, so one
  compilation serves every batch.

  Returns:
    (loss, grads or None); grads are w.r.t. every `nnx.Param`, float32 numpy arrays.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
  tokens_nt = np.asarray(tokens_nt, np.int32)
  n = len(tokens_nt)
  batch_size = min(batch_size, n)
  pad = -n % batch_size
  tokens_nt = np.concatenate([tokens_nt, np.zeros((pad, tokens_nt.shape[1]), np.int32)])
  rows_n = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
  total, g_sum = 0.0, None
  for i in range(0, len(tokens_nt), batch_size):
    chunk = (tokens_nt[i : i + batch_size], rows_n[i : i + batch_size])
    if grads:
      out, g = _loss_and_grad_jit(graphdef, params, rest, *chunk)
      g_sum = g if g_sum is None else jax.tree.map(jnp.add, g_sum, g)
    else:
      out = _loss_jit(graphdef, params, rest, *chunk)
    total += float(out)
  count = n * (tokens_nt.shape[1] - 1)
  if g_sum is not None:
    g_sum = jax.tree.map(lambda g: np.asarray(g, np.float32) / count, g_sum)
  return total / count, g_sum


def unit_scores(
  model: nnx.Module, sites: list[Site], criterion: str, data: ModelData | None = None
) -> tuple[dict[str, np.ndarray], float | None]:
  """Scores per site name, [layers, units], and the calibration loss (None for magnitude)."""
  if criterion not in CRITERIA:
    raise ValueError(f"criterion={criterion!r} is not known; choose one of: {', '.join(CRITERIA)}")
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  loss = grads = None
  if criterion == "taylor":
    if model.cfg.kind != "decoder":
      raise ValueError(
        f"criterion='taylor' scores with the next-token loss; model.kind={model.cfg.kind!r} "
        "needs criterion='magnitude'"
      )
    if data is None or data.tokens is None:
      raise ValueError("criterion='taylor' needs calibration sequences (ModelData.tokens)")
    loss, grads = next_token_loss(model, data.tokens, data.batch_size, grads=True)
  ratio = model.cfg.num_heads // model.cfg.num_kv_heads
  scores = {s.name: site_scores(s, params, grads, criterion, ratio) for s in sites}
  return scores, loss


def removal_counts(cfg, settings: dict) -> dict[str, int]:
  """KV groups and neurons every layer removes.

  Raises:
    ValueError: heads that is not a whole number of KV groups, or a ratio removing no unit.
  """
  out = {"heads": 0, "neurons": 0}
  if settings["heads"]:
    groups, exact = cfg.num_kv_heads, settings["heads"] * cfg.num_kv_heads
    if abs(exact - round(exact)) > 1e-6 or round(exact) == 0:
      step = f"1/{groups}" if groups > 1 else "none below 1"
      raise ValueError(
        f"structured heads={settings['heads']} removes {exact:g} of model.num_kv_heads={groups} "
        f"KV groups ({cfg.num_heads // groups} query heads each); it must be a whole number "
        f"above 0: use a multiple of {step}"
      )
    out["heads"] = int(round(exact))
  if settings["neurons"]:
    count = int(round(settings["neurons"] * cfg.mlp_dim))
    if not 0 < count < cfg.mlp_dim:
      raise ValueError(
        f"structured neurons={settings['neurons']} removes {count} of model.mlp_dim="
        f"{cfg.mlp_dim} neurons; choose a ratio that removes at least one and keeps one"
      )
    out["neurons"] = count
  return out


def kept_units(scores_lu: np.ndarray, count: int) -> np.ndarray:
  """Indices each layer keeps, sorted, int [layers, units - count]: all but the `count` lowest."""
  order = np.argsort(scores_lu, axis=1, kind="stable")
  return np.sort(order[:, count:], axis=1)


def _take(x, idx_lu: np.ndarray, axis: int):
  """x [L, ...] keeping, in each layer l, entries idx_lu[l] along `axis` (of one layer)."""
  x = np.asarray(x)
  shape = [1] * x.ndim
  shape[0], shape[axis + 1] = idx_lu.shape
  return np.take_along_axis(x, idx_lu.reshape(shape), axis=axis + 1)


def _heads_of(groups_lu: np.ndarray, ratio: int) -> np.ndarray:
  """KV group indices [L, G'] -> their query heads [L, G' * ratio]."""
  heads = groups_lu[:, :, None] * ratio + np.arange(ratio)
  return heads.reshape(groups_lu.shape[0], -1)


def shrink(model: nnx.Module, sites: list[Site], keep: dict[str, np.ndarray]) -> None:
  """Rebuilds `model` (in place) at the smaller config with the kept units of each site.

  Args:
    model: A DecoderLM / EncoderLM; its `cfg` and `layers` are replaced.
    sites: From `find_sites`.
    keep: Site name -> kept unit indices [layers, kept] (KV groups or neurons), every site of a
      kind keeping the same count.
  """
  cfg = model.cfg
  ratio = cfg.num_heads // cfg.num_kv_heads
  changes = {"head_dim": cfg.resolved_head_dim}
  for s in sites:
    if s.kind == "heads":
      groups = keep[s.name].shape[1]
      changes.update(num_kv_heads=groups, num_heads=groups * ratio)
    else:
      changes["mlp_dim"] = keep[s.name].shape[1]
  new_cfg = dataclasses.replace(cfg, **changes)
  params = nnx.to_pure_dict(nnx.state(model))
  for s in sites:
    tree = _subtree(params, s.path)
    for (proj, name), (axis, by) in s.slices.items():
      if name in tree.get(proj, {}):
        idx = keep[s.name] if by != "head" else _heads_of(keep[s.name], ratio)
        tree[proj][name] = jnp.asarray(_take(tree[proj][name], idx, axis))
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_model(new_cfg)))
  want = dict(jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(abstract))[0])
  have = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  for key, spec in want.items():
    got = have.get(key)
    if got is None or got.shape != spec.shape:
      raise ValueError(
        f"structured pruning cannot rebuild {jax.tree_util.keystr(key)}: the config "
        f"{changes} gives shape {spec.shape}, the pruned weights {getattr(got, 'shape', None)}"
      )
  new = nnx.merge(graphdef, params)
  model.cfg = new_cfg
  model.layers = new.layers


def slice_calibration(calibration, sites: list[Site], keep: dict[str, np.ndarray], cfg) -> None:
  """Keeps the kept units' features of the captured inputs of `o` and `down` (dict, in place).

  Args:
    calibration: Target name -> inputs [layers, tokens, K] from the unpruned model.
    sites, keep: As for `shrink`.
    cfg: The model config before pruning.
  """
  if not isinstance(calibration, MutableMapping):
    return
  ratio = cfg.num_heads // cfg.num_kv_heads
  for s in sites:
    name = f"{s.name}/{'o' if s.kind == 'heads' else 'down'}"
    if name not in calibration:
      continue
    x = np.asarray(calibration[name])  # [L, tokens, K]
    lead = x.shape[:2]
    if s.kind == "heads":
      x = x.reshape(*lead, cfg.num_heads, cfg.resolved_head_dim)  # [L, tokens, heads, head_dim]
      x = np.take_along_axis(x, _heads_of(keep[s.name], ratio)[:, None, :, None], axis=2)
    else:
      x = np.take_along_axis(x, keep[s.name][:, None, :], axis=2)  # [L, tokens, kept]
    calibration[name] = x.reshape(*lead, -1)


def recover(model: nnx.Module, data: ModelData, steps: int, learning_rate: float) -> list[float]:
  """Fine-tunes every parameter for `steps` AdamW steps on the run's batches (in place).

  Returns:
    The training loss of each step.
  """
  from reslm.training.config import (
    get_train_defaults,  # Training imports are heavy; only needed here.
  )
  from reslm.training.optim import build_optimizer
  from reslm.training.steps import TrainState, make_train_step

  if data is None or data.train_batch is None:
    raise ValueError("structured recover_steps > 0 needs the run's training batches (ModelData)")
  base = data.train if data.train is not None else get_train_defaults()
  train = ml_collections.ConfigDict(dict(base))
  train.update(
    steps=steps,
    decay_steps=steps,
    warmup_steps=max(1, steps // 10),
    learning_rate=learning_rate,
    end_learning_rate=learning_rate / 10,
  )
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  tx = build_optimizer(train, params)
  step_fn = jax.jit(make_train_step(graphdef, tx))
  ts = TrainState.create(params, tx)
  losses = []
  for i in range(steps):
    batch = {k: jnp.asarray(v) for k, v in data.train_batch(i).items()}
    ts, metrics = step_fn(ts, batch)
    losses.append(float(metrics["loss"]))
  nnx.replace_by_pure_dict(state, ts.params)
  nnx.update(model, state)
  return losses


@register(
  "structured",
  stage="prune",
  target="any",
  defaults={
    "heads": 0.0,
    "neurons": 0.0,
    "criterion": "taylor",
    "recover_steps": 0,
    "recover_lr": 1e-4,
  },
  checks={
    "heads": _RATIO,
    "neurons": _RATIO,
    "criterion": one_of(*CRITERIA),
    "recover_steps": integer(0),
    "recover_lr": number(0.0, 1.0, lo_open=True),
  },
  per_layer=False,
  needs_data=True,
  validate=_validate,
)
def _structured(model, targets, calibration, settings, data):
  """Scores, removes the lowest units of every layer, rebuilds, optionally fine-tunes.

  Returns:
    One manifest "info" entry: the shapes before and after, each layer's removed units (model
    layer index -> unit indices), the calibration losses and the recovery losses.
  """
  cfg = model.cfg
  sites = find_sites(model, targets, settings)
  counts = removal_counts(cfg, settings)  # Every check before any compile.
  if settings["recover_steps"] and (data is None or data.train_batch is None):
    raise ValueError("structured recover_steps > 0 needs the run's training batches (ModelData)")
  scores, loss_before = unit_scores(model, sites, settings["criterion"], data)
  keep = {s.name: kept_units(scores[s.name], counts[s.kind]) for s in sites}
  removed = {}
  for s in sites:
    units = scores[s.name].shape[1]
    removed[s.name] = {
      str(layer): sorted(set(range(units)) - set(kept.tolist()))
      for layer, kept in zip(s.layers, keep[s.name], strict=True)
    }
  shrink(model, sites, keep)
  slice_calibration(calibration, sites, keep, cfg)
  new = model.cfg
  info = {
    "method": "structured",
    "criterion": settings["criterion"],
    "num_heads": [cfg.num_heads, new.num_heads],
    "num_kv_heads": [cfg.num_kv_heads, new.num_kv_heads],
    "mlp_dim": [cfg.mlp_dim, new.mlp_dim],
    "removed": removed,
  }
  summary = (
    f"structured ({settings['criterion']}): heads {cfg.num_heads} -> {new.num_heads} "
    f"(kv {cfg.num_kv_heads} -> {new.num_kv_heads}), mlp_dim {cfg.mlp_dim} -> {new.mlp_dim}"
  )
  if data is not None and data.tokens is not None and cfg.kind == "decoder":
    pruned, _ = next_token_loss(model, data.tokens, data.batch_size)
    info["calibration_loss"] = {"before": loss_before, "pruned": pruned}
    summary += f"; calibration loss {'' if loss_before is None else f'{loss_before:.4f} -> '}"
    summary += f"{pruned:.4f}"
  if settings["recover_steps"]:
    losses = recover(model, data, settings["recover_steps"], settings["recover_lr"])
    info["recovery"] = {"steps": len(losses), "first_loss": losses[0], "last_loss": losses[-1]}
    if "calibration_loss" in info:
      recovered, _ = next_token_loss(model, data.tokens, data.batch_size)
      info["calibration_loss"]["recovered"] = recovered
      summary += f" -> {recovered:.4f} after {len(losses)} recovery steps"
  info["summary"] = summary
  return [{"path": [], "info": info}]
