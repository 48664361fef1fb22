"""The base of every compressed projection: a drop-in for `models.linear.Linear` / `ProjectOut`.

A `CompressedLinear` keeps the interface of the layer it replaces: it contracts the same trailing
input axes (`in_shape`, one axis for a `Linear`, e.g. (heads, head_dim) for a `ProjectOut`),
returns the same `out_shape`, and keeps the original bias (an `nnx.Param`). In between it flattens
the input to [tokens, K] and calls `matmul`, which each subclass defines over its own stored arrays
(packed int4 weights and group scales, low-rank factors, ...).

Storage: the arrays are `Compressed` variables (frozen, not trainable `nnx.Param`s, so an optimizer
never sees int8 arrays) with logical axis names from the replaced kernel: "in" and "out" in a
subclass's `ARRAYS` table stand for the first logical name of the input and of the output axes
(flattening (heads, head_dim) into one axis keeps sharding it by heads). A module inside a
`LayerStack` holds every layer's arrays stacked on a leading `layers` axis, like the kernel it
replaces; its methods only ever see one layer (the stack's scan slices the state).

`models.linear.fused_linear` (q/k/v, gate/up) calls a `CompressedLinear` like any layer that is
not a plain `Linear`, so its own `matmul` runs (int8 x int8 activations for W8A8 and LLM.int8,
the low-bit kernels). `kernel` is still the dequantized weight in the replaced layer's layout,
for code that reads kernels directly.
"""

import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

# Kind name -> CompressedLinear subclass. Manifests store the name, not a Python import path, so a
# checkpoint survives moving or renaming the module that defines the class.
LAYER_KINDS: dict[str, type["CompressedLinear"]] = {}


class Compressed(nnx.Variable):
  """Frozen storage of a compressed layer (quantized codes, scales, factors)."""


class CompressedLinear(nnx.Module):
  """A projection computed from compressed arrays.

  Args:
    arrays: Stored arrays by name (see `ARRAYS`), each with the `lead` stacked axes first.
    in_shape: Trailing input axes contracted away, e.g. (d_model,) or (heads, head_dim).
    out_shape: Output feature shape, e.g. (d_model,) or (heads, head_dim).
    in_axis, out_axis: Logical names standing for "in" / "out" in `ARRAYS`.
    lead: Stacked leading axes (() or (num_groups,)).
    dtype: Compute (output) dtype, as in the replaced layer.
    bias: The replaced layer's bias parameter, or None.
    **static: Subclass settings (`STATIC`), equal for every stacked layer.
  """

  # Array name -> logical axes per dimension ("in"/"out" substituted, None = unsharded).
  ARRAYS: ClassVar[dict[str, tuple[str | None, ...]]] = {}
  # Arrays a layer may omit (e.g. an input scale only some methods use).
  OPTIONAL: ClassVar[frozenset[str]] = frozenset()
  # Subclass constructor settings (JSON-able), with defaults.
  STATIC: ClassVar[dict[str, Any]] = {}
  # Registered name of each concrete subclass, as stored in checkpoint manifests (`spec()["kind"]`).
  KIND: ClassVar[str] = ""

  def __init_subclass__(cls, *, kind: str, **kwargs):
    super().__init_subclass__(**kwargs)
    if kind in LAYER_KINDS:
      raise ValueError(
        f"compressed layer kind {kind!r} is already registered by {LAYER_KINDS[kind]}"
      )
    cls.KIND = kind
    LAYER_KINDS[kind] = cls

  def __init__(
    self,
    arrays: dict[str, jax.Array],
    *,
    in_shape,
    out_shape,
    in_axis: str | None = None,
    out_axis: str | None = None,
    lead: tuple[int, ...] = (),
    dtype=jnp.float32,
    bias: nnx.Param | None = None,
    **static,
  ):
    unknown = set(static) - set(self.STATIC)
    if unknown:
      raise ValueError(f"{type(self).__name__} has no setting {sorted(unknown)[0]!r}")
    missing = set(self.ARRAYS) - set(arrays) - self.OPTIONAL
    extra = set(arrays) - set(self.ARRAYS)
    if missing or extra:
      raise ValueError(
        f"{type(self).__name__} needs arrays {sorted(self.ARRAYS)}; missing {sorted(missing)}, "
        f"unexpected {sorted(extra)}"
      )
    self.in_shape = tuple(in_shape)
    self.out_shape = tuple(out_shape)
    self.in_axis, self.out_axis = in_axis, out_axis
    self.lead = tuple(lead)
    self.dtype = jnp.dtype(dtype)
    for key, default in self.STATIC.items():
      setattr(self, key, static.get(key, default))
    names = {"in": in_axis, "out": out_axis}
    self.array_names = tuple(name for name in self.ARRAYS if name in arrays)
    for name in self.array_names:
      axes = ("layers",) * len(self.lead) + tuple(names.get(a, a) for a in self.ARRAYS[name])
      value = jnp.asarray(arrays[name])
      if value.ndim != len(axes):
        raise ValueError(
          f"{type(self).__name__}.{name} has shape {value.shape}; expected {len(axes)} axes"
        )
      setattr(self, name, Compressed(value, out_sharding=axes, eager_sharding=False))
    self.bias = bias

  # ---- what subclasses define -------------------------------------------------------------

  def matmul(self, x_mk: jax.Array) -> jax.Array:
    """x [tokens, K] -> [tokens, N] in `self.dtype`, from the stored arrays of one layer."""
    raise NotImplementedError

  @classmethod
  def weight(cls, arrays: dict[str, jax.Array], static: dict[str, Any], k: int) -> jax.Array:
    """The float32 weight [K, N] one layer's arrays stand for (what a weight-only layer uses)."""
    raise NotImplementedError

  # ---- shared -------------------------------------------------------------------------------

  @property
  def in_features(self) -> int:
    return math.prod(self.in_shape)

  @property
  def out_features(self) -> int:
    return math.prod(self.out_shape)

  def layer_arrays(self) -> dict[str, jax.Array]:
    return {name: getattr(self, name)[...] for name in self.array_names}

  def static(self) -> dict[str, Any]:
    return {key: getattr(self, key) for key in self.STATIC}

  def dense_weight(self) -> jax.Array:
    """float32 [K, N] of this (unstacked) layer."""
    return self.weight(self.layer_arrays(), self.static(), self.in_features)

  @property
  def kernel(self) -> jax.Array:
    """The dequantized kernel in the replaced layer's layout, for `fused_linear`."""
    return self.dense_weight().reshape(*self.in_shape, *self.out_shape)

  def __call__(self, x: jax.Array) -> jax.Array:
    lead = x.shape[: x.ndim - len(self.in_shape)]
    y = self.matmul(x.reshape(-1, self.in_features))  # [tokens, N]
    y = y.astype(self.dtype).reshape(*lead, *self.out_shape)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y

  def spec(self) -> dict[str, Any]:
    """JSON description to rebuild this module's structure (checkpoint manifest)."""
    return {
      "kind": self.KIND,
      "in_shape": list(self.in_shape),
      "out_shape": list(self.out_shape),
      "in_axis": self.in_axis,
      "out_axis": self.out_axis,
      "lead": list(self.lead),
      "dtype": self.dtype.name,
      "static": self.static(),
      "arrays": {name: _shape_dtype(getattr(self, name)) for name in self.array_names},
      "bias": None if self.bias is None else _shape_dtype(self.bias),
    }


def _shape_dtype(var: nnx.Variable) -> dict[str, Any]:
  value = var.get_value()  # An array, or a ShapeDtypeStruct in an abstract model.
  return {"shape": list(value.shape), "dtype": jnp.dtype(value.dtype).name}
