"""GPT-2: learned positions, pre-norm LayerNorm, biased projections stored as `Conv1D` (x W + b,
so not transposed) with q/k/v fused in `c_attn`, gelu_new, tied head."""

from collections.abc import Mapping
from typing import Any

from reslm.hf.layout import (
  BLOCK,
  HF_ACTIVATIONS,
  Path,
  Source,
  activation,
  linear,
  norm,
  refuse,
  same,
  setting,
)
from reslm.models.config import ModelConfig


class GPT2:
  """GPT-2: learned positions, pre-norm LayerNorm, Conv1D (x W + b) projections, fused q/k/v."""

  model_types = ("gpt2",)
  base = "transformer."
  buffers = (".attn.bias", ".attn.masked_bias")

  @staticmethod
  def settings(hf: Mapping[str, Any], keys: frozenset[str]) -> dict[str, Any]:
    del keys
    refuse(hf, "scale_attn_weights", bool, "attention without 1/sqrt(d) scaling")
    refuse(hf, "scale_attn_by_inverse_layer_idx", lambda v: not v, "per-layer attention scaling")
    refuse(hf, "add_cross_attention", lambda v: not v, "cross attention")
    d = setting(hf, "n_embd")
    return dict(
      kind="decoder",
      vocab_size=setting(hf, "vocab_size"),
      d_model=d,
      num_layers=setting(hf, "n_layer"),
      num_heads=setting(hf, "n_head"),
      mlp_dim=hf.get("n_inner") or 4 * d,
      mlp="gelu",
      mlp_activation=activation(hf, "activation_function", HF_ACTIVATIONS),
      attention_bias="all",
      norm="layernorm",
      norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
      position="learned",
      max_seq_len=setting(hf, "n_positions"),
      tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
      mixer="dense",
    )

  @staticmethod
  def sources(cfg: ModelConfig) -> dict[Path, Source]:
    d, h, hd, f = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim, cfg.mlp_dim
    layer = "transformer.h.{}."
    kw = {"stacked": True}
    s: dict[Path, Source] = {
      ("embed", "embedding"): same("transformer.wte.weight", (cfg.vocab_size, d)),
      ("pos_embed", "embedding"): same("transformer.wpe.weight", (cfg.max_seq_len, d)),
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
    s[(*attn, "o", "bias")] = same(f"{layer}attn.c_proj.bias", (d,), **kw)
    s[(*mlp, "up", "kernel")] = same(f"{layer}mlp.c_fc.weight", (d, f), **kw)
    s[(*mlp, "up", "bias")] = same(f"{layer}mlp.c_fc.bias", (f,), **kw)
    s[(*mlp, "down", "kernel")] = same(f"{layer}mlp.c_proj.weight", (f, d), **kw)
    s[(*mlp, "down", "bias")] = same(f"{layer}mlp.c_proj.bias", (d,), **kw)
    norm(s, (*BLOCK, "norm1"), f"{layer}ln_1", cfg, bias=True, **kw)
    norm(s, (*BLOCK, "norm2"), f"{layer}ln_2", cfg, bias=True, **kw)
    norm(s, ("final_norm",), "transformer.ln_f", cfg, bias=True)
    if not cfg.tie_embeddings:
      s[("lm_head", "kernel")] = linear("lm_head.weight", d, cfg.vocab_size)
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
