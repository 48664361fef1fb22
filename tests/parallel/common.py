"""A small reference model, batches and a runner shared by the parallel tests."""

import dataclasses

import jax
import numpy as np
from flax import nnx

from reslm.models import ModelConfig
from reslm.parallel import mesh as mesh_lib
from reslm.training import loop
from reslm.training.config import get_train_defaults
from reslm.training.steps import weighted_losses

# Every dimension a preset splits divides 8: heads 8, d_model 64, mlp 128, vocab 128. 4 layers
# (scanned, so compiling costs no more than 1): 2 pipeline stages x 2 circular laps.
MODEL = ModelConfig(
  vocab_size=128, d_model=64, num_layers=4, num_heads=8, mlp_dim=128, tie_embeddings=False
)
# Top-2 of 8 experts; capacity factor 4 = E / k, so no token is ever dropped.
MOE_MODEL = dataclasses.replace(
  MODEL,
  mlp="moe",
  mlp_options={"num_experts": 8, "top_k": 2, "capacity_factor": 4.0},
  tie_embeddings=True,
)
BATCH, SEQ = 16, 8


def train_config(**overrides):
  tc = get_train_defaults()
  tc.update(dict(warmup_steps=0, learning_rate=1e-2, steps=10))
  tc.update(overrides)
  return tc


def batch(i: int, model=MODEL) -> dict[str, np.ndarray]:
  """Deterministic random tokens (a pure function of i)."""
  tokens = np.random.RandomState(i).randint(0, model.vocab_size, (BATCH, SEQ + 1))
  return {
    "inputs": tokens[:, :-1].astype(np.int32),
    "targets": tokens[:, 1:].astype(np.int32),
    "weights": np.ones((BATCH, SEQ), np.float32),
  }


def parallel_config(preset: str, **settings):
  """The `parallel` section for `preset` with mesh sizes and other settings (data defaults to 1)."""
  cfg = mesh_lib.get_default_config()
  cfg.update({"data": 1, "rules": preset, **settings})
  return cfg


def placement(preset: str, sizes: dict, *, model=MODEL, train=None, devices=None):
  """`training.loop.placement` for `preset` on a mesh of `sizes` (the first devices)."""
  pcfg = parallel_config(preset, **sizes)
  n = int(np.prod(list(sizes.values()) or [1]))
  mesh = mesh_lib.make_mesh(pcfg, devices or jax.devices()[:n])
  return loop.placement(model, train or train_config(), pcfg, mesh)


def setup(preset: str, sizes: dict, *, model=MODEL, train=None, devices=None):
  """Placement, initial state, graphdef and optimizer for `preset` on a mesh of `sizes`."""
  train = train or train_config()
  place = placement(preset, sizes, model=model, train=train, devices=devices)
  graphdef, state, tx = loop.init_state(model, train, seed=0, shardings=place.state)
  return place, graphdef, state, tx


# Compile for speed, not run time: the tests' programs are tiny and compiling dominates.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def compile_fn(jitted, *args):
  """`jitted` lowered for `args` and compiled with FAST_COMPILE."""
  return jitted.lower(*args).compile(FAST_COMPILE)


def mean_loss(graphdef, params, batch_, forward=None):
  """Weighted mean cross-entropy plus the auxiliary loss (the train step's objective)."""
  model = nnx.merge(graphdef, params)
  out = model(batch_["inputs"]) if forward is None else forward(model, batch_["inputs"])
  loss_sum, weight, _ = weighted_losses(out.logits, batch_["targets"], batch_["weights"])
  return loss_sum / weight + out.aux_loss
