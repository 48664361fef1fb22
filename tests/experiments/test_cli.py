"""The absl entry points, run as child processes exactly as a user runs them.

Bad input must exit non-zero with one `error: ...` line on stderr and no traceback; evaluate and
generate must work from a trained workdir alone; a run killed with SIGKILL and rerun must end with
the same parameters as an uninterrupted run; SIGTERM must save a checkpoint and exit cleanly.
Children get `JAX_PLATFORMS=cpu` and one device (no forced host device count).
"""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from experiments.configs import mqar
from reslm.inference import generate
from reslm.training import load_run
from tests.shared_runs import shared_dir

pytestmark = pytest.mark.subprocess

ROOT = pathlib.Path(__file__).resolve().parents[2]
MQAR = "experiments/configs/mqar.py"
SMOKE = f"{MQAR}:smoke"
# Settings that only save time: no matmul-peak measurement, no sample printed after training.
FAST = ("--config.report.measure_peak=False", "--sample_tokens=0")
TIMEOUT = 180
DEFAULT = mqar.get_config()
MAX_SEQ_LEN = mqar.get_config("smoke").model.max_seq_len


def child_env() -> dict[str, str]:
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  flags = [
    f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f
  ]
  if flags:
    env["XLA_FLAGS"] = " ".join(flags)
  else:
    env.pop("XLA_FLAGS", None)
  return env


def command(module: str, *args: str) -> list[str]:
  return [sys.executable, "-m", module, *args]


def run(module: str, *args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
  return subprocess.run(
    command(module, *args),
    cwd=ROOT,
    env=child_env(),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


@pytest.fixture
def spawn(tmp_path):
  """Starts children (stdout and stderr to files); any still running at teardown are killed."""
  procs = []

  def start(module: str, *args: str, log: str) -> subprocess.Popen:
    with open(tmp_path / f"{log}.out", "w") as out, open(tmp_path / f"{log}.err", "w") as err:
      proc = subprocess.Popen(
        command(module, *args), cwd=ROOT, env=child_env(), stdout=out, stderr=err
      )
    proc.out, proc.err = tmp_path / f"{log}.out", tmp_path / f"{log}.err"
    procs.append(proc)
    return proc

  yield start
  for proc in procs:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def finish(proc: subprocess.Popen, timeout: float = TIMEOUT) -> int:
  """Waits for a spawned child; returns its exit code."""
  return proc.wait(timeout=timeout)


def tail(path: pathlib.Path) -> str:
  return path.read_text()[-3000:]


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
  assert result.returncode != 0, result.stdout
  assert "Traceback" not in result.stderr, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith("error:"), lines[0]
  for fragment in fragments:
    assert fragment in lines[0], lines[0]
  return lines[0]


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
  d = workdir / "checkpoints"
  if not d.is_dir():
    return []
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit())


def params_of(workdir: pathlib.Path):
  _, model, _, step = load_run(str(workdir))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param)), step


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> pathlib.Path:
  """A finished smoke run (30 steps); read-only, tests that write into a run copy it."""

  def build(workdir):
    result = run("experiments.train", f"--config={SMOKE}", f"--workdir={workdir}", *FAST)
    assert result.returncode == 0, result.stderr[-3000:]

  workdir = shared_dir(tmp_path_factory, "cli_smoke_run", build)
  assert checkpoint_steps(workdir)[-1] == 30
  return workdir


def copy_run(trained: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  return workdir


BAD_INPUTS = {
  "heads_not_dividing_width": (
    [f"--config={MQAR}", "--config.model.num_heads=7"],
    ["num_heads=7", f"d_model={DEFAULT.model.d_model}"],
  ),
  "kv_heads_not_dividing_heads": (
    [f"--config={MQAR}", "--config.model.num_kv_heads=3"],
    ["num_kv_heads=3"],
  ),
  "unknown_mixer": (
    [f"--config={MQAR}", "--config.model.mixer=no_such_mixer"],
    ["no_such_mixer", "dense"],
  ),
  "unknown_variant": ([f"--config={MQAR}:no_such_variant"], ["no_such_variant", "smoke"]),
  "missing_config_file": (["--config=experiments/configs/no_such.py"], ["no_such.py"]),
  "missing_text_file": (
    [f"--config={SMOKE}", "--config.data.source=text", "--config.data.path={tmp}/missing.txt"],
    ["missing.txt"],
  ),
  "empty_text_file": (
    [f"--config={SMOKE}", "--config.data.source=text", "--config.data.path={tmp}/empty.txt"],
    ["empty.txt", "empty"],
  ),
  "seq_len_above_max_seq_len": (
    [f"--config={SMOKE}", f"--config.data.seq_len={2 * MAX_SEQ_LEN}"],
    [f"seq_len={2 * MAX_SEQ_LEN}", f"max_seq_len={MAX_SEQ_LEN}"],
  ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_error(tmp_path, case):
  (tmp_path / "empty.txt").write_text("")
  args, fragments = BAD_INPUTS[case]
  args = [a.replace("{tmp}", str(tmp_path)) for a in args]
  workdir = tmp_path / "run"
  result = run("experiments.train", *args, f"--workdir={workdir}", *FAST, timeout=120)
  assert_one_line_error(result, *fragments)
  assert not (workdir / "checkpoints").exists()


def test_checkpoint_of_other_model_shape_is_one_line_error(tmp_path, trained):
  workdir = copy_run(trained, tmp_path)
  result = run(
    "experiments.train",
    f"--config={SMOKE}",
    f"--workdir={workdir}",
    "--config.model.d_model=64",
    *FAST,
  )
  assert_one_line_error(result, "different model", "d_model=32", "64")
  assert checkpoint_steps(workdir) == checkpoint_steps(trained)


def test_evaluate_on_trained_workdir(trained, tmp_path):
  workdir = copy_run(trained, tmp_path)  # evaluate writes eval.json into the run.
  result = run("experiments.evaluate", f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "eval_loss:" in result.stdout
  evaluated = json.loads((workdir / "eval.json").read_text())
  assert evaluated["step"] == 30
  logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  final = [r for r in logged if "eval_loss" in r and r["step"] == 30][-1]
  # The same parameters on the same eval batches as the run's own final evaluation.
  for key in ("eval_loss", "eval_accuracy"):
    assert evaluated[key] == pytest.approx(final[key], rel=1e-5, abs=1e-7), key


def test_generate_on_trained_workdir(trained):
  result = run(
    "experiments.generate",
    f"--workdir={trained}",
    "--prompt=1,2,3",
    "--max_new_tokens=8",
    "--temperature=0",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  first = result.stdout.strip().splitlines()[0]
  ids = [int(x) for x in first.split(",")]
  assert len(ids) == 11 and ids[:3] == [1, 2, 3]
  _, model, _, _ = load_run(str(trained))
  expected = generate(
    model, np.array([[1, 2, 3]], np.int32), max_new_tokens=8, rng=jax.random.key(0), temperature=0.0
  )
  assert ids == np.asarray(expected)[0].tolist()


def test_generate_bad_prompt_is_one_line_error(trained):
  result = run("experiments.generate", f"--workdir={trained}", "--prompt=a,b")
  assert_one_line_error(result, "comma-separated")


def test_evaluate_without_run_is_one_line_error(tmp_path):
  result = run("experiments.evaluate", f"--workdir={tmp_path}")
  assert_one_line_error(result, "config.json")


def _resume_args(workdir: pathlib.Path) -> list[str]:
  return [
    f"--config={SMOKE}",
    f"--workdir={workdir}",
    "--config.train.steps=100",
    "--config.train.decay_steps=100",
    "--config.checkpoint.every=10",
    "--config.checkpoint.async_save=False",
    "--config.train.log_every=10",
    *FAST,
  ]


def test_sigkill_then_rerun_matches_uninterrupted_run(tmp_path, spawn):
  killed, straight = tmp_path / "A", tmp_path / "B"
  first = spawn("experiments.train", *_resume_args(killed), log="A1")
  reference = spawn("experiments.train", *_resume_args(straight), log="B")
  deadline = time.monotonic() + TIMEOUT
  while not [s for s in checkpoint_steps(killed) if s >= 20]:
    assert first.poll() is None, "run ended before it was killed:\n" + tail(first.err)
    assert time.monotonic() < deadline, "no checkpoint at step >= 20 in time"
    time.sleep(0.02)
  first.send_signal(signal.SIGKILL)
  assert finish(first) == -signal.SIGKILL
  at_kill = checkpoint_steps(killed)
  assert 20 <= at_kill[-1] < 100, at_kill  # Killed mid-run, not finished.

  # The same command again; it overlaps with the reference run still going.
  rerun = spawn("experiments.train", *_resume_args(killed), log="A2")
  assert finish(rerun) == 0, tail(rerun.err)
  assert re.search(rf"^resumed from .* at step {at_kill[-1]}$", rerun.out.read_text(), re.M)
  assert finish(reference) == 0, tail(reference.err)

  a, step_a = params_of(killed)
  b, step_b = params_of(straight)
  assert step_a == step_b == 100
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sigterm_saves_checkpoint_and_exits_cleanly(tmp_path, spawn):
  workdir = tmp_path / "run"
  steps = 100_000
  proc = spawn(
    "experiments.train",
    f"--config={SMOKE}",
    f"--workdir={workdir}",
    f"--config.train.steps={steps}",
    "--config.checkpoint.every=0",
    "--config.train.log_every=1",
    "--config.train.eval_every=100000",
    *FAST,
    log="run",
  )
  metrics = workdir / "metrics.jsonl"
  deadline = time.monotonic() + TIMEOUT
  while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
    assert proc.poll() is None, tail(proc.err)
    assert time.monotonic() < deadline, "no training progress in time"
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  code = finish(proc, timeout=120)
  stdout, stderr = proc.out.read_text(), proc.err.read_text()
  assert code == 0, stderr[-3000:]
  assert "Traceback" not in stderr
  saved = checkpoint_steps(workdir)
  assert len(saved) == 1 and 3 <= saved[0] < steps, saved
  assert re.search(rf"^preempted at step {saved[0]}\b", stdout, re.M), stdout
  assert not (workdir / "efficiency_report.json").exists()
