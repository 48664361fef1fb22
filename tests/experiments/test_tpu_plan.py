"""The TPU planning benchmark's configs and formula (its compiles are the benchmark's job)."""

import pytest

from experiments.benchmarks import tpu_plan
from experiments.configs import llama2_7b


def test_variants_shapes_and_per_chip_batch():
  cfg = tpu_plan.make_config("13b", "dense_bs4", chips=8, overrides=["model.remat=dots"])
  assert cfg.model.d_model == 5120 and cfg.model.num_layers == 40 and cfg.model.mixer == "dense"
  assert cfg.data.batch_size == 4 * 8 and cfg.model.remat == "dots"
  flash = llama2_7b.get_config("flash_bs1")
  assert flash.model.mixer == "flash" and flash.model.mixer_options["implementation"] == "pallas"
  assert flash.data.batch_size == llama2_7b.CHIPS and flash.model.vocab_size == 32000
  assert llama2_7b.get_config().name == flash.name


def test_bad_size_and_override_are_one_line_errors():
  with pytest.raises(ValueError, match="--sizes=70b"):
    tpu_plan.make_config("70b", "flash_bs1", chips=16)
  with pytest.raises(ValueError, match="--set=remat"):
    tpu_plan.make_config("7b", "flash_bs1", chips=16, overrides=["remat"])
  with pytest.raises(ValueError, match="variant 'flash_bs2'"):
    llama2_7b.get_config("flash_bs2")


def test_fsdp_formula_counts_bf16_gathers_per_use_and_f32_scatters():
  assert tpu_plan.fsdp_formula(10, "full") == {"all-gather": 60.0, "reduce-scatter": 40.0}
  assert tpu_plan.fsdp_formula(10, "dots")["all-gather"] == 40.0
