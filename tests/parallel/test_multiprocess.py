"""Two local processes x 4 CPU devices train like one process with 8: jax.distributed + gloo.

Launch 1 trains 6 steps (checkpoints at 3 and 6); launch 2 resumes from the checkpoint written
across both processes and continues; their losses must match a single-process run step by step.
Then one process is killed and the other must stop with one `error:` line naming it (the peer
watchdog of `parallel.distributed`), exit code 1, instead of waiting forever inside a collective
or aborting with a C++ stack.

The README's own two-process command runs verbatim (only its workdir and port are replaced) and
must finish (it once hung after training); its checkpoint is then evaluated, sampled and
compressed from a single process (it once failed with "Topology mismatch").
"""

import json
import os
import pathlib
import re
import shutil
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
  assert code == 1  # Not SIGABRT.
  assert time.time() - killed_at < HEARTBEAT_S + 60
  err = (tmp_path / "p0.err").read_text()
  # One line: from the watchdog, or from the collective that lost its peer first.
  errors = [line for line in err.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, err[-3000:]
  died = ("process 1 of the job stopped responding", "another process of the job died")
  assert any(d in errors[0] for d in died), err[-3000:]
  assert "Check failure" not in err and "Fatal Python error" not in err, err[-3000:]


def readme_command() -> str:
  """The README's local multi-process command, as written."""
  text = (ROOT / "README.md").read_text()
  found = re.search(
    r"# Local multi-process check on CPU[^\n]*\n(for i in 0 1.*?; wait)\n", text, re.S
  )
  assert found, "README.md no longer has its local multi-process command"
  return found[1]


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
  """Runs the README's command (workdir and port replaced: parallel test runs must not share
  them); returns (workdir, stdout, stderr). Fails if it does not finish within the timeout."""
  workdir = tmp_path_factory.mktemp("readme_mp") / "mp"
  script = readme_command()
  assert script.count("--workdir=/tmp/mp ") == 1 and script.count("127.0.0.1:12355") == 1, script
  script = script.replace("--workdir=/tmp/mp ", f"--workdir={workdir} ")
  script = script.replace("127.0.0.1:12355", f"127.0.0.1:{free_port()}")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # The command sets its own.
  # `python` is this interpreter (as after the README's pip install into it).
  env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
  proc = subprocess.Popen(
    ["bash", "-c", script],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    start_new_session=True,
  )
  try:
    out, err = proc.communicate(timeout=480)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    out, err = proc.communicate()
    pytest.fail(f"the README's multi-process command hung:\n{out[-2000:]}\n{err[-3000:]}")
  return workdir, proc.returncode, out, err


def test_readme_multiprocess_command_finishes(readme_run):
  workdir, code, out, err = readme_run
  assert code == 0, err[-3000:]
  # `wait` returns 0 whatever the children did: they must have printed no failure either.
  for bad in ("Traceback", "error:", "Aborted", "Killed", "Check failure", "Fatal"):
    assert bad not in err, err[-3000:]
  assert out.count("eval_loss:") == 1 and out.count("Efficiency report") == 1, out
  assert "Predictions at scored positions" in out  # The post-training sample (it hung there).
  assert sorted(int(d) for d in os.listdir(workdir / "checkpoints")) == [10, 20, 30]


def single_process_env() -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = " ".join(
    f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f
  )
  return env


def test_two_process_checkpoint_loads_in_one_process(readme_run, tmp_path):
  source, code, _, _ = readme_run
  assert code == 0
  workdir = tmp_path / "mp"
  shutil.copytree(source, workdir)  # evaluate writes eval.json into the run.

  def run(*args):
    return subprocess.run(
      [sys.executable, "-m", *args],
      cwd=ROOT,
      env=single_process_env(),
      capture_output=True,
      text=True,
      timeout=240,
    )

  result = run("experiments.evaluate", f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  evaluated = json.loads((workdir / "eval.json").read_text())
  logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  final = [r for r in logged if "eval_loss" in r and r["step"] == 30][-1]
  assert evaluated["step"] == 30
  assert evaluated["eval_loss"] == pytest.approx(final["eval_loss"], rel=1e-5)
  result = run(
    "experiments.generate", f"--workdir={workdir}", "--prompt=1,2,3", "--max_new_tokens=4"
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.startswith("1,2,3,")
  result = run(
    "experiments.compress",
    "--config=experiments/configs/compress/quantize.py:smoke",
    f"--workdir={workdir}",
    f"--out={tmp_path / 'int8'}",
  )
  assert result.returncode == 0, result.stderr[-3000:]
