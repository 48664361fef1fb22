"""Two local processes x 4 CPU devices train like one process with 8: jax.distributed + gloo.

Launch 1 trains 6 steps (checkpoints at 3 and 6); launch 2 resumes from the checkpoint written
across both processes and continues; their losses must match a single-process run step by step.
Then one process is killed and the other must stop with the coordination service's error (its
heartbeats time out) instead of waiting forever inside a collective.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments.configs import mqar
from reslm.training import train_and_evaluate

pytestmark = pytest.mark.subprocess

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Schedule fixed by decay_steps, so runs of different lengths take identical steps.
SETTINGS = {
  "train.log_every": 1,
  "train.eval_every": 6,
  "train.decay_steps": 8,
  "checkpoint.every": 3,
  "checkpoint.keep_best": False,
  "report.measure_peak": False,
}
STEPS = 9
HEARTBEAT_S = 10


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def child_env() -> dict[str, str]:
  """4 CPU devices per child; the parent's forced device count is replaced."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
  env["XLA_FLAGS"] = " ".join([*flags, "--xla_force_host_platform_device_count=4"])
  return env


def launch(workdir, steps: int, logs: pathlib.Path) -> list[subprocess.Popen]:
  port = free_port()
  procs = []
  for i in range(2):
    args = [
      sys.executable,
      "-m",
      "experiments.train",
      "--config=experiments/configs/mqar.py:smoke",
      f"--workdir={workdir}",
      "--sample_tokens=0",
      f"--config.train.steps={steps}",
      *(f"--config.{k}={v}" for k, v in SETTINGS.items()),
      "--multihost",
      f"--coordinator_address=127.0.0.1:{port}",
      "--num_processes=2",
      f"--process_id={i}",
      f"--heartbeat_timeout={HEARTBEAT_S}",
    ]
    with open(logs / f"p{i}.err", "w") as err:
      procs.append(
        subprocess.Popen(args, cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=err)
      )
  return procs


def losses(workdir) -> dict[int, float]:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return {}
  records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture
def reaper():
  procs = []
  yield procs
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait()


def test_two_processes_match_one_and_fail_fast(tmp_path, reaper):
  workdir = tmp_path / "multi"
  first = launch(workdir, 6, tmp_path)
  reaper.extend(first)
  # Meanwhile, the single-process reference on this process's 8 devices.
  cfg = mqar.get_config("smoke")
  for key, value in SETTINGS.items():
    section, name = key.split(".")
    cfg[section][name] = value
  cfg.train.steps = STEPS
  train_and_evaluate(cfg, str(tmp_path / "single"))
  expected = losses(tmp_path / "single")

  for p in first:
    assert p.wait(timeout=240) == 0, (tmp_path / "p0.err").read_text()[-3000:]
  assert sorted(int(d) for d in os.listdir(workdir / "checkpoints")) == [3, 6]

  second = launch(workdir, 100_000, tmp_path)  # Resumes at step 6 and runs until killed.
  reaper.extend(second)
  deadline = time.time() + 240
  while max(losses(workdir), default=0) < STEPS:
    assert time.time() < deadline and all(p.poll() is None for p in second)
    time.sleep(0.5)
  got = losses(workdir)
  steps = list(range(1, STEPS + 1))
  np.testing.assert_allclose([got[s] for s in steps], [expected[s] for s in steps], rtol=1e-5)

  second[1].send_signal(signal.SIGKILL)
  killed_at = time.time()
  code = second[0].wait(timeout=HEARTBEAT_S + 60)  # Not forever.
  assert code != 0
  assert time.time() - killed_at < HEARTBEAT_S + 60
  err = (tmp_path / "p0.err").read_text()
  assert "stopped sending heartbeats" in err and "another task died" in err
