"""Training: config sections and validation, optimizer, jitted steps, checkpoints, the loop."""

from reslm.training.checkpoint import Checkpointer
from reslm.training.config import get_base_config, model_config, validate_experiment
from reslm.training.loop import NonFiniteLossError, RunResult, load_run, train_and_evaluate
from reslm.training.optim import build_optimizer, learning_rate_schedule
from reslm.training.steps import TrainState, make_eval_step, make_train_step

__all__ = [
  "Checkpointer",
  "NonFiniteLossError",
  "RunResult",
  "TrainState",
  "build_optimizer",
  "get_base_config",
  "learning_rate_schedule",
  "load_run",
  "make_eval_step",
  "make_train_step",
  "model_config",
  "train_and_evaluate",
  "validate_experiment",
]
