"""The library installs under one namespace, `reslm`, so user projects' own packages don't clash.

A user project with its own `models/` and `data/` packages (very common) must still import this
library's layers, build a model and run it; with nine top-level packages it could not. The wheel
must hold only `reslm/...` (no `experiments/`, whose benchmarks write next to themselves).
"""

import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ROOMS = (
  "models",
  "parallel",
  "compress",
  "kernels_pallas",
  "data",
  "training",
  "metrics",
  "inference",
  "hf",
)

USER_SCRIPT = """
import models, data  # the user's own packages, not the library's
assert models.OWNER == "user" and data.OWNER == "user", (models.__file__, data.__file__)

import jax, jax.numpy as jnp
from flax import nnx
from reslm.compress import rules  # failed with "No module named 'models.attention'" when shadowed
from reslm.models import ModelConfig, build_model
from reslm.models.attention import DenseAttention
import reslm.models

attn = DenseAttention(d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, causal=True, rngs=nnx.Rngs(0))
y, _ = attn(jnp.ones((1, 8, 32)), positions_bt=jnp.arange(8)[None])
assert y.shape == (1, 8, 32)
lm = build_model(ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, max_seq_len=16))
logits = lm(jnp.zeros((1, 8), jnp.int32)).logits
assert logits.shape == (1, 8, 64) and bool(jnp.isfinite(logits).all())
assert models.OWNER == "user"  # still the user's after the library imported its own
print("LIBRARY", reslm.models.__file__)
"""


def _user_project(tmp_path: pathlib.Path) -> pathlib.Path:
  project = tmp_path / "user_project"
  for name in ("models", "data"):
    (project / name).mkdir(parents=True)
    (project / name / "__init__.py").write_text('OWNER = "user"\n')
  (project / "main.py").write_text(textwrap.dedent(USER_SCRIPT))
  return project


def _run(project: pathlib.Path, pythonpath: str | None = None) -> str:
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("XLA_FLAGS", None)
  if pythonpath:
    env["PYTHONPATH"] = pythonpath
  proc = subprocess.run(
    [sys.executable, "main.py"], cwd=project, env=env, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


@pytest.mark.subprocess
def test_user_project_with_own_models_and_data_packages(tmp_path):
  out = _run(_user_project(tmp_path))
  assert "LIBRARY " in out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
  out = tmp_path_factory.mktemp("wheel")
  # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
  src = out / "src"
  ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
  for room in ROOMS:
    shutil.copytree(ROOT / room, src / room, ignore=ignore)
  for name in (
    "setup.py",
    "pyproject.toml",
    "README.md",
    "requirements.txt",
    "requirements-test.txt",
  ):
    shutil.copy(ROOT / name, src / name)
  subprocess.run(
    [
      sys.executable,
      "-m",
      "pip",
      "wheel",
      "-q",
      "--no-deps",
      "--no-build-isolation",
      "-w",
      str(out),
      str(src),
    ],
    check=True,
    capture_output=True,
    timeout=300,
  )
  (path,) = out.glob("reslm-*.whl")
  return path


@pytest.mark.subprocess
def test_wheel_holds_only_the_namespace(wheel):
  names = zipfile.ZipFile(wheel).namelist()
  code = [n for n in names if not n.startswith("reslm-")]  # minus the .dist-info folder
  assert code and all(n.startswith("reslm/") for n in code), sorted({n.split("/")[0] for n in code})
  assert "reslm/__init__.py" not in code  # a PEP 420 namespace: nothing at the top but the rooms
  assert {n.split("/")[1] for n in code} == set(ROOMS)
  # Every package folder of a room is in the wheel (setup.py finds them; nothing listed by hand).
  for room in ROOMS:
    for init in (ROOT / room).rglob("__init__.py"):
      assert f"reslm/{init.relative_to(ROOT).as_posix()}" in names


@pytest.mark.subprocess
def test_user_project_against_the_installed_wheel(tmp_path, wheel):
  site = tmp_path / "site"
  subprocess.run(
    [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
    check=True,
    capture_output=True,
    timeout=300,
  )
  out = _run(_user_project(tmp_path), pythonpath=str(site))
  assert f"LIBRARY {site}" in out, out  # the wheel's copy, not the checkout
