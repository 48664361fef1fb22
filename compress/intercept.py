"""Sending fused projections through their own modules, for compressed and instrumented layers.

`models.linear.fused_linear` computes several `Linear`s that share an input (q/k/v, SwiGLU's gate
and up) as fewer, wider matmuls over their `kernel`s. A compressed layer's own matmul (int8 x
int8 activations, low-bit kernels) and a calibration recorder must be called instead: today
`fused_linear` does that itself (it applies any layer that is not a plain `Linear` on its own), so
`unfused_projections()` changes nothing. It stays as a guard for callers: it rebinds
`fused_linear`, in every loaded module that imported it, to a version that calls each layer when
any of them is not a plain `Linear`, and restores it on exit.
"""

import contextlib
import sys

from reslm.models import linear as linear_lib

_ORIGINAL = linear_lib.fused_linear


def _dispatching(x, layers):
  if all(type(layer) is linear_lib.Linear for layer in layers):
    return _ORIGINAL(x, layers)
  return [layer(x) for layer in layers]


@contextlib.contextmanager
def unfused_projections():
  """Within the context, fused projections call each non-`Linear` layer on the shared input."""
  patched = [m for m in list(sys.modules.values()) if getattr(m, "fused_linear", None) is _ORIGINAL]
  for module in patched:
    module.fused_linear = _dispatching
  try:
    yield
  finally:
    for module in patched:
      module.fused_linear = _ORIGINAL
