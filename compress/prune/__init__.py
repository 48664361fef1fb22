"""Pruning methods (registered on import); each returns a float weight, so quantization can follow.

magnitude          smallest |w| per layer, or N:M (`magnitude`)
magnitude_global   one |w| threshold across every selected layer (`magnitude`, whole-model)
wanda              |W|·‖X‖₂ per output, from calibration inputs (`wanda`)
sparsegpt          OBS updates with Cholesky of H⁻¹, lazy batched, adaptive masks (`sparsegpt`)
structured         whole attention heads (KV groups) and MLP neurons by first-order Taylor or
                   magnitude scores; rebuilds the model at the smaller shapes, optional recovery
                   fine-tune (`structured`, whole-model)

Settings: `sparsity` (fraction of zeros) or `n_m` ("2:4"), see `compress.prune.common`; structured
takes `heads` / `neurons` ratios instead.
"""

from reslm.compress.prune import common, magnitude, sparsegpt, structured, wanda

__all__ = ["common", "magnitude", "sparsegpt", "structured", "wanda"]
