"""Calibration data: a fixed, deterministic set of sequences and the inputs each projection sees.

Sequences come from the training split of any `data` config (by default the trained run's own):
the rows of `train_batch(first_step)`, `train_batch(first_step + 1)`, ... until `num_sequences`
are collected. Batches are a pure function of (data.seed, step), so the set is the same on every
run.

Capture: each selected projection is temporarily replaced by a `_Recorder` that hands its input
to the host with an ordered `io_callback` and then calls the original layer (module surgery; the
model's code is untouched), and the model runs forward inside `unfused_projections()` so fused
q/k/v and gate/up projections call their layers. Inside a `LayerStack` a recorder runs once per
scanned group, in order, so the k-th call of a forward pass is stacked layer k. The recorders are
removed afterwards (also on error). Inputs are kept as float32 on the host, at most `max_tokens`
evenly spaced token rows per layer.
"""

import functools
import math
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import io_callback

from reslm import data as data_lib
from reslm.compress.intercept import unfused_projections
from reslm.compress.targets import Target, set_module


def get_default_config() -> ml_collections.ConfigDict:
  """The `calibration` section of a compress config."""
  cfg = ml_collections.ConfigDict()
  cfg.num_sequences = 32
  cfg.seq_len = 0  # 0 = the data config's seq_len
  cfg.first_step = 0  # first train_batch index the sequences are taken from
  cfg.batch_size = 8  # sequences per forward pass while capturing
  cfg.max_tokens = 4096  # token rows kept per layer (0 = all)
  cfg.data = ml_collections.ConfigDict()  # overrides of the run's `data` section
  return cfg


def validate_config(cfg: ml_collections.ConfigDict, where: str = "calibration") -> None:
  """One-line ValueError for the first bad calibration setting."""
  for name, low in (("num_sequences", 1), ("batch_size", 1), ("seq_len", 0), ("first_step", 0)):
    value = cfg[name]
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
      raise ValueError(f"{where}.{name}={value!r} must be an integer >= {low}")
  if not isinstance(cfg.max_tokens, int) or cfg.max_tokens < 0:
    raise ValueError(f"{where}.max_tokens={cfg.max_tokens!r} must be an integer >= 0 (0 = all)")


def calibration_tokens(
  data_cfg: ml_collections.ConfigDict,
  *,
  num_sequences: int,
  seq_len: int = 0,
  first_step: int = 0,
  overrides=None,
) -> np.ndarray:
  """`num_sequences` training sequences, int32 [num_sequences, seq_len], deterministic.

  Args:
    data_cfg: A `data` config section (see `data.get_default_config`).
    num_sequences: How many sequences.
    seq_len: Tokens per sequence (0 = data_cfg.seq_len).
    first_step: The first `train_batch` index used.
    overrides: Optional mapping of `data` settings to change (e.g. another corpus).
  """
  cfg = ml_collections.ConfigDict(data_cfg.to_dict())
  cfg.update(dict(overrides or {}))
  if seq_len:
    cfg.seq_len = seq_len
  dataset = data_lib.build_dataset(cfg)
  rows, step = [], first_step
  while sum(len(r) for r in rows) < num_sequences:
    rows.append(dataset.train_batch(step)["inputs"])
    step += 1
  return np.concatenate(rows)[:num_sequences].astype(np.int32)


# Target name -> inputs recorded so far (one array per call), while a capture runs.
_CAPTURED: dict[str, list[np.ndarray]] = {}


def _record(key: str, x) -> None:
  _CAPTURED[key].append(np.asarray(x, np.float32))


class _Recorder(nnx.Module):
  """Calls `inner` after sending its input to the host under `key`."""

  def __init__(self, inner: nnx.Module, key: str):
    self.inner = inner
    self.key = key

  def __call__(self, x):
    io_callback(functools.partial(_record, self.key), None, x, ordered=True)
    return self.inner(x)


def capture_inputs(
  model: nnx.Module,
  targets: Sequence[Target],
  tokens_nt: np.ndarray,
  *,
  batch_size: int = 8,
  max_tokens: int = 0,
) -> dict[str, np.ndarray]:
  """The inputs of each target projection on `tokens`, per stacked layer.

  Args:
    model: A language model (called as `model(tokens).logits`); restored before returning.
    targets: Projections (`compress.targets.Target`, kind "linear") to record.
    tokens_nt: int32 [sequences, seq_len].
    batch_size: Sequences per forward pass.
    max_tokens: Keep at most this many evenly spaced token rows per layer (0 = all).

  Returns:
    Target name -> float32 [slices, tokens, K] (slices = stacked layers, 1 if not stacked).
  """
  targets = [t for t in targets if t.kind == "linear"]
  for t in targets:
    _CAPTURED[t.name] = []
    set_module(model, t.path, _Recorder(t.module, t.name))
  try:
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, tok: nnx.merge(graphdef, s)(tok).logits)
    batches = [tokens_nt[i : i + batch_size] for i in range(0, len(tokens_nt), batch_size)]
    with unfused_projections():
      for batch in batches:
        jax.block_until_ready(forward(state, batch))
    jax.effects_barrier()
  finally:
    for t in targets:
      set_module(model, t.path, t.module)
    store = {t.name: _CAPTURED.pop(t.name) for t in targets}
  out = {}
  for t in targets:
    calls = store[t.name]
    slices = t.num_slices
    if len(calls) != slices * len(batches):
      raise RuntimeError(
        f"calibration: {t.name} ran {len(calls)} times for {len(batches)} batches of a "
        f"{slices}-layer stack; it must run once per layer"
      )
    k = math.prod(t.in_shape)
    per_slice = [
      np.concatenate([calls[b * slices + s].reshape(-1, k) for b in range(len(batches))])
      for s in range(slices)
    ]
    x = np.stack(per_slice)  # [slices, tokens, K]
    if max_tokens and x.shape[1] > max_tokens:
      x = x[:, np.linspace(0, x.shape[1] - 1, max_tokens).round().astype(int)]
    out[t.name] = x
  return out
