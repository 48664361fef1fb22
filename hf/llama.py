"""The Llama family: Llama 2/3, SmolLM / TinyLlama (model_type llama), Mistral (sliding window),
Qwen2 (q/k/v biases): decoder, pre-norm RMSNorm, RoPE (+ linear / Llama-3 scaling), SwiGLU."""

from collections.abc import Mapping
from typing import Any

from reslm.hf.layout import (
  BLOCK,
  HF_ACTIVATIONS,
  Path,
  Source,
  activation,
  heads,
  linear,
  linear_out,
  norm,
  same,
  setting,
)
from reslm.models.config import ModelConfig

ROPE_TYPES = ("default", "linear", "llama3")


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
    d = setting(hf, "hidden_size")
    heads = setting(hf, "num_attention_heads")
    bias = {"llama": "all" if hf.get("attention_bias") else "none", "qwen2": "qkv"}
    return dict(
      kind="decoder",
      vocab_size=setting(hf, "vocab_size"),
      d_model=d,
      num_layers=setting(hf, "num_hidden_layers"),
      num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or d // heads,
      mlp_dim=setting(hf, "intermediate_size"),
      mlp="swiglu",
      mlp_activation=activation(hf, "hidden_act", HF_ACTIVATIONS),
      mlp_bias=bool(hf.get("mlp_bias", False)),
      attention_bias=bias.get(model_type, "none"),
      norm="rmsnorm",
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      position="rope",
      max_seq_len=setting(hf, "max_position_embeddings"),
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
      ("embed", "embedding"): same("model.embed_tokens.weight", (cfg.vocab_size, d))
    }
    attn, mlp = (*BLOCK, "mixer"), (*BLOCK, "mlp")
    for name, n in (("q", h), ("k", g), ("v", g)):
      s[(*attn, name, "kernel")] = linear(f"{layer}self_attn.{name}_proj.weight", d, (n, hd), **kw)
      if cfg.attention_bias != "none":
        s[(*attn, name, "bias")] = heads(f"{layer}self_attn.{name}_proj.bias", (n, hd), **kw)
    s[(*attn, "o", "kernel")] = linear_out(f"{layer}self_attn.o_proj.weight", (h, hd), d, **kw)
    if cfg.attention_bias == "all":
      s[(*attn, "o", "bias")] = same(f"{layer}self_attn.o_proj.bias", (d,), **kw)
    for name, (n_in, n_out) in (("gate", (d, f)), ("up", (d, f)), ("down", (f, d))):
      s[(*mlp, name, "kernel")] = linear(f"{layer}mlp.{name}_proj.weight", n_in, n_out, **kw)
      if cfg.mlp_bias:
        s[(*mlp, name, "bias")] = same(f"{layer}mlp.{name}_proj.bias", (n_out,), **kw)
    norm(s, (*BLOCK, "norm1"), f"{layer}input_layernorm", cfg, bias=False, **kw)
    norm(s, (*BLOCK, "norm2"), f"{layer}post_attention_layernorm", cfg, bias=False, **kw)
    norm(s, ("final_norm",), "model.norm", cfg, bias=False)
    if not cfg.tie_embeddings:
      s[("lm_head", "kernel")] = linear("lm_head.weight", d, cfg.vocab_size)
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
