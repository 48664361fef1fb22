"""`experiments.benchmarks.compress --smoke`: trains a tiny model, compresses it by three rows and
writes a JSON whose columns, baseline and Pareto front are consistent; bad rows fail in one line."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
from flax import nnx

from reslm.metrics import pareto_front
from tests.shared_runs import pseudo_english

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _run(*args, cwd=ROOT):
  # One CPU device, as the benchmark runs (conftest gives this process 8).
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  cmd = [sys.executable, "-m", "experiments.benchmarks.compress", *args]
  return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_smoke_writes_consistent_table(tmp_path):
  data = tmp_path / "text.txt"
  data.write_text(pseudo_english(40_000))
  results = tmp_path / "results"
  proc = _run(
    "--smoke",
    f"--data={data}",
    f"--workdir={tmp_path / 'work'}",
    f"--results={results}",
    "--matmul_m=4",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads((results / "compress.json").read_text())
  assert (results / "compress.png").stat().st_size > 0
  rows = {r["method"]: r for r in out["rows"]}
  assert list(rows) == ["float", "rtn_int8", "magnitude50"]
  for r in out["rows"]:
    assert set(out["columns"]) <= set(r), set(out["columns"]) - set(r)
    assert r["decode_tokens_per_s"] > 0
  base = rows["float"]
  # The float row is compared with itself: exact fidelity, unit ratios.
  assert base["top1_agreement"] == 1.0 and abs(base["kl"]) < 1e-6
  assert base["ratio"] == 1.0 and base["decode_ratio"] == 1.0 and base["greedy_match"] == 1.0
  # Every row's val-loss change is against the same float loss.
  for r in out["rows"]:
    want = 100 * (r["val_loss"] - base["val_loss"]) / base["val_loss"]
    np.testing.assert_allclose(r["loss_change_pct"], want, rtol=1e-4, atol=1e-6)
  # int8 weights: about a quarter of the float32 projection bytes; embeddings stay float.
  assert 1.5 < rows["rtn_int8"]["ratio"] < 4.0
  assert rows["rtn_int8"]["zero_fraction"] < 0.05
  # Magnitude 50% on every projection: close to half the weights are zero.
  assert 0.3 < rows["magnitude50"]["zero_fraction"] <= 0.5
  idx = pareto_front(
    [r["stored_bytes"] for r in out["rows"]],
    [r["val_loss"] for r in out["rows"]],
    higher_quality_is_better=False,
  )
  assert out["pareto_front"] == [out["rows"][i]["method"] for i in idx]
  # The model's own projection shapes were timed, the int8 dot checked exact.
  assert {m["k"] for m in out["matmul"]} >= {out["setup"]["model"]["d_model"]}
  assert all(m["m"] == 4 and m["seconds"]["int8"] > 0 for m in out["matmul"])


def test_unknown_row_is_one_line_error(tmp_path):
  proc = _run("--rows=nope", f"--workdir={tmp_path}", "--run=/nonexistent")
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1].startswith("error: --rows has 'nope'")


def test_zero_fraction_counts_compressed_projections():
  """Magnitude 50% then int8 on the MLPs: the int8 layers' zeros count (the old count skipped
  compressed layers and saw only the float ones)."""
  from reslm.compress import apply_rules
  from reslm.compress.pipeline import zero_fraction
  from reslm.models import build_model
  from tests.compress.common import CFG

  model = build_model(CFG)
  apply_rules(model, [{"path": r".*/mlp/.*", "method": "magnitude", "settings": {"sparsity": 0.5}}])
  mlp = [(b.mlp.gate, b.mlp.up, b.mlp.down) for b in model.layers.groups.blocks]
  pruned_zeros = sum(int((np.asarray(m.kernel[...]) == 0).sum()) for ms in mlp for m in ms)
  total = sum(
    int(np.asarray(var[...]).size)
    for path, var in nnx.iter_graph(model)
    if path and path[-1] == "kernel" and isinstance(var, nnx.Param)
  )
  before = zero_fraction(model)
  apply_rules(model, [{"path": r".*/mlp/.*", "method": "int8"}])
  after = zero_fraction(model)
  assert pruned_zeros / total <= before < pruned_zeros / total + 0.01  # float: pruned + chance 0s
  assert pruned_zeros / total <= after < pruned_zeros / total + 0.02  # int8 keeps them
