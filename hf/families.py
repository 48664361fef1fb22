"""Hugging Face model families: config.json <-> `ModelConfig`, tensor names <-> parameter paths.

A family knows three things about its checkpoints:
  settings   config.json -> the `model.*` settings that reproduce the architecture (one-line
             ValueError for anything the model cannot honour: an unsupported rope scaling, cross
             attention, per-layer attention types, ...), and back (`hf_config`) for export;
  sources    for each of our parameters, which tensor holds it and how it is laid out there
             (`Source`: transposes, head splits, GPT-2's fused q/k/v), per layer into the stacked
             [layers, ...] arrays; `reader.py` reads device shards through it, `export.py`
             inverts it;
  leftovers  tensors a checkpoint may hold that the model does not use (buffers such as
             `rotary_emb.inv_freq`, a tied `lm_head.weight`, BERT's next-sentence head).

Families (`model_type`): llama (Llama 2/3, SmolLM, TinyLlama), mistral (sliding window), qwen2
(q/k/v biases): decoder, pre-norm RMSNorm, RoPE (+ linear / Llama-3 scaling), SwiGLU; gpt2:
learned positions, pre-norm LayerNorm, biased projections stored as transposed `Conv1D`s with q/k/v
fused, gelu_new, tied head; bert, roberta (MiniLM is a bert): post-norm encoder, learned positions
(RoBERTa's offset by pad_token_id + 1), token types, embedding LayerNorm, exact gelu, masked-LM
head tied to the embeddings, pooler.

Deviations (also in README): RoBERTa numbers positions pad_token_id + 1 + i for the i-th token of
a row; HF skips pad tokens when counting (identical for right-padded rows, which is what the data
pipeline makes). A checkpoint without a masked-LM head (a bare `BertModel`) gets a freshly
initialised head (N(0, initializer_range), as `transformers` does), named in a warning.
"""

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

from reslm.models.config import ModelConfig

Path = tuple  # A parameter's path in the model's pure-dict state, e.g. ("embed", "embedding").
BLOCK = ("layers", "groups", "blocks", 0)  # One block per group: every layer is in blocks/0.


@dataclasses.dataclass(frozen=True)
class Source:
  """Where one parameter (one layer of it, when stacked) lives in a checkpoint.

  Our per-layer array = the HF tensor, restricted to `select` (dim, start, stop) if given,
  reshaped to `view`, transposed by `perm`.

  Attributes:
    name: The canonical HF tensor name; "{}" is the layer index when `stacked`.
    hf_shape: The HF tensor's full shape.
    view: The selected part reshaped (our axes, before the transpose).
    perm: Our axis j is view axis perm[j].
    select: Optional (HF dim, start, stop): the part of a fused tensor (GPT-2's q/k/v).
    stacked: Our array has a leading layers axis, layer l from name.format(l).
    init: For optional tensors (a head the checkpoint may lack): "normal", "ones" or "zeros".
  """

  name: str
  hf_shape: tuple[int, ...]
  view: tuple[int, ...]
  perm: tuple[int, ...]
  select: tuple[int, int, int] | None = None
  stacked: bool = False
  init: str | None = None

  def names(self, num_layers: int) -> list[str]:
    return [self.name.format(i) for i in range(num_layers)] if self.stacked else [self.name]


def _same(name: str, shape, **kw) -> Source:
  shape = tuple(shape)
  return Source(name, shape, shape, tuple(range(len(shape))), **kw)


def _linear(name: str, n_in: int, n_out, **kw) -> Source:
  """torch `nn.Linear` weight [out, in] -> our kernel [in, *out]; n_out may be (heads, dim)."""
  out = (n_out,) if isinstance(n_out, int) else tuple(n_out)
  return Source(name, (math.prod(out), n_in), (*out, n_in), (len(out), *range(len(out))), **kw)


def _linear_out(name: str, n_in: tuple[int, int], n_out: int, **kw) -> Source:
  """`nn.Linear` weight [out, heads * dim] -> our `ProjectOut` kernel [heads, dim, out]."""
  return Source(name, (n_out, math.prod(n_in)), (n_out, *n_in), (1, 2, 0), **kw)


def _heads(name: str, shape: tuple[int, int], **kw) -> Source:
  """A bias [heads * dim] -> [heads, dim]."""
  return Source(name, (math.prod(shape),), tuple(shape), (0, 1), **kw)


def _norm(sources: dict, path: Path, prefix: str, cfg: ModelConfig, *, bias: bool, **kw) -> None:
  sources[(*path, "scale")] = _same(f"{prefix}.weight", (cfg.d_model,), **kw)
  if bias:
    sources[(*path, "bias")] = _same(f"{prefix}.bias", (cfg.d_model,), **kw)


def _setting(hf: Mapping[str, Any], key: str, default=None, *, required: bool = True):
  value = hf.get(key, default)
  if value is None and required:
    raise ValueError(f"config.json has no {key!r}, which this model_type needs")
  return value


def _activation(hf: Mapping[str, Any], key: str, allowed: Mapping[str, str]) -> str:
  act = hf.get(key)
  if act not in allowed:
    raise ValueError(
      f"config.json {key}={act!r} is not supported; supported: {', '.join(sorted(allowed))}"
    )
  return allowed[act]


def _refuse(hf: Mapping[str, Any], key: str, ok: Callable[[Any], bool], why: str) -> None:
  if key in hf and not ok(hf[key]):
    raise ValueError(f"config.json {key}={hf[key]!r} cannot be honoured: {why}")


# ---------------------------------------------------------------------------------------------
# Llama family: llama, mistral, qwen2
# ---------------------------------------------------------------------------------------------

ROPE_TYPES = ("default", "linear", "llama3")
_SILU = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh"}


def rope_settings(hf: Mapping[str, Any]) -> dict[str, Any]:
  """RoPE settings from either layout: transformers 5's `rope_parameters` or the older
  `rope_theta` + `rope_scaling` (whose type key is "rope_type", or "type" before that)."""
  params = dict(hf.get("rope_parameters") or {})
  legacy = dict(hf.get("rope_scaling") or {})
  theta = params.get("rope_theta", hf.get("rope_theta", 10_000.0))
  scaling = params if params.get("rope_type", "default") != "default" else legacy
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind not in ROPE_TYPES:
    raise ValueError(
      f"config.json rope scaling type {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
    )
  partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if partial != 1.0:
    raise ValueError(
      f"config.json partial_rotary_factor={partial} is not supported (RoPE on the whole head only)"
    )
  out: dict[str, Any] = {"rope_theta": float(theta)}
  if kind == "default":
    return out
  out.update(rope_scaling=kind, rope_scaling_factor=float(scaling["factor"]))
  if kind == "llama3":
    out.update(
      rope_low_freq_factor=float(scaling["low_freq_factor"]),
      rope_high_freq_factor=float(scaling["high_freq_factor"]),
      rope_original_max_len=int(scaling["original_max_position_embeddings"]),
    )
  return out


def _attention_layers(hf: Mapping[str, Any], model_type: str) -> dict[str, Any]:
  """dense, or Mistral's / Qwen2's sliding window when every layer uses it."""
  window = hf.get("sliding_window")
  if model_type == "qwen2" and not hf.get("use_sliding_window", False):
    window = None
  types = set(hf.get("layer_types") or [])
  if model_type == "qwen2" and window is not None:
    first = hf.get("max_window_layers", 0)
    if 0 < first < hf["num_hidden_layers"]:
      raise ValueError(
        f"config.json max_window_layers={first} mixes full and sliding-window layers, which "
        "is not supported (one attention type for every layer)"
      )
  if len(types) > 1:
    raise ValueError(
      f"config.json layer_types mixes {sorted(types)}, which is not supported (one attention "
      "type for every layer)"
    )
  if types == {"full_attention"}:
    window = None
  if window is None:
    return {"mixer": "dense"}
  return {"mixer": "sliding_window", "mixer_options": {"window": int(window)}}


class Llama:
  """Llama 2/3, SmolLM / TinyLlama (model_type llama), Mistral, Qwen2."""

  model_types = ("llama", "mistral", "qwen2")
  base = "model."  # The base model's prefix in *ForCausalLM checkpoints.
  # Buffers older checkpoints hold; never parameters.
  buffers = ("rotary_emb.inv_freq",)

  @staticmethod
  def settings(hf: Mapping[str, Any], keys: frozenset[str]) -> dict[str, Any]:
    del keys
    model_type = hf["model_type"]
    d = _setting(hf, "hidden_size")
    heads = _setting(hf, "num_attention_heads")
    bias = {"llama": "all" if hf.get("attention_bias") else "none", "qwen2": "qkv"}
    return dict(
      kind="decoder",
      vocab_size=_setting(hf, "vocab_size"),
      d_model=d,
      num_layers=_setting(hf, "num_hidden_layers"),
      num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or d // heads,
      mlp_dim=_setting(hf, "intermediate_size"),
      mlp="swiglu",
      mlp_activation=_activation(hf, "hidden_act", _SILU),
      mlp_bias=bool(hf.get("mlp_bias", False)),
      attention_bias=bias.get(model_type, "none"),
      norm="rmsnorm",
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      position="rope",
      max_seq_len=_setting(hf, "max_position_embeddings"),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      **rope_settings(hf),
      **_attention_layers(hf, model_type),
    )

  @staticmethod
  def sources(cfg: ModelConfig) -> dict[Path, Source]:
    d, h, g, hd, f = (
      cfg.d_model,
      cfg.num_heads,
      cfg.num_kv_heads,
      cfg.resolved_head_dim,
      cfg.mlp_dim,
    )
    layer = "model.layers.{}."
    kw = {"stacked": True}
    s: dict[Path, Source] = {
      ("embed", "embedding"): _same("model.embed_tokens.weight", (cfg.vocab_size, d))
    }
    attn, mlp = (*BLOCK, "mixer"), (*BLOCK, "mlp")
    for name, n in (("q", h), ("k", g), ("v", g)):
      s[(*attn, name, "kernel")] = _linear(f"{layer}self_attn.{name}_proj.weight", d, (n, hd), **kw)
      if cfg.attention_bias != "none":
        s[(*attn, name, "bias")] = _heads(f"{layer}self_attn.{name}_proj.bias", (n, hd), **kw)
    s[(*attn, "o", "kernel")] = _linear_out(f"{layer}self_attn.o_proj.weight", (h, hd), d, **kw)
    if cfg.attention_bias == "all":
      s[(*attn, "o", "bias")] = _same(f"{layer}self_attn.o_proj.bias", (d,), **kw)
    for name, (n_in, n_out) in (("gate", (d, f)), ("up", (d, f)), ("down", (f, d))):
      s[(*mlp, name, "kernel")] = _linear(f"{layer}mlp.{name}_proj.weight", n_in, n_out, **kw)
      if cfg.mlp_bias:
        s[(*mlp, name, "bias")] = _same(f"{layer}mlp.{name}_proj.bias", (n_out,), **kw)
    _norm(s, (*BLOCK, "norm1"), f"{layer}input_layernorm", cfg, bias=False, **kw)
    _norm(s, (*BLOCK, "norm2"), f"{layer}post_attention_layernorm", cfg, bias=False, **kw)
    _norm(s, ("final_norm",), "model.norm", cfg, bias=False)
    if not cfg.tie_embeddings:
      s[("lm_head", "kernel")] = _linear("lm_head.weight", d, cfg.vocab_size)
    return s

  @staticmethod
  def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    window = dict(cfg.mixer_options).get("window") if cfg.mixer == "sliding_window" else None
    if window is not None:
      model_type, arch = "mistral", "MistralForCausalLM"
    elif cfg.attention_bias == "qkv":
      model_type, arch = "qwen2", "Qwen2ForCausalLM"
    else:
      model_type, arch = "llama", "LlamaForCausalLM"
    out = dict(
      architectures=[arch],
      model_type=model_type,
      vocab_size=cfg.vocab_size,
      hidden_size=cfg.d_model,
      intermediate_size=cfg.mlp_dim,
      num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.resolved_head_dim,
      hidden_act={"silu": "silu", "auto": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}[
        cfg.mlp_activation
      ],
      max_position_embeddings=cfg.max_seq_len,
      rms_norm_eps=cfg.norm_eps,
      rope_theta=cfg.rope_theta,
      rope_scaling=_rope_scaling_json(cfg),
      tie_word_embeddings=cfg.tie_embeddings,
    )
    if model_type == "llama":
      out.update(attention_bias=cfg.attention_bias == "all", mlp_bias=cfg.mlp_bias)
    if model_type == "mistral":
      out["sliding_window"] = window
    if model_type == "qwen2":
      out.update(use_sliding_window=False, sliding_window=None)
    return out

  @staticmethod
  def check(cfg: ModelConfig) -> str | None:
    """Why `cfg` is not a Llama-family model (None if it is)."""
    if cfg.mixer not in ("dense", "sliding_window", "flash", "memory_efficient"):
      return f"model.mixer={cfg.mixer!r} (Llama-family checkpoints have softmax attention)"
    wanted = dict(kind="decoder", mlp="swiglu", norm="rmsnorm", position="rope")
    wanted.update(norm_position="pre", embed_norm=False, type_vocab_size=0)
    for key, value in wanted.items():
      if getattr(cfg, key) != value:
        return f"model.{key}={getattr(cfg, key)!r} (a Llama-family model has {value!r})"
    if cfg.mlp_activation == "relu":
      return "model.mlp_activation='relu' (no Llama-family hidden_act for it here)"
    if cfg.attention_bias == "qkv" and cfg.mlp_bias:
      return "model.attention_bias='qkv' with model.mlp_bias=True (Qwen2 has no MLP biases)"
    if cfg.mixer == "sliding_window" and (cfg.attention_bias != "none" or cfg.mlp_bias):
      return "a sliding window with biases (Mistral has none)"
    return None


def _rope_scaling_json(cfg: ModelConfig) -> dict[str, Any] | None:
  if cfg.rope_scaling == "none":
    return None
  out: dict[str, Any] = {"rope_type": cfg.rope_scaling, "factor": cfg.rope_scaling_factor}
  if cfg.rope_scaling == "llama3":
    out.update(
      low_freq_factor=cfg.rope_low_freq_factor,
      high_freq_factor=cfg.rope_high_freq_factor,
      original_max_position_embeddings=cfg.rope_original_max_len,
    )
  return out


# ---------------------------------------------------------------------------------------------
# GPT-2
# ---------------------------------------------------------------------------------------------

_GPT2_ACTS = {
  "gelu_new": "gelu_tanh",
  "gelu_pytorch_tanh": "gelu_tanh",
  "gelu": "gelu",
  "relu": "relu",
  "silu": "silu",
  "swish": "silu",
}


class GPT2:
  """GPT-2: learned positions, pre-norm LayerNorm, Conv1D (x W + b) projections, fused q/k/v."""

  model_types = ("gpt2",)
  base = "transformer."
  buffers = (".attn.bias", ".attn.masked_bias")

  @staticmethod
  def settings(hf: Mapping[str, Any], keys: frozenset[str]) -> dict[str, Any]:
    del keys
    _refuse(hf, "scale_attn_weights", bool, "attention without 1/sqrt(d) scaling")
    _refuse(hf, "scale_attn_by_inverse_layer_idx", lambda v: not v, "per-layer attention scaling")
    _refuse(hf, "add_cross_attention", lambda v: not v, "cross attention")
    d = _setting(hf, "n_embd")
    return dict(
      kind="decoder",
      vocab_size=_setting(hf, "vocab_size"),
      d_model=d,
      num_layers=_setting(hf, "n_layer"),
      num_heads=_setting(hf, "n_head"),
      mlp_dim=hf.get("n_inner") or 4 * d,
      mlp="gelu",
      mlp_activation=_activation(hf, "activation_function", _GPT2_ACTS),
      attention_bias="all",
      norm="layernorm",
      norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
      position="learned",
      max_seq_len=_setting(hf, "n_positions"),
      tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
      mixer="dense",
    )

  @staticmethod
  def sources(cfg: ModelConfig) -> dict[Path, Source]:
    d, h, hd, f = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim, cfg.mlp_dim
    layer = "transformer.h.{}."
    kw = {"stacked": True}
    s: dict[Path, Source] = {
      ("embed", "embedding"): _same("transformer.wte.weight", (cfg.vocab_size, d)),
      ("pos_embed", "embedding"): _same("transformer.wpe.weight", (cfg.max_seq_len, d)),
    }
    attn, mlp = (*BLOCK, "mixer"), (*BLOCK, "mlp")
    qkv = f"{layer}attn.c_attn."
    for i, name in enumerate(("q", "k", "v")):
      part = (i * d, (i + 1) * d)
      s[(*attn, name, "kernel")] = Source(
        qkv + "weight", (d, 3 * d), (d, h, hd), (0, 1, 2), select=(1, *part), **kw
      )
      s[(*attn, name, "bias")] = Source(
        qkv + "bias", (3 * d,), (h, hd), (0, 1), select=(0, *part), **kw
      )
    s[(*attn, "o", "kernel")] = Source(
      f"{layer}attn.c_proj.weight", (d, d), (h, hd, d), (0, 1, 2), **kw
    )
    s[(*attn, "o", "bias")] = _same(f"{layer}attn.c_proj.bias", (d,), **kw)
    s[(*mlp, "up", "kernel")] = _same(f"{layer}mlp.c_fc.weight", (d, f), **kw)
    s[(*mlp, "up", "bias")] = _same(f"{layer}mlp.c_fc.bias", (f,), **kw)
    s[(*mlp, "down", "kernel")] = _same(f"{layer}mlp.c_proj.weight", (f, d), **kw)
    s[(*mlp, "down", "bias")] = _same(f"{layer}mlp.c_proj.bias", (d,), **kw)
    _norm(s, (*BLOCK, "norm1"), f"{layer}ln_1", cfg, bias=True, **kw)
    _norm(s, (*BLOCK, "norm2"), f"{layer}ln_2", cfg, bias=True, **kw)
    _norm(s, ("final_norm",), "transformer.ln_f", cfg, bias=True)
    if not cfg.tie_embeddings:
      s[("lm_head", "kernel")] = _linear("lm_head.weight", d, cfg.vocab_size)
    return s

  @staticmethod
  def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    acts = {"gelu_tanh": "gelu_new", "auto": "gelu_new", "gelu": "gelu", "relu": "relu"}
    acts["silu"] = "silu"
    return dict(
      architectures=["GPT2LMHeadModel"],
      model_type="gpt2",
      vocab_size=cfg.vocab_size,
      n_embd=cfg.d_model,
      n_layer=cfg.num_layers,
      n_head=cfg.num_heads,
      n_inner=cfg.mlp_dim,
      n_positions=cfg.max_seq_len,
      activation_function=acts[cfg.mlp_activation],
      layer_norm_epsilon=cfg.norm_eps,
      tie_word_embeddings=cfg.tie_embeddings,
      scale_attn_weights=True,
    )

  @staticmethod
  def check(cfg: ModelConfig) -> str | None:
    wanted = dict(kind="decoder", mlp="gelu", norm="layernorm", position="learned")
    wanted.update(norm_position="pre", embed_norm=False, type_vocab_size=0, attention_bias="all")
    wanted.update(position_offset=0, num_kv_heads=cfg.num_heads)
    for key, value in wanted.items():
      if getattr(cfg, key) != value:
        return f"model.{key}={getattr(cfg, key)!r} (GPT-2 has {value!r})"
    if cfg.resolved_head_dim * cfg.num_heads != cfg.d_model:
      return f"model.head_dim={cfg.head_dim} (GPT-2 has d_model // num_heads)"
    if cfg.mixer not in ("dense", "flash", "memory_efficient"):
      return f"model.mixer={cfg.mixer!r} (GPT-2 has dense attention)"
    return None


# ---------------------------------------------------------------------------------------------
# BERT family: bert (BERT, MiniLM), roberta
# ---------------------------------------------------------------------------------------------


class Bert:
  """BERT / MiniLM (model_type bert) and RoBERTa: post-norm encoders with a masked-LM head."""

  model_types = ("bert", "roberta")
  base = "bert."  # roberta: "roberta." (see `base_prefix`)
  buffers = ("embeddings.position_ids", "embeddings.token_type_ids")
  # Heads of *ForPreTraining checkpoints this model has no use for (named in a notice).
  unused_heads = ("cls.seq_relationship.",)

  @staticmethod
  def base_prefix(model_type: str) -> str:
    return "roberta." if model_type == "roberta" else "bert."

  @staticmethod
  def head_names(model_type: str) -> dict[str, str]:
    """The masked-LM head's tensors (canonical names)."""
    if model_type == "roberta":
      return {
        "dense": "lm_head.dense",
        "norm": "lm_head.layer_norm",
        "bias": "lm_head.bias",
        "decoder": "lm_head.decoder.weight",
      }
    return {
      "dense": "cls.predictions.transform.dense",
      "norm": "cls.predictions.transform.LayerNorm",
      "bias": "cls.predictions.bias",
      "decoder": "cls.predictions.decoder.weight",
    }

  @staticmethod
  def settings(hf: Mapping[str, Any], keys: frozenset[str]) -> dict[str, Any]:
    model_type = hf["model_type"]
    _refuse(hf, "is_decoder", lambda v: not v, "a BERT decoder (causal BERT)")
    _refuse(hf, "add_cross_attention", lambda v: not v, "cross attention")
    _refuse(
      hf,
      "position_embedding_type",
      lambda v: v in (None, "absolute"),
      "relative position embeddings (only 'absolute')",
    )
    positions = _setting(hf, "max_position_embeddings")
    offset = 0
    if model_type == "roberta":  # Positions are numbered from pad_token_id + 1.
      offset = int(hf.get("pad_token_id", 1)) + 1
    base = Bert.base_prefix(model_type)
    pooled = any(k in keys for k in (f"{base}pooler.dense.weight", "pooler.dense.weight"))
    return dict(
      kind="encoder",
      vocab_size=_setting(hf, "vocab_size"),
      d_model=_setting(hf, "hidden_size"),
      num_layers=_setting(hf, "num_hidden_layers"),
      num_heads=_setting(hf, "num_attention_heads"),
      mlp_dim=_setting(hf, "intermediate_size"),
      mlp="gelu",
      mlp_activation=_activation(hf, "hidden_act", _GPT2_ACTS),
      attention_bias="all",
      norm="layernorm",
      norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
      norm_position="post",
      embed_norm=True,
      position="learned",
      position_offset=offset,
      max_seq_len=positions - offset,
      type_vocab_size=int(hf.get("type_vocab_size", 2)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
      pooler=pooled,
      mixer="dense",
      init_std=float(hf.get("initializer_range", 0.02)),
    )

  @staticmethod
  def sources(cfg: ModelConfig, model_type: str = "bert") -> dict[Path, Source]:
    d, h, hd, f = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim, cfg.mlp_dim
    base = Bert.base_prefix(model_type)
    emb = f"{base}embeddings."
    s: dict[Path, Source] = {
      ("embed", "embedding"): _same(f"{emb}word_embeddings.weight", (cfg.vocab_size, d)),
      ("pos_embed", "embedding"): _same(f"{emb}position_embeddings.weight", (cfg.position_rows, d)),
    }
    if cfg.type_vocab_size:
      shape = (cfg.type_vocab_size, d)
      s[("type_embed", "embedding")] = _same(f"{emb}token_type_embeddings.weight", shape)
    _norm(s, ("embed_norm",), f"{emb}LayerNorm", cfg, bias=True)
    layer = f"{base}encoder.layer.{{}}."
    kw = {"stacked": True}
    attn, mlp = (*BLOCK, "mixer"), (*BLOCK, "mlp")
    for name, hf_name in (("q", "query"), ("k", "key"), ("v", "value")):
      prefix = f"{layer}attention.self.{hf_name}"
      s[(*attn, name, "kernel")] = _linear(f"{prefix}.weight", d, (h, hd), **kw)
      s[(*attn, name, "bias")] = _heads(f"{prefix}.bias", (h, hd), **kw)
    out = f"{layer}attention.output."
    s[(*attn, "o", "kernel")] = _linear_out(f"{out}dense.weight", (h, hd), d, **kw)
    s[(*attn, "o", "bias")] = _same(f"{out}dense.bias", (d,), **kw)
    _norm(s, (*BLOCK, "norm1"), f"{out}LayerNorm", cfg, bias=True, **kw)
    s[(*mlp, "up", "kernel")] = _linear(f"{layer}intermediate.dense.weight", d, f, **kw)
    s[(*mlp, "up", "bias")] = _same(f"{layer}intermediate.dense.bias", (f,), **kw)
    s[(*mlp, "down", "kernel")] = _linear(f"{layer}output.dense.weight", f, d, **kw)
    s[(*mlp, "down", "bias")] = _same(f"{layer}output.dense.bias", (d,), **kw)
    _norm(s, (*BLOCK, "norm2"), f"{layer}output.LayerNorm", cfg, bias=True, **kw)
    if cfg.pooler:
      s[("pooler", "kernel")] = _linear(f"{base}pooler.dense.weight", d, d)
      s[("pooler", "bias")] = _same(f"{base}pooler.dense.bias", (d,))
    head = Bert.head_names(model_type)
    s[("head_dense", "kernel")] = _linear(f"{head['dense']}.weight", d, d, init="normal")
    s[("head_dense", "bias")] = _same(f"{head['dense']}.bias", (d,), init="zeros")
    s[("head_norm", "scale")] = _same(f"{head['norm']}.weight", (d,), init="ones")
    s[("head_norm", "bias")] = _same(f"{head['norm']}.bias", (d,), init="zeros")
    s[("vocab_bias",)] = _same(head["bias"], (cfg.vocab_size,), init="zeros")
    if not cfg.tie_embeddings:
      s[("decoder", "kernel")] = _linear(head["decoder"], d, cfg.vocab_size, init="normal")
    return s

  @staticmethod
  def hf_config(cfg: ModelConfig, model_type: str = "bert") -> dict[str, Any]:
    acts = {"gelu": "gelu", "auto": "gelu_new", "gelu_tanh": "gelu_new", "relu": "relu"}
    acts["silu"] = "silu"
    arch = "RobertaForMaskedLM" if model_type == "roberta" else "BertForMaskedLM"
    out = dict(
      architectures=[arch],
      model_type=model_type,
      vocab_size=cfg.vocab_size,
      hidden_size=cfg.d_model,
      num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads,
      intermediate_size=cfg.mlp_dim,
      hidden_act=acts[cfg.mlp_activation],
      layer_norm_eps=cfg.norm_eps,
      max_position_embeddings=cfg.position_rows,
      type_vocab_size=cfg.type_vocab_size,
      position_embedding_type="absolute",
      tie_word_embeddings=cfg.tie_embeddings,
      initializer_range=cfg.init_std,
    )
    if model_type == "roberta":
      out["pad_token_id"] = cfg.position_offset - 1
    return out

  @staticmethod
  def check(cfg: ModelConfig, model_type: str = "bert") -> str | None:
    wanted = dict(kind="encoder", mlp="gelu", norm="layernorm", position="learned")
    wanted.update(norm_position="post", embed_norm=True, attention_bias="all")
    wanted.update(num_kv_heads=cfg.num_heads)
    for key, value in wanted.items():
      if getattr(cfg, key) != value:
        return f"model.{key}={getattr(cfg, key)!r} (a BERT-family model has {value!r})"
    if model_type == "roberta" and cfg.position_offset < 1:
      return f"model.position_offset={cfg.position_offset} (RoBERTa numbers from pad_token_id + 1)"
    if model_type == "bert" and cfg.position_offset:
      return f"model.position_offset={cfg.position_offset} (BERT numbers positions from 0)"
    if cfg.resolved_head_dim * cfg.num_heads != cfg.d_model:
      return f"model.head_dim={cfg.head_dim} (BERT has d_model // num_heads)"
    if cfg.mixer not in ("dense", "flash", "memory_efficient"):
      return f"model.mixer={cfg.mixer!r} (BERT has dense attention)"
    return None


FAMILIES = {t: family for family in (Llama, GPT2, Bert) for t in family.model_types}
SUPPORTED = tuple(FAMILIES)


def family_of(model_type: Any):
  """The family class of a config.json `model_type`; a one-line error lists the supported."""
  if model_type not in FAMILIES:
    raise ValueError(
      f"config.json model_type={model_type!r} is not supported; supported: {', '.join(SUPPORTED)}"
    )
  return FAMILIES[model_type]


def sources_for(model_type: str, cfg: ModelConfig) -> dict[Path, Source]:
  family = family_of(model_type)
  return family.sources(cfg, model_type) if family is Bert else family.sources(cfg)


def hf_config_for(model_type: str, cfg: ModelConfig) -> dict[str, Any]:
  family = family_of(model_type)
  return family.hf_config(cfg, model_type) if family is Bert else family.hf_config(cfg)


def base_prefix(model_type: str) -> str:
  family = family_of(model_type)
  return family.base_prefix(model_type) if family is Bert else family.base


def infer_model_type(cfg: ModelConfig) -> str:
  """The family a model config exports as (for runs trained here), or a one-line error."""
  if cfg.kind == "encoder":
    candidates = ["roberta" if cfg.position_offset else "bert"]
  elif cfg.position == "learned":
    candidates = ["gpt2"]
  else:
    candidates = ["llama"]
  model_type = candidates[0]
  family = family_of(model_type)
  why = family.check(cfg, model_type) if family is Bert else family.check(cfg)
  if why is not None:
    raise ValueError(
      f"this model cannot be written as a Hugging Face checkpoint: {why}; exportable families: "
      f"{', '.join(SUPPORTED)}"
    )
  return model_type
