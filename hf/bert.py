"""The BERT family: BERT, MiniLM (model_type bert), RoBERTa: post-norm encoders with learned
positions (RoBERTa's numbered from pad_token_id + 1), token types, an embedding LayerNorm, exact
gelu, a masked-LM head tied to the embeddings, and BERT's pooler."""

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
  refuse,
  same,
  setting,
)
from reslm.models.config import ModelConfig


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
    refuse(hf, "is_decoder", lambda v: not v, "a BERT decoder (causal BERT)")
    refuse(hf, "add_cross_attention", lambda v: not v, "cross attention")
    refuse(
      hf,
      "position_embedding_type",
      lambda v: v in (None, "absolute"),
      "relative position embeddings (only 'absolute')",
    )
    positions = setting(hf, "max_position_embeddings")
    offset = 0
    if model_type == "roberta":  # Positions are numbered from pad_token_id + 1.
      pad = hf.get("pad_token_id")
      offset = (1 if pad is None else int(pad)) + 1
    base = Bert.base_prefix(model_type)
    pooled = any(k in keys for k in (f"{base}pooler.dense.weight", "pooler.dense.weight"))
    return dict(
      kind="encoder",
      vocab_size=setting(hf, "vocab_size"),
      d_model=setting(hf, "hidden_size"),
      num_layers=setting(hf, "num_hidden_layers"),
      num_heads=setting(hf, "num_attention_heads"),
      mlp_dim=setting(hf, "intermediate_size"),
      mlp="gelu",
      mlp_activation=activation(hf, "hidden_act", HF_ACTIVATIONS),
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
      ("embed", "embedding"): same(f"{emb}word_embeddings.weight", (cfg.vocab_size, d)),
      ("pos_embed", "embedding"): same(f"{emb}position_embeddings.weight", (cfg.position_rows, d)),
    }
    if cfg.type_vocab_size:
      shape = (cfg.type_vocab_size, d)
      s[("type_embed", "embedding")] = same(f"{emb}token_type_embeddings.weight", shape)
    norm(s, ("embed_norm",), f"{emb}LayerNorm", cfg, bias=True)
    layer = f"{base}encoder.layer.{{}}."
    kw = {"stacked": True}
    attn, mlp = (*BLOCK, "mixer"), (*BLOCK, "mlp")
    for name, hf_name in (("q", "query"), ("k", "key"), ("v", "value")):
      prefix = f"{layer}attention.self.{hf_name}"
      s[(*attn, name, "kernel")] = linear(f"{prefix}.weight", d, (h, hd), **kw)
      s[(*attn, name, "bias")] = heads(f"{prefix}.bias", (h, hd), **kw)
    out = f"{layer}attention.output."
    s[(*attn, "o", "kernel")] = linear_out(f"{out}dense.weight", (h, hd), d, **kw)
    s[(*attn, "o", "bias")] = same(f"{out}dense.bias", (d,), **kw)
    norm(s, (*BLOCK, "norm1"), f"{out}LayerNorm", cfg, bias=True, **kw)
    s[(*mlp, "up", "kernel")] = linear(f"{layer}intermediate.dense.weight", d, f, **kw)
    s[(*mlp, "up", "bias")] = same(f"{layer}intermediate.dense.bias", (f,), **kw)
    s[(*mlp, "down", "kernel")] = linear(f"{layer}output.dense.weight", f, d, **kw)
    s[(*mlp, "down", "bias")] = same(f"{layer}output.dense.bias", (d,), **kw)
    norm(s, (*BLOCK, "norm2"), f"{layer}output.LayerNorm", cfg, bias=True, **kw)
    if cfg.pooler:
      s[("pooler", "kernel")] = linear(f"{base}pooler.dense.weight", d, d)
      s[("pooler", "bias")] = same(f"{base}pooler.dense.bias", (d,))
    head = Bert.head_names(model_type)
    s[("head_dense", "kernel")] = linear(f"{head['dense']}.weight", d, d, init="normal")
    s[("head_dense", "bias")] = same(f"{head['dense']}.bias", (d,), init="zeros")
    s[("head_norm", "scale")] = same(f"{head['norm']}.weight", (d,), init="ones")
    s[("head_norm", "bias")] = same(f"{head['norm']}.bias", (d,), init="zeros")
    s[("vocab_bias",)] = same(head["bias"], (cfg.vocab_size,), init="zeros")
    if not cfg.tie_embeddings:
      s[("decoder", "kernel")] = linear(head["decoder"], d, cfg.vocab_size, init="normal")
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
