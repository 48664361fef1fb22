"""Export a model to a Hugging Face model directory (config.json, safetensors shards, tokenizer).

  export(model, "/tmp/out")                        # family from the model config
  export(model, "/tmp/out", hf_meta=meta["hf"])    # the imported checkpoint's own config fields

Each parameter is gathered from its devices one layer at a time, laid out as the family stores it
(`families.Source` inverted: transposes, head merges, GPT-2's fused q/k/v concatenated) and
written by `weights.save_sharded`, which writes a shard whenever it is full, so the host holds
about one shard. Compressed projections (`compress.layers.CompressedLinear`) are written
dequantised (`dense_weight`); an int8 KV cache is a runtime setting and is dropped; both are
reported in the returned notes. A model no family can represent (another mixer, MoE, ...) is
refused with one line before anything is written.
"""

import json
import os
import pathlib
from typing import Any

import jax
import numpy as np
from flax import nnx

from reslm.hf import families
from reslm.hf.weights import save_sharded

# config.json keys our `hf_config` writes in another layout or that no longer hold.
_REWRITTEN = ("rope_parameters", "rope_scaling", "rope_theta", "torch_dtype", "dtype")
# Compressed kinds that also quantise activations at run time.
_ACTIVATION_QUANT = {"w8a8": "its int8 activations", "llm_int8": "its int8 activations"}
TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def dense_kernel(module) -> jax.Array:
  """A compressed projection's dequantised kernel in the replaced layer's layout (stacked too)."""
  arrays = module.layer_arrays()
  shape = (*module.in_shape, *module.out_shape)
  if not module.lead:
    return module.weight(arrays, module.static(), module.in_features).reshape(shape)
  layers = [
    module.weight({k: v[i] for k, v in arrays.items()}, module.static(), module.in_features)
    for i in range(module.lead[0])
  ]
  return jax.numpy.stack(layers).reshape(*module.lead, *shape)


def dense_params(model) -> tuple[dict, list[str]]:
  """The model's parameters as a pure dict with every compressed projection dequantised.

  Returns:
    (params, notes): the pure dict (the uncompressed model's layout) and one note per change.
  """
  from reslm.compress.layers import CompressedLinear  # Only compressed models need it.

  notes = []
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  for path, module in nnx.iter_graph(model):
    if isinstance(module, CompressedLinear):
      node = params
      for key in path[:-1]:
        node = node.setdefault(key, {})
      entry = {"kernel": dense_kernel(module)}
      if module.bias is not None:
        entry["bias"] = module.bias[...]
      node[path[-1]] = entry
      how = _ACTIVATION_QUANT.get(module.KIND)
      suffix = f" ({how} not kept: HF checkpoints hold weights only)" if how else ""
      notes.append(f"{'/'.join(map(str, path))}: {module.KIND} weights written dequantised{suffix}")
    if getattr(module, "kv_cache_quant", None):
      notes.append(
        f"{'/'.join(map(str, path))}: int8 KV cache dropped (a runtime setting HF configs lack)"
      )
  return params, notes


def _layer(array, i: int | None, dtype) -> np.ndarray:
  part = array if i is None else array[i]
  return np.asarray(jax.device_get(part)).astype(dtype)


def _to_hf(ours: np.ndarray, src: families.Source) -> np.ndarray:
  """Inverts the source's view: our per-layer array -> the (selected part of the) HF tensor."""
  view = np.transpose(ours, np.argsort(src.perm))
  shape = list(src.hf_shape)
  if src.select is not None:
    dim, start, stop = src.select
    shape[dim] = stop - start
  return view.reshape(shape)


def hf_tensors(cfg, params: dict, model_type: str, dtype):
  """(name, array) in checkpoint order: embeddings, layer by layer, then the rest."""
  sources = families.sources_for(model_type, cfg)
  leaves = {
    tuple(getattr(k, "key", getattr(k, "idx", k)) for k in p): v
    for p, v in jax.tree_util.tree_flatten_with_path(params)[0]
  }
  unmapped = sorted(set(leaves) - set(sources), key=str)
  if unmapped:
    raise ValueError(
      f"cannot export parameter {'/'.join(map(str, unmapped[0]))}: no {model_type} tensor holds it"
    )
  by_name: dict[str, list[tuple[tuple, families.Source]]] = {}
  for path, src in sources.items():
    by_name.setdefault(src.name, []).append((path, src))
  flat = [n for n, parts in by_name.items() if not parts[0][1].stacked]
  stacked = [n for n, parts in by_name.items() if parts[0][1].stacked]
  order = [n for n in flat if "embed" in n or ".wte" in n or ".wpe" in n]
  tail = [n for n in flat if n not in order]
  for name in order:
    yield name, _assemble(by_name[name], leaves, None, dtype)
  for i in range(cfg.num_layers):
    for name in stacked:
      yield name.format(i), _assemble(by_name[name], leaves, i, dtype)
  for name in tail:
    yield name, _assemble(by_name[name], leaves, None, dtype)


def _assemble(parts, leaves, layer: int | None, dtype) -> np.ndarray:
  src0 = parts[0][1]
  if src0.select is None:
    (path, src), *rest = parts
    assert not rest, f"{src.name} is the whole tensor of several parameters"
    return _to_hf(_layer(leaves[path], layer, dtype), src)
  out = np.zeros(src0.hf_shape, dtype)
  for path, src in parts:
    dim, start, stop = src.select
    index = [slice(None)] * out.ndim
    index[dim] = slice(start, stop)
    out[tuple(index)] = _to_hf(_layer(leaves[path], layer, dtype), src)
  return out


def hf_config(cfg, model_type: str, original: dict[str, Any] | None = None) -> dict[str, Any]:
  """config.json: the original's fields (token ids, ...) updated with the model's architecture."""
  out = {k: v for k, v in (original or {}).items() if k not in _REWRITTEN}
  out.update(families.hf_config_for(model_type, cfg))
  out["torch_dtype"] = TORCH_DTYPES[cfg.param_dtype]
  return dict(sorted(out.items()))


def export(
  model,
  out_dir: str | os.PathLike,
  *,
  hf_meta: dict[str, Any] | None = None,
  tokenizer_json: str | None = None,
  max_shard_bytes: int = 5 * 2**30,
) -> list[str]:
  """Writes `model` as a Hugging Face model directory.

  Args:
    model: A `DecoderLM` / `EncoderLM` (compressed projections are dequantised).
    out_dir: The directory to write (created; existing weight files are replaced).
    hf_meta: {"model_type", "config"} of the checkpoint the model was imported from, if any: its
      family and config.json fields are kept.
    tokenizer_json: tokenizer.json contents to write next to the weights.
    max_shard_bytes: Largest safetensors shard.

  Returns:
    Notes on what was dequantised or dropped, one line each.

  Raises:
    ValueError: The model has no Hugging Face family (one line, before writing anything).
  """
  cfg = model.cfg
  model_type = (hf_meta or {}).get("model_type") or families.infer_model_type(cfg)
  family = families.family_of(model_type)
  why = family.check(cfg, model_type) if family is families.Bert else family.check(cfg)
  if why is not None:
    raise ValueError(f"this model cannot be written as a {model_type} checkpoint: {why}")
  params, notes = dense_params(model)
  config = hf_config(cfg, model_type, (hf_meta or {}).get("config"))
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  for old in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
    old.unlink()
  dtype = np.dtype(jax.numpy.dtype(cfg.param_dtype))
  save_sharded(hf_tensors(cfg, params, model_type, dtype), out, max_shard_bytes=max_shard_bytes)
  (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
  if tokenizer_json is not None:
    (out / "tokenizer.json").write_text(tokenizer_json)
  return notes
