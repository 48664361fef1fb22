"""The model section of an experiment config: a typed, validated, frozen description.

Experiment files build an `ml_collections.ConfigDict` (so absl flags can override any field);
`ModelConfig.from_config_dict` turns it into this dataclass and checks every setting before anything
is built or compiled, raising one-line `ValueError`s that name the setting and what is allowed.
"""

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import ml_collections

from reslm.models.embeddings import RopeScaling
from reslm.models.registry import MIXERS, MLPS, NORMS, freeze_options, thaw_options

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
KINDS = ("decoder", "encoder")
POSITIONS = ("rope", "learned", "none")
ROPE_SCALINGS = ("none", "linear", "llama3")
ATTENTION_BIASES = ("none", "qkv", "all")
NORM_POSITIONS = ("pre", "post")
ACTIVATIONS = ("auto", "silu", "gelu", "gelu_tanh", "relu")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "everything")


def get_default_config() -> ml_collections.ConfigDict:
  """Defaults for the `model` section (a small decoder LM)."""
  return ml_collections.ConfigDict(
    dict(
      kind="decoder",
      vocab_size=0,  # 0: take it from the data (tokenizer or task).
      d_model=128,
      num_layers=4,
      num_heads=4,
      num_kv_heads=0,  # 0: same as num_heads (plain multi-head attention).
      head_dim=0,  # 0: d_model // num_heads.
      mlp_dim=0,  # 0: 4 * d_model for gelu, the same parameter count (8/3 * d_model) for swiglu.
      mixer="dense",  # One name, or a comma-separated repeating pattern ("mamba,mamba,dense").
      mixer_options={},  # Flat keys, or per mixer: {"mamba": {...}, "flash": {...}}.
      mlp="swiglu",
      mlp_options={},  # Flat keys, or per MLP name.
      mlp_activation="auto",  # auto (silu for swiglu, gelu_tanh for gelu) | silu | gelu | ...
      mlp_bias=False,  # Biases on SwiGLU's gate/up/down (Llama's mlp_bias); gelu always has them.
      attention_bias="none",  # none | qkv (Qwen2) | all (q, k, v and o: GPT-2, BERT)
      norm="rmsnorm",
      norm_eps=1e-6,
      norm_position="pre",  # pre: x + f(norm(x)), final norm; post: norm(x + f(x)) (BERT)
      embed_norm=False,  # A norm right after the embeddings (BERT).
      position="rope",  # rope | learned (a table, GPT-2 / BERT) | none
      position_offset=0,  # learned: position p reads row p + offset (RoBERTa: 2).
      rope_theta=10_000.0,
      rope_scaling="none",  # none | linear | llama3 (Llama 3.1's frequency-dependent scaling)
      rope_scaling_factor=1.0,  # linear, llama3: how much longer the context becomes
      rope_low_freq_factor=1.0,  # llama3
      rope_high_freq_factor=4.0,  # llama3
      rope_original_max_len=8192,  # llama3: the context length the model was trained at
      type_vocab_size=0,  # Token-type (segment) embeddings (BERT: 2); 0 = none.
      pooler=False,  # encoder: BERT's pooler, tanh(dense(first token's hidden state)).
      max_seq_len=2048,
      tie_embeddings=True,
      init_std=0.02,
      dtype="float32",
      param_dtype="float32",
      scan_layers=True,
      remat="none",
    )
  )


def _divisors(n: int) -> str:
  return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """See `get_default_config` for the meaning of each field."""

  kind: str = "decoder"
  vocab_size: int = 256
  d_model: int = 128
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 0
  head_dim: int = 0
  mlp_dim: int = 0
  mixer: str = "dense"
  mixer_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  mlp: str = "swiglu"
  mlp_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  mlp_activation: str = "auto"
  mlp_bias: bool = False
  attention_bias: str = "none"
  norm: str = "rmsnorm"
  norm_eps: float = 1e-6
  norm_position: str = "pre"
  embed_norm: bool = False
  position: str = "rope"
  position_offset: int = 0
  rope_theta: float = 10_000.0
  rope_scaling: str = "none"
  rope_scaling_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  type_vocab_size: int = 0
  pooler: bool = False
  max_seq_len: int = 2048
  tie_embeddings: bool = True
  init_std: float = 0.02
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = True
  remat: str = "none"

  def __post_init__(self):
    # Defaults that depend on other fields are resolved once, here.
    if self.num_kv_heads == 0:
      object.__setattr__(self, "num_kv_heads", self.num_heads)
    if self.mlp_dim == 0:
      hidden = 4 * self.d_model if self.mlp == "gelu" else int(8 * self.d_model / 3)
      object.__setattr__(self, "mlp_dim", hidden)
    # Stored as sorted (key, value) pairs so the config (and graphs holding it) stay hashable.
    for name in ("mixer_options", "mlp_options"):
      object.__setattr__(self, name, freeze_options(getattr(self, name)))
    self.validate()

  @classmethod
  def from_config_dict(cls, cfg: ml_collections.ConfigDict | Mapping[str, Any]) -> "ModelConfig":
    d = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(
        f"model.{unknown[0]} is not a model setting; known: {', '.join(sorted(known))}"
      )
    return cls(**d)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["mixer_options"] = thaw_options(self.mixer_options)
    d["mlp_options"] = thaw_options(self.mlp_options)
    return d

  # Derived values.
  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @property
  def mixer_pattern(self) -> tuple[str, ...]:
    return tuple(name.strip() for name in self.mixer.split(","))

  @property
  def mlp_pattern(self) -> tuple[str, ...]:
    """The MLPs of consecutive blocks, repeating; (mlp,) unless the MLP's builder defines
    `layer_pattern(cfg)` (e.g. MoE every k-th block, dense MLPs between)."""
    pattern = getattr(MLPS.get(self.mlp), "layer_pattern", None)
    return tuple(pattern(self)) if pattern is not None else (self.mlp,)

  @property
  def group_size(self) -> int:
    """Blocks per scanned group: the mixer and MLP patterns both repeat a whole number of times."""
    return math.lcm(len(self.mixer_pattern), len(self.mlp_pattern))

  @property
  def position_rows(self) -> int:
    """Rows of the learned position table: max_seq_len positions after position_offset."""
    return self.max_seq_len + self.position_offset

  @property
  def rope_scaling_spec(self) -> RopeScaling | None:
    """The RoPE frequency scaling the attention layers apply, or None."""
    if self.position != "rope" or self.rope_scaling == "none":
      return None
    return RopeScaling(
      self.rope_scaling,
      float(self.rope_scaling_factor),
      float(self.rope_low_freq_factor),
      float(self.rope_high_freq_factor),
      int(self.rope_original_max_len),
    )

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def storage_dtype(self):
    return DTYPES[self.param_dtype]

  @property
  def out_init_std(self) -> float:
    """GPT-2's scaled init for projections that write into the residual stream."""
    return self.init_std / math.sqrt(2 * self.num_layers)

  def validate(self) -> None:
    """Checks every field; raises a one-line ValueError naming the first bad setting."""
    if self.kind not in KINDS:
      raise ValueError(f"model.kind={self.kind!r} is not known; choose one of: {', '.join(KINDS)}")
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "max_seq_len", "mlp_dim"):
      if getattr(self, name) <= 0:
        raise ValueError(f"model.{name}={getattr(self, name)} must be a positive integer")
    if self.head_dim < 0:
      raise ValueError(f"model.head_dim={self.head_dim} must be >= 0 (0 = d_model // num_heads)")
    if self.head_dim == 0 and self.d_model % self.num_heads:
      raise ValueError(
        f"model.num_heads={self.num_heads} does not divide model.d_model={self.d_model}; "
        f"choose one of: {_divisors(self.d_model)} (or set model.head_dim)"
      )
    if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"model.num_kv_heads={self.num_kv_heads} does not divide model.num_heads={self.num_heads}; "
        f"choose one of: {_divisors(self.num_heads)}"
      )
    if self.position == "rope" and self.resolved_head_dim % 2:
      raise ValueError(f"RoPE needs an even head dimension; got {self.resolved_head_dim}")
    for name in self.mixer_pattern:
      MIXERS.check(name)
    MLPS.check(self.mlp)
    NORMS.check(self.norm)
    if self.num_layers % len(self.mixer_pattern):
      raise ValueError(
        f"model.num_layers={self.num_layers} is not a multiple of the mixer pattern length "
        f"{len(self.mixer_pattern)} (model.mixer={self.mixer!r})"
      )
    for name in self.mlp_pattern:
      MLPS.check(name)
    if self.num_layers % self.group_size:
      raise ValueError(
        f"model.num_layers={self.num_layers} is not a multiple of the block group length "
        f"{self.group_size} = lcm(mixer pattern {len(self.mixer_pattern)}, "
        f"MLP pattern {len(self.mlp_pattern)} = {','.join(self.mlp_pattern)})"
      )
    if self.position not in POSITIONS:
      raise ValueError(
        f"model.position={self.position!r} is not known; choose one of: {', '.join(POSITIONS)}"
      )
    self._validate_architecture()
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(
          f"model.{name}={getattr(self, name)!r} is not known; choose one of: {', '.join(DTYPES)}"
        )
    if self.remat not in REMAT_POLICIES:
      raise ValueError(
        f"model.remat={self.remat!r} is not a known remat policy; choose one of: "
        + ", ".join(REMAT_POLICIES)
      )

  def _validate_architecture(self) -> None:
    """The settings that describe pretrained architectures (positions, biases, norms, heads)."""
    for name, allowed in (
      ("rope_scaling", ROPE_SCALINGS),
      ("attention_bias", ATTENTION_BIASES),
      ("norm_position", NORM_POSITIONS),
      ("mlp_activation", ACTIVATIONS),
    ):
      if getattr(self, name) not in allowed:
        raise ValueError(
          f"model.{name}={getattr(self, name)!r} is not known; choose one of: {', '.join(allowed)}"
        )
    for name in ("mlp_bias", "embed_norm", "pooler"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"model.{name}={getattr(self, name)!r} must be True or False")
    for name in ("position_offset", "type_vocab_size"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"model.{name}={value!r} must be an integer >= 0")
    if self.position_offset and self.position != "learned":
      raise ValueError(
        f"model.position_offset={self.position_offset} needs model.position='learned' "
        f"(got {self.position!r})"
      )
    if self.rope_scaling != "none":
      if self.position != "rope":
        raise ValueError(
          f"model.rope_scaling={self.rope_scaling!r} needs model.position='rope' "
          f"(got {self.position!r})"
        )
      if not self.rope_scaling_factor > 0:
        raise ValueError(f"model.rope_scaling_factor={self.rope_scaling_factor} must be > 0")
    if self.rope_scaling == "llama3":
      if not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
        raise ValueError(
          f"model.rope_low_freq_factor={self.rope_low_freq_factor} and model."
          f"rope_high_freq_factor={self.rope_high_freq_factor} must satisfy 0 < low < high"
        )
      if self.rope_original_max_len <= 0:
        raise ValueError(
          f"model.rope_original_max_len={self.rope_original_max_len} must be a positive integer"
        )
    if self.pooler and self.kind != "encoder":
      raise ValueError("model.pooler=True needs model.kind='encoder' (BERT's pooler)")
    if self.mlp_activation != "auto" and any(m not in ("swiglu", "gelu") for m in self.mlp_pattern):
      raise ValueError(
        f"model.mlp_activation={self.mlp_activation!r} applies to the swiglu and gelu MLPs only; "
        f"model.mlp={self.mlp!r} (keep 'auto')"
      )
    if self.mlp_bias and any(m != "swiglu" for m in self.mlp_pattern):
      raise ValueError(
        f"model.mlp_bias=True applies to the swiglu MLP (the gelu MLP always has biases); "
        f"model.mlp={self.mlp!r}"
      )
