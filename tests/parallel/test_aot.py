"""Ahead-of-time compiles of the real train step for TPU slices, on this CPU-only machine."""

import subprocess
import sys

import pytest

from experiments.configs import mqar
from reslm.parallel import aot
from reslm.training import aot as train_aot

GIB = 2**30


@pytest.mark.parametrize(
  "name, expected",
  [
    ("v5e:2x2", ("v5e", "v5e:2x2", 4)),
    ("v5e-16", ("v5e", "v5e:4x4", 16)),
    ("v5litepod-8", ("v5e", "v5e:2x4", 8)),
    ("v6e-4", ("v6e", "v6e:2x2", 4)),
    ("v5p-8", ("v5p", "v5p:2x2x1", 4)),  # v5p names count TensorCores: 2 per chip.
    ("v5p-64", ("v5p", "v5p:2x4x4", 32)),
    ("v4-16", ("v4", "v4:2x2x2", 8)),
  ],
)
def test_slice_names(name, expected):
  assert aot.parse_topology(name) == expected


@pytest.mark.parametrize("name", ["v9-8", "v5e", "tpu", "v5e-12"])
def test_bad_slice_names(name):
  with pytest.raises(ValueError, match=f"--topology={name}"):
    aot.parse_topology(name)


def config(rules: str, **sizes):
  cfg = mqar.get_config("smoke")
  cfg.parallel.update({"data": 1, "rules": rules, **sizes})
  return cfg


@pytest.fixture(scope="module")
def plans():
  """Two topologies x two strategies; the step-time estimate only where it is checked."""
  return {
    ("v5e:2x2", "dp"): train_aot.compile_only(config("dp", data=-1), "v5e:2x2", estimate=False),
    ("v5e:2x2", "fsdp"): train_aot.compile_only(config("fsdp", fsdp=-1), "v5e:2x2"),
    ("v5p-8", "dp"): train_aot.compile_only(config("dp", data=-1), "v5p-8", estimate=False),
    ("v5p-8", "fsdp"): train_aot.compile_only(config("fsdp", fsdp=-1), "v5p-8", estimate=False),
  }


@pytest.mark.parametrize("topology, hbm", [("v5e:2x2", 16 * GIB), ("v5p-8", 95 * GIB)])
def test_memory_fits_and_fsdp_shards_the_state(plans, topology, hbm):
  dp, fsdp = plans[(topology, "dp")], plans[(topology, "fsdp")]
  for plan in (dp, fsdp):
    mem = plan["memory_per_device"]
    assert plan["devices"] == 4 and mem["hbm_bytes"] == hbm and mem["fits"]
    assert 0 < mem["peak_bytes"] < hbm
  # Parameters + optimizer state dominate the arguments: FSDP over 4 holds well under half.
  assert fsdp["memory_per_device"]["argument_bytes"] < dp["memory_per_device"]["argument_bytes"] / 2


def test_collectives_follow_the_strategy(plans):
  for topology in ("v5e:2x2", "v5p-8"):
    dp = plans[(topology, "dp")]["comm_bytes_per_step"]
    fsdp = plans[(topology, "fsdp")]["comm_bytes_per_step"]
    assert dp["all-reduce"] > 0 and dp["all-gather"] == 0  # Gradients only.
    assert fsdp["all-gather"] > 0  # Parameters gathered where used.


def test_step_time_and_mfu_estimates(plans):
  est = plans[("v5e:2x2", "fsdp")]["estimate"]
  assert est["step_seconds"] > 0 and 0 < est["mfu"] < 1
  assert est["peak_flops_per_s"] == 4 * aot.CHIPS["v5e"].peak_flops
  text = train_aot.format_plan(plans[("v5e:2x2", "fsdp")])
  assert "fits" in text and "(estimate)" in text and "all-gather" in text


def test_cli_compile_only_and_bad_topology():
  base = [sys.executable, "-m", "experiments.train", "--config=experiments/configs/mqar.py:smoke"]
  ok = subprocess.run(
    [*base, "--compile_only", "--topology=v6e-4", "--noestimate"],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert "TPU v6e:2x2: 4 devices on 4 chips" in ok.stdout and "32.00 GiB HBM" in ok.stdout
  bad = subprocess.run(
    [*base, "--compile_only", "--topology=v5e-3"], capture_output=True, text=True, timeout=300
  )
  assert bad.returncode != 0
  assert bad.stderr.strip().splitlines()[-1].startswith("error: --topology=v5e-3")
