"""Pruning methods (registered on import); each returns a float weight, so quantization can follow.

magnitude          smallest |w| per layer, or N:M (`magnitude`)
magnitude_global   one |w| threshold across every selected layer (`magnitude`, whole-model)
wanda              |W|·‖X‖₂ per output, from calibration inputs (`wanda`)
sparsegpt          OBS updates with Cholesky of H⁻¹, lazy batched, adaptive masks (`sparsegpt`)

Settings: `sparsity` (fraction of zeros) or `n_m` ("2:4"), see `compress.prune.common`.
"""

from compress.prune import common, magnitude, sparsegpt, wanda

__all__ = ["common", "magnitude", "sparsegpt", "wanda"]
