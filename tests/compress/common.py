"""One small model shape for every compress test (shared shapes share compilations).

Two block groups of two blocks: blocks/0 holds layers 0 and 2, blocks/1 layers 1 and 3.
"""

from models import ModelConfig

CFG = ModelConfig(
  vocab_size=64, d_model=32, num_layers=4, num_heads=4, mixer="dense,dense", tie_embeddings=False
)
