"""Whether a decoder's cached decoding equals its full forward, from its layers' declarations.

Every sequence mixer and MLP declares `decode_inexact`: None when running it with its decoding
cache (a prefill, then one token per call) gives the full forward's outputs, else a one-line
reason (an approximate mixer's dense or resampled fallback, MoE capacity drops, ...). A layer that
declares nothing is reported too, so a new layer cannot be silently inexact. A mixer without
`init_cache` cannot decode at all: `check_decodable` refuses it. `inference.generate` prints the
notes as one warning line each.
"""

from reslm.models.registry import MIXERS

_UNDECLARED = object()


def _layers(model):
  """(setting, registered name, module) for the mixer and MLP of every distinct block."""
  cfg = model.cfg
  mixers, mlps = cfg.mixer_pattern, cfg.mlp_pattern
  for i, block in enumerate(model.layers.groups.blocks):
    yield "model.mixer", mixers[i % len(mixers)], block.mixer
    yield "model.mlp", mlps[i % len(mlps)], block.mlp


def check_decodable(model) -> None:
  """Raises a one-line ValueError unless `model` is a decoder LM whose mixers all keep a cache."""
  kind = getattr(getattr(model, "cfg", None), "kind", None)
  if kind != "decoder" or not hasattr(model, "init_cache"):
    raise ValueError(
      f"generation needs a decoder LM (model.kind='decoder'); got model.kind={kind!r}"
    )
  for setting, name, module in _layers(model):
    if setting == "model.mixer" and not hasattr(module, "init_cache"):
      raise ValueError(
        f"{setting}={name!r} cannot decode: its {type(module).__name__} keeps no decoding cache; "
        f"choose a mixer that does, e.g. {', '.join(n for n in ('dense', 'flash') if n in MIXERS)}"
      )


def decode_notes(model) -> list[str]:
  """One line per distinct layer whose cached decoding differs from the full forward.

  Each line names the setting and layer ("model.mlp=moe: ...") and the layer's reason; an int8 KV
  cache (compress kv_int8) is noted as well, since the full forward attends unrounded keys and
  values. Empty when decoding is exact.
  """
  notes = []
  for setting, name, module in _layers(model):
    reason = getattr(module, "decode_inexact", _UNDECLARED)
    if reason is _UNDECLARED:
      reason = (
        f"{type(module).__name__} does not declare whether its cached decoding equals the full "
        "forward (decode_inexact)"
      )
    if getattr(module, "kv_cache_quant", None) == "int8":
      rounded = "the int8 KV cache rounds keys and values; the full forward uses them unrounded"
      reason = rounded if reason is None else f"{reason}; {rounded}"
    if reason is not None:
      note = f"{setting}={name}: cached decoding differs from the full forward: {reason}"
      if note not in notes:
        notes.append(note)
  return notes
