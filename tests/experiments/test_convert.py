"""The README's "Bring your own checkpoint" commands, run verbatim as child processes on a tiny
Hugging Face checkpoint (paths substituted: the fixture for the model directory, a temporary
directory for /tmp, a generated text for the data): convert -> evaluate -> generate -> compress ->
train (fine-tune) -> export, and the converter's one-line errors."""

import json
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from reslm.compress import load_compressed
from reslm.hf.reader import HFCheckpoint
from reslm.training import load_run
from tests.experiments.test_cli import child_env
from tests.shared_runs import pseudo_english

pytestmark = pytest.mark.subprocess

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "hf" / "llama_gqa_untied"
FAST = ["--config.report.measure_peak=False", "--sample_tokens=0"]


def readme_commands() -> list[list[str]]:
  """The python commands of the section's first bash block, continuation lines joined."""
  text = (ROOT / "README.md").read_text()
  section = text.split("## Bring your own checkpoint", 1)[1]
  block = section.split("```bash", 1)[1].split("```", 1)[0]
  joined = re.sub(r"\\\n\s*", " ", block)
  return [shlex.split(line) for line in joined.splitlines() if line.startswith("python -m")]


def run(argv, tmp_path):
  out = subprocess.run(
    [sys.executable, *argv[1:]], cwd=ROOT, env=child_env(), capture_output=True, text=True,
    timeout=600,
  )  # fmt: skip
  return out


def test_readme_commands(tmp_path):
  data = tmp_path / "text.txt"
  data.write_text(pseudo_english(20_000))
  subs = {
    "/path/to/SmolLM-135M": str(FIXTURE),
    "/tmp/": f"{tmp_path}/",
    "../shared/data/tinyshakespeare.txt": str(data),
  }
  commands = readme_commands()
  modules = [c[2] for c in commands]
  assert modules == [
    "experiments.convert", "experiments.evaluate", "experiments.generate", "experiments.compress",
    "experiments.train", "experiments.convert",
  ]  # fmt: skip
  run_dir = tmp_path / "smollm"
  outputs = {}
  for i, argv in enumerate(commands):
    argv = [_substitute(a, subs) for a in argv] + (FAST if argv[2] == "experiments.train" else [])
    out = run(argv, tmp_path)
    assert out.returncode == 0, (argv, out.stderr[-2000:])
    outputs.setdefault(argv[2], []).append(out.stdout)
    if i == 0:  # The converted run holds exactly the checkpoint's weights, at step 0.
      _, model, meta, step = load_run(str(run_dir))
      assert step == 0 and meta["hf"]["model_type"] == "llama"
      assert _params(model).keys() == _params(HFCheckpoint(FIXTURE).load()).keys()
      reference = _params(HFCheckpoint(FIXTURE).load())
      assert all(np.array_equal(v, reference[k]) for k, v in _params(model).items())
  assert "eval_loss:" in outputs["experiments.evaluate"][0]
  assert outputs["experiments.generate"][0].strip()
  config = json.loads((run_dir / "config.json").read_text())
  assert config["model"]["d_model"] == 32 and config["data"]["tokenizer"] == "hf"
  # Fine-tuning continued the run from step 0 to 200 (checkpoint.keep=2 kept the last two).
  assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["100", "200"]
  _, tuned, _, step = load_run(str(run_dir))
  assert step == 200 and any(not np.array_equal(v, reference[k]) for k, v in _params(tuned).items())
  # The export of the int8 run is its dequantised weights: the same logits.
  compressed, _ = load_compressed(str(tmp_path / "smollm_int8"))
  export_dir = tmp_path / "smollm_int8_hf"
  assert {p.name for p in export_dir.iterdir()} >= {
    "config.json",
    "model.safetensors",
    "tokenizer.json",
  }
  tokens = jnp.asarray(np.load(FIXTURE / "golden.npz")["input_ids"], jnp.int32)
  want = np.asarray(compressed(tokens).logits)
  np.testing.assert_allclose(
    HFCheckpoint(export_dir).load()(tokens).logits, want, atol=2e-3, rtol=0
  )
  assert 0 < np.abs(want - np.load(FIXTURE / "golden.npz")["logits"]).max() < 0.5  # int8 moved it


def _params(model) -> dict:
  return {
    jax.tree_util.keystr(p): np.asarray(v)
    for p, v in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model)))[0]
  }


def _substitute(arg: str, subs: dict[str, str]) -> str:
  # One pass: a replacement is never substituted again (the checkout may itself live under /tmp/).
  pattern = "|".join(re.escape(old) for old in sorted(subs, key=len, reverse=True))
  return re.sub(pattern, lambda m: subs[m[0]], arg)


def one_line_error(out) -> str:
  assert out.returncode != 0
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-2000:]
  return lines[0]


def test_bad_inputs_are_one_line_errors(tmp_path):
  bad = tmp_path / "bad"
  shutil.copytree(FIXTURE, bad)
  cfg = json.loads((bad / "config.json").read_text())
  (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "mamba"}))
  convert = ["python", "-m", "experiments.convert"]
  line = one_line_error(run([*convert, f"--hf_dir={bad}", f"--workdir={tmp_path}/run"], tmp_path))
  assert "model_type='mamba' is not supported; supported: llama, mistral" in line
  assert not (tmp_path / "run").exists()
  line = one_line_error(run([*convert, f"--workdir={tmp_path}/run"], tmp_path))
  assert "give either --hf_dir" in line
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("")
  line = one_line_error(
    run([*convert, f"--workdir={FIXTURE}", f"--to_hf={tmp_path}/full"], tmp_path)
  )
  assert "is not a new or empty directory" in line
