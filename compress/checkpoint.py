"""Compressed checkpoints: the compressed model's state plus a manifest to rebuild its structure.

Layout under the output directory (the `training.checkpoint.Checkpointer` layout):
  checkpoints/<step>/state   every variable of the compressed model (Orbax; int8 codes stay int8)
  checkpoints/<step>/meta    JSON: the model config, the tokenizer, and under "compress" the
                             manifest, the rules and where the model came from

Manifest entries, applied in order to a freshly built (abstract) model of the same config:
  {"path": [...], "module": CompressedLinear.spec()}   install that compressed projection
  {"path": [...], "attribute": name, "value": v}       set a static attribute (e.g. kv_cache_quant)
  {"path": [...], "info": {...}}                        a record only (e.g. which units structured
                                                        pruning removed); nothing to rebuild
Weights changed in place (pruning) need no entry: the state carries them. Shapes changed with the
model config (structured pruning) need none either: meta["model"] is the compressed model's config.

The output directory is a `COMPRESSED` one (`training.ownership`): `save_compressed` refuses a
directory holding anything else (a training run, say), since it keeps only the newest step.
"""

import json
import os
from typing import Any

import jax.numpy as jnp
from flax import nnx

from reslm.compress import lowrank as _lowrank  # noqa: F401  (registers the low-rank layer kinds)
from reslm.compress.layers import LAYER_KINDS, CompressedLinear
from reslm.compress.quantize import layers as _quantized  # noqa: F401  (registers the quantized kinds)
from reslm.compress.targets import get_module, set_module
from reslm.models import ModelConfig, build_model
from reslm.training import ownership
from reslm.training.checkpoint import Checkpointer
from reslm.training.runs import TRAIN_RUN


def _same_source(path: str, key) -> bool:
  """An unmarked output (from before markers) is adopted only with its report, and only by the
  same compression (source run, rules, order) when `key` says which."""
  try:
    with open(os.path.join(path, "report.json")) as f:
      report = json.load(f)
  except (OSError, ValueError):
    return False
  if key is None:
    return True
  source = report.get("source", {})
  return (
    source.get("workdir") == key.get("source")
    and source.get("best") == key.get("best")
    and report.get("rules") == key.get("rules")
    and report.get("order") == key.get("order")
  )


COMPRESSED = ownership.Kind(
  command="experiments.compress",
  what="a compressed model",
  outputs=("checkpoints/", "report.json"),
  recognize=_same_source,
)


def _class(spec: dict[str, Any]) -> type[CompressedLinear]:
  kind = spec.get("kind")
  if kind is None and "class" in spec:  # Manifests written before layer kinds were registered.
    by_qualname = {cls.__qualname__: k for k, cls in LAYER_KINDS.items()}
    kind = by_qualname.get(spec["class"].rpartition(".")[2], spec["class"])
  if kind not in LAYER_KINDS:
    raise ValueError(
      f"compressed checkpoint names an unknown layer kind {kind!r}; known: {', '.join(sorted(LAYER_KINDS))}"
    )
  return LAYER_KINDS[kind]


def build_from_spec(spec: dict[str, Any], bias) -> CompressedLinear:
  """A compressed projection with zero arrays of the spec's shapes (to restore into)."""
  arrays = {
    name: jnp.zeros(a["shape"], jnp.dtype(a["dtype"])) for name, a in spec["arrays"].items()
  }
  return _class(spec)(
    arrays,
    in_shape=spec["in_shape"],
    out_shape=spec["out_shape"],
    in_axis=spec["in_axis"],
    out_axis=spec["out_axis"],
    lead=tuple(spec["lead"]),
    dtype=jnp.dtype(spec["dtype"]),
    bias=bias,
    **spec["static"],
  )


def apply_manifest(model: nnx.Module, manifest: list[dict[str, Any]]) -> nnx.Module:
  """Rebuilds the compressed structure on a model of the original config (in place)."""
  for entry in manifest:
    path = tuple(entry["path"])
    if "info" in entry:
      continue
    if "module" in entry:
      bias = getattr(get_module(model, path), "bias", None)
      set_module(model, path, build_from_spec(entry["module"], bias))
    else:
      setattr(get_module(model, path), entry["attribute"], entry["value"])
  return model


def save_compressed(out_dir: str, model: nnx.Module, meta: dict[str, Any], *, step: int) -> str:
  """Writes `model`'s whole state and `meta` (which must hold "model" and "compress")."""
  if "model" not in meta or "manifest" not in meta.get("compress", {}):
    raise ValueError("compressed checkpoint meta needs 'model' and 'compress.manifest'")
  ownership.check(out_dir, COMPRESSED, flag="out_dir", others=(TRAIN_RUN,))
  ckpt = Checkpointer(out_dir, keep=1, keep_best=False, async_save=False)
  ckpt.save(step, nnx.to_pure_dict(nnx.state(model)), meta)
  ckpt.wait()
  ckpt.close()
  return os.path.join(os.path.abspath(out_dir), "checkpoints", str(step))


def load_compressed(out_dir: str) -> tuple[nnx.Module, dict[str, Any]]:
  """Rebuilds and restores a compressed model written by `save_compressed`.

  Returns:
    (model, meta).

  Raises:
    ValueError: No compressed checkpoint in `out_dir`, or unreadable files.
  """
  ckpt = Checkpointer(out_dir, keep_best=False, read_only=True)
  graphdef = None

  def target(meta):
    nonlocal graphdef
    if "compress" not in meta:
      raise ValueError(f"{out_dir} holds a checkpoint without a compression manifest")
    cfg = ModelConfig.from_config_dict(meta["model"])
    manifest = meta["compress"]["manifest"]
    abstract = nnx.eval_shape(lambda: apply_manifest(build_model(cfg), manifest))
    graphdef, state = nnx.split(abstract)
    return nnx.to_pure_dict(state)

  try:
    restored, meta, _ = ckpt.restore(target)
  finally:
    ckpt.close()
  return nnx.merge(graphdef, restored), meta
