"""The reliability promise (README, "What we tried"), one fault or bad input per test, run as a user
runs the entry points: a command never writes into a directory holding something it did not
write; a damaged checkpoint is skipped for the newest intact one; a full disk leaves a resumable
run and one error line; every bad input is one `error:` line with no traceback, before compiling.

The multi-process README command and a 2-process checkpoint read from one process are in
`tests/parallel/test_multiprocess.py`.
"""

import glob
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

from experiments import cli
from tests.experiments.test_cli import (
  FAST,
  ROOT,
  SMOKE,
  assert_one_line_error,
  checkpoint_steps,
  child_env,
  command,
  run,
)
from tests.shared_runs import shared_dir

pytestmark = pytest.mark.subprocess

COMPRESS = "experiments/configs/compress/quantize.py:smoke"
SHAKESPEARE = "experiments/configs/shakespeare_char.py:smoke"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> pathlib.Path:
  """The 30-step smoke run of tests/experiments/test_cli.py (the same shared directory)."""

  def build(workdir):
    result = run("experiments.train", f"--config={SMOKE}", f"--workdir={workdir}", *FAST)
    assert result.returncode == 0, result.stderr[-3000:]

  workdir = shared_dir(tmp_path_factory, "cli_smoke_run", build)
  assert checkpoint_steps(workdir) == [10, 20, 30]
  return workdir


def copy_run(trained: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  return workdir


def tree_hashes(path: pathlib.Path) -> dict[str, str]:
  return {
    str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(path.rglob("*"))
    if p.is_file()
  }


def flip_bit(step_dir: pathlib.Path) -> str:
  """Flips one bit in the middle of the step's largest array data file; returns its path."""
  data = max(glob.glob(f"{step_dir}/state/**/d/*", recursive=True), key=os.path.getsize)
  raw = bytearray(pathlib.Path(data).read_bytes())
  raw[len(raw) // 2] ^= 0x10
  pathlib.Path(data).write_bytes(bytes(raw))
  return data


def logged(workdir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def in_namespace(script: str, timeout: float = 300) -> subprocess.CompletedProcess:
  """Runs a shell script as root of a new user+mount namespace (to mount a tmpfs)."""
  if shutil.which("unshare") is None:
    pytest.skip("needs util-linux unshare to mount a tmpfs")
  probe = subprocess.run(
    ["unshare", "-rm", "true"], capture_output=True, text=True, timeout=30, check=False
  )
  if probe.returncode != 0:
    pytest.skip(f"user namespaces unavailable: {probe.stderr.strip()}")
  return subprocess.run(
    ["unshare", "-rm", "sh", "-c", script],
    cwd=ROOT,
    env=child_env(),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


# Directories a command did not write.


def test_compress_out_at_a_training_run_is_refused_and_the_run_untouched(tmp_path, trained):
  run_dir = copy_run(trained, tmp_path)
  other = tmp_path / "other"
  shutil.copytree(trained, other)
  before = tree_hashes(other)
  t0 = time.monotonic()
  result = run(
    "experiments.compress", f"--config={COMPRESS}", f"--workdir={run_dir}", f"--out={other}"
  )
  assert_one_line_error(result, f"--out={other}", "a training run")
  assert tree_hashes(other) == before
  # --out equal to --workdir: refused up front too, before any calibration or evaluation.
  before = tree_hashes(run_dir)
  result = run(
    "experiments.compress", f"--config={COMPRESS}", f"--workdir={run_dir}", f"--out={run_dir}"
  )
  assert_one_line_error(result, f"--out={run_dir}", "--workdir")
  assert tree_hashes(run_dir) == before
  assert time.monotonic() - t0 < 120


def test_compress_out_accepts_only_an_earlier_output_of_the_same_compression(tmp_path, trained):
  from reslm.compress import pipeline
  from tests.experiments.test_compress import load_config_module

  cfg = load_config_module().get_config("smoke")
  out = tmp_path / "out"
  pipeline.claim_output(cfg, str(trained), str(out))  # What a compression does first.
  pipeline.claim_output(cfg, str(trained), str(out))  # The same one again may rewrite it.
  before = tree_hashes(out)
  args = [f"--config={COMPRESS}", f"--workdir={trained}", f"--out={out}"]
  other = run("experiments.compress", *args, "--config.best=True")
  assert_one_line_error(other, f"--out={out}", "other settings", "different best")
  assert tree_hashes(out) == before


@pytest.mark.parametrize("holder", ["user_files", "compressed"])
def test_train_and_ablate_refuse_a_directory_they_did_not_write(tmp_path, holder):
  target = tmp_path / "target"
  target.mkdir()
  if holder == "user_files":
    (target / "notes.txt").write_text("mine")
    (target / "checkpoints").mkdir()
    (target / "checkpoints" / "1400").mkdir()
    what = "files experiments.train did not write"
  else:
    (target / ".reslm-owner.json").write_text('{"command": "experiments.compress", "key": {}}')
    what = "experiments.compress"
  before = tree_hashes(target)
  result = run("experiments.train", f"--config={SMOKE}", f"--workdir={target}", *FAST)
  assert_one_line_error(result, f"--workdir={target}", what)
  result = run(
    "experiments.ablate",
    "--ablation=experiments/configs/ablations/attention.py:smoke",
    f"--workdir={target}",
    "--arms=dense",
    "--steps=10",
  )
  assert_one_line_error(result, f"--workdir={target}")
  assert tree_hashes(target) == before


# Damaged checkpoints.


def test_bit_flip_is_detected_and_the_previous_checkpoint_used(tmp_path, trained):
  workdir = copy_run(trained, tmp_path)
  flip_bit(workdir / "checkpoints" / "30")
  result = run("experiments.evaluate", f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  warning = result.stderr.strip().splitlines()
  assert len(warning) == 1 and warning[0].startswith("warning: checkpoint "), result.stderr
  assert f"{workdir}/checkpoints/30" in warning[0] and "checksum mismatch" in warning[0]
  evaluated = json.loads((workdir / "eval.json").read_text())
  assert evaluated["step"] == 20
  at_20 = [r for r in logged(workdir) if r["step"] == 20 and "eval_loss" in r][-1]
  assert evaluated["eval_loss"] == pytest.approx(at_20["eval_loss"], rel=1e-5)

  # Resuming falls back the same way, removes the damaged step, writes it again, and the log has
  # each row once; an unreadable best/ does not block it.
  shutil.rmtree(workdir / "best")
  (workdir / "best").write_text("not a directory")
  result = run(
    "experiments.train",
    f"--config={SMOKE}",
    f"--workdir={workdir}",
    *FAST,
    "--config.train.steps=40",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"resumed from {workdir}/checkpoints at step 20" in result.stdout
  assert "removed it" in result.stderr and "best.unreadable" in result.stderr
  assert checkpoint_steps(workdir) == [20, 30, 40]
  rows = [(r["step"], "eval_loss" in r) for r in logged(workdir)]
  assert len(rows) == len(set(rows)), rows
  assert sorted(set(rows)) == sorted(
    {(s, False) for s in range(5, 45, 5)} | {(s, True) for s in (10, 20, 30, 40)}
  )

  # Every checkpoint damaged: one error line naming them, not a silent NaN.
  for step in (20, 30, 40):
    flip_bit(workdir / "checkpoints" / str(step))
  result = run("experiments.evaluate", f"--workdir={workdir}")
  assert_one_line_error(result, "no intact checkpoint", "checkpoints/40", "checkpoints/20")


# A full disk.


def test_full_disk_leaves_a_resumable_checkpoint_and_one_error_line(tmp_path, trained):
  step_dir = trained / "checkpoints" / "30"
  ckpt_kib = sum(p.stat().st_blocks * 512 for p in step_dir.rglob("*")) // 1024
  # Room for one checkpoint and the logs, not for the best copy that follows it.
  size = int(ckpt_kib * 1.7)
  disk, logs = tmp_path / "disk", tmp_path / "logs"
  disk.mkdir()
  logs.mkdir()
  train = " ".join(
    command("experiments.train", f"--config={SMOKE}", f"--workdir={disk}/run", *FAST)
  )
  script = (
    f"mount -t tmpfs -o size={size}k tmpfs {disk} || exit 99; "
    f"{train} > {logs}/1.out 2> {logs}/1.err; echo $? > {logs}/1.rc; "
    f"{train} > {logs}/2.out 2> {logs}/2.err; echo $? > {logs}/2.rc; "
    f"ls {disk}/run/checkpoints > {logs}/steps"
  )
  result = in_namespace(script)
  if result.returncode == 99:
    pytest.skip(f"cannot mount a tmpfs: {result.stderr.strip()}")
  for n in ("1", "2"):
    err = (logs / f"{n}.err").read_text()
    assert (logs / f"{n}.rc").read_text().strip() == "1", err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no space left on device"), err
    assert f"{disk}/run/" in lines[0] and "needs about" in lines[0] and "free" in lines[0]
  assert "best checkpoint of step 10" in (logs / "1.err").read_text()
  assert "the checkpoint of step 10 is intact" in (logs / "1.err").read_text()
  # The rerun resumed from the checkpoint the first run left.
  assert f"resumed from {disk}/run/checkpoints at step 10" in (logs / "2.out").read_text()
  assert (logs / "steps").read_text().split() == ["10"]


# Bad inputs: one `error:` line, no traceback, nothing compiled.


def _binary(tmp: pathlib.Path) -> pathlib.Path:
  path = tmp / "data.bin"
  path.write_bytes(bytes(range(256)) * 64)
  return path


BAD_TRAIN = {
  "misspelt_field": (["--config.train.stpes=10"], ["--config.train.stpes=10", "'steps'"]),
  "misspelt_section": (["--config.trian.steps=10"], ["--config.trian.steps=10", "'train'"]),
  "nan_learning_rate": (["--config.train.learning_rate=nan"], ["train.learning_rate=nan"]),
  "inf_learning_rate": (["--config.train.learning_rate=inf"], ["train.learning_rate=inf"]),
  "unknown_moe_option": (
    ["--config.model.mlp=moe", "--config.model.mlp_options.num_expert=4"],
    ["num_expert", "num_experts"],
  ),
  "bad_moe_option": (
    ["--config.model.mlp=moe", "--config.model.mlp_options.num_experts=0"],
    ["num_experts=0"],
  ),
  "heartbeat_timeout_zero": (
    ["--multihost", "--coordinator_address=127.0.0.1:1", "--num_processes=1", "--process_id=0"]
    + ["--heartbeat_timeout=0"],
    ["--heartbeat_timeout=0", ">= 1"],
  ),
  "heartbeat_timeout_negative": (
    ["--multihost", "--coordinator_address=127.0.0.1:1", "--num_processes=1", "--process_id=0"]
    + ["--heartbeat_timeout=-1"],
    ["--heartbeat_timeout=-1", ">= 1"],
  ),
}


@pytest.mark.parametrize("case", sorted(BAD_TRAIN))
def test_bad_train_input_is_one_line_error(tmp_path, case):
  args, fragments = BAD_TRAIN[case]
  workdir = tmp_path / "run"
  result = run("experiments.train", f"--config={SMOKE}", f"--workdir={workdir}", *FAST, *args)
  assert_one_line_error(result, *fragments)
  assert not (workdir / "checkpoints").exists()


def test_workdir_that_is_a_file_is_one_line_error(tmp_path):
  path = tmp_path / "a_file"
  path.write_text("x")
  result = run("experiments.train", f"--config={SMOKE}", f"--workdir={path}", *FAST)
  assert_one_line_error(result, f"--workdir={path}", "is a file")
  assert path.read_text() == "x"


def test_read_only_workdir_is_one_line_error(tmp_path):
  ro = tmp_path / "ro"
  ro.mkdir()
  train = " ".join(command("experiments.train", f"--config={SMOKE}", f"--workdir={ro}/run", *FAST))
  result = in_namespace(f"mount -t tmpfs -o ro,size=64k tmpfs {ro} || exit 99; exec {train}")
  if result.returncode == 99:
    pytest.skip(f"cannot mount a tmpfs: {result.stderr.strip()}")
  assert_one_line_error(result, f"--workdir={ro}/run", "not writable", "Read-only file system")


def test_binary_data_is_one_line_error_with_char_and_bytes_with_byte(tmp_path):
  from experiments.configs import shakespeare_char
  from reslm import data as data_lib

  data = _binary(tmp_path)
  common = [f"--config={SHAKESPEARE}", f"--config.data.path={data}", *FAST]
  result = run("experiments.train", *common, f"--workdir={tmp_path / 'char'}")
  assert_one_line_error(result, str(data), "not UTF-8", "offset 128", "data.tokenizer='byte'")
  # The byte tokenizer reads the file's bytes as they are: ids are the bytes.
  cfg = shakespeare_char.get_config("smoke").data
  cfg.update(path=str(data), tokenizer="byte")
  dataset = data_lib.build_dataset(cfg)
  assert dataset.bytes_per_token == 1.0
  rows = dataset.eval_batches(1)[0]["inputs"]
  assert (rows >= 128).any()  # Bytes that are not UTF-8 text are there as themselves.
  raw = data.read_bytes()
  for row in rows:
    start = raw.find(bytes(row.astype("uint8")[:8]))
    assert raw[start : start + len(row)] == bytes(row.astype("uint8"))


GENERATE = {
  "zero_samples": (["--num_samples=0"], ["--num_samples=0", ">= 1"]),
  "nan_temperature": (["--temperature=nan"], ["--temperature=nan"]),
  "negative_temperature": (["--temperature=-1"], ["--temperature=-1"]),
  "top_p_zero": (["--top_p=0"], ["--top_p=0"]),
  "out_of_vocabulary_prompt": (["--prompt=1,2,99999"], ["99999", "0..63"]),
  "negative_prompt_id": (["--prompt=-3,1"], ["-3", "0..63"]),
}


@pytest.mark.parametrize("case", sorted(GENERATE))
def test_bad_generate_input_is_one_line_error(trained, case):
  args, fragments = GENERATE[case]
  result = run("experiments.generate", f"--workdir={trained}", "--prompt=1,2,3", *args)
  assert_one_line_error(result, *fragments)


def test_open_tables_take_new_keys_from_flags():
  """--config.model.mlp_options.<key> (the README's MoE switch) reaches the model config."""
  from experiments.configs import mqar
  from reslm.training import config as config_lib

  argv = [
    "prog",
    "--config.model.mlp=moe",
    "--config.model.mlp_options.num_experts=4",
    "--config.model.mlp_options.top_k=2",
    "--config.model.mixer_options.flash.block_q=16",
    "--config.model.mlp_options.dispatch=dropless",
  ]
  rest, taken = cli.split_open_table_args(argv)
  assert rest == argv[:2]
  cfg = mqar.get_config("smoke")
  cfg.lock()
  cli.apply_open_table_args(cfg, taken)
  assert cfg.model.mlp_options.to_dict() == {"num_experts": 4, "top_k": 2, "dispatch": "dropless"}
  assert cfg.model.mixer_options.flash.block_q == 16
  cfg.model.mlp = "moe"
  model = config_lib.model_config(cfg, 64)
  assert dict(model.mlp_options)["num_experts"] == 4


def test_metrics_rows_past_the_resumed_step_are_dropped(tmp_path):
  from reslm.training import runs

  rows = [{"step": s, "loss": 1.0} for s in (5, 10, 15)] + [{"step": 10, "eval_loss": 2.0}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"st')
  assert runs.truncate_metrics(str(tmp_path), 10) == 2  # Step 15 and the torn last line.
  assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").open()] == [5, 10, 10]


def test_checksum_manifest_names_the_changed_file(tmp_path):
  from reslm.training import checksums

  (tmp_path / "a").mkdir()
  (tmp_path / "a" / "x.bin").write_bytes(b"\0" * 100)
  (tmp_path / "y").write_text("meta")
  assert checksums.problem(str(tmp_path)) is None  # No manifest: not verifiable, so intact.
  checksums.seal(str(tmp_path))
  assert checksums.problem(str(tmp_path)) is None
  (tmp_path / "a" / "x.bin").write_bytes(b"\0" * 99 + b"\1")
  assert checksums.problem(str(tmp_path)) == "a/x.bin: checksum mismatch"
  (tmp_path / "a" / "x.bin").write_bytes(b"\0" * 100)
  assert checksums.problem(str(tmp_path)) is None
  (tmp_path / "y").unlink()
  assert "y: " in checksums.problem(str(tmp_path))


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
