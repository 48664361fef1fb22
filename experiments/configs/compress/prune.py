"""Pruning and low-rank factoring of a trained run, one variant per method.

  python -m experiments.compress --config=experiments/configs/compress/prune.py:<variant> \
      --workdir=/tmp/shakespeare_char --out=/tmp/shakespeare_char_<variant>

(--workdir: a run trained by `experiments.train`, e.g. experiments/configs/shakespeare_char.py.)

Variants (every projection but the output head; embeddings are never selected):
  magnitude50         50% unstructured, smallest |w| per layer
  wanda50             (default) 50% Wanda, |W|·‖X‖₂ per output
  sparsegpt50         50% SparseGPT (OBS updates, blocks of 128)
  wanda_2_4           2:4 Wanda
  sparsegpt_2_4_int8  2:4 SparseGPT, then int8 round-to-nearest (prune -> quantize)
  sparsegpt_2_4_gptq4 2:4 SparseGPT, then GPTQ int4 in groups of 64 (keeps the pruned zeros)
  svd_energy90        truncated SVD keeping 90% of each layer's spectral energy
  svd_p60             truncated SVD, every layer at 60% of its parameters
  svd_llm_p60         SVD-LLM whitening (Cholesky of the inputs' XᵀX), 60% per layer
  asvd_p60            ASVD: activation scaling, ranks by calibration-loss sensitivity within 60% of
                      the parameters overall (per layer anywhere from 10% to dense)
  asvd_uniform_p60    ASVD scaling, every layer at 60% (no sensitivity search; the ablation)
  smoke               wanda50 on 4 calibration sequences and 2 eval batches (seconds, for tests)
"""

import ml_collections

from reslm.compress.pipeline import get_default_config

VARIANTS = (
  "magnitude50",
  "wanda50",
  "sparsegpt50",
  "wanda_2_4",
  "sparsegpt_2_4_int8",
  "sparsegpt_2_4_gptq4",
  "svd_energy90",
  "svd_p60",
  "svd_llm_p60",
  "asvd_p60",
  "asvd_uniform_p60",
  "smoke",
)
# Block projections only: the output head (absent when tied to the embeddings) and the
# embeddings stay float.
ALL = r"layers/.*"


def _rules(variant: str) -> list[dict]:
  one = {
    "magnitude50": ("magnitude", {"sparsity": 0.5}),
    "wanda50": ("wanda", {"sparsity": 0.5}),
    "smoke": ("wanda", {"sparsity": 0.5}),
    "sparsegpt50": ("sparsegpt", {"sparsity": 0.5}),
    "wanda_2_4": ("wanda", {"n_m": "2:4"}),
    "sparsegpt_2_4_int8": ("sparsegpt", {"n_m": "2:4"}),
    "sparsegpt_2_4_gptq4": ("sparsegpt", {"n_m": "2:4"}),
    "svd_energy90": ("svd", {"energy": 0.9}),
    "svd_p60": ("svd", {"param_fraction": 0.6}),
    "svd_llm_p60": ("svd_llm", {"param_fraction": 0.6}),
    "asvd_p60": ("asvd", {"param_fraction": 0.6}),
    "asvd_uniform_p60": ("asvd", {"param_fraction": 0.6, "search": False}),
  }
  method, settings = one[variant]
  rules = [{"path": ALL, "method": method, "settings": settings}]
  if variant == "sparsegpt_2_4_int8":
    rules.append({"path": ALL, "method": "int8"})
  if variant == "sparsegpt_2_4_gptq4":
    rules.append({"path": ALL, "method": "gptq", "settings": {"bits": 4, "group_size": 64}})
  return rules


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "wanda50"
  if variant not in VARIANTS:
    raise ValueError(
      f"compress/prune variant {variant!r} is not known; choose one of: {', '.join(VARIANTS)}"
    )
  cfg = get_default_config()
  cfg.name = f"prune_{variant}"
  cfg.rules = _rules(variant)
  if variant == "smoke":
    cfg.calibration.update(num_sequences=4, batch_size=4, max_tokens=256)
    cfg.eval_batches = 2
  return cfg
