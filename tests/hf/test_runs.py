"""Run directories from Hugging Face checkpoints (in process): an encoder converted onto the
default mesh (8 devices, data parallel: every parameter replicated), read back by `load_run`
with the checkpoint's weights and tokenizer, evaluated on masked-LM batches, exported again."""

import jax
import numpy as np
import pytest
from flax import nnx

from experiments.configs import hf as hf_config
from reslm.data import build_dataset
from reslm.data.tokenizers import tokenizer_from_dict
from reslm.hf import runs
from reslm.hf.reader import HFCheckpoint
from reslm.training import load_run, make_eval_step
from tests.hf.common import FIXTURES
from tests.shared_runs import pseudo_english


def _params(model) -> dict:
  flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model)))[0]
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("bert_run")
  (root / "text.txt").write_text(pseudo_english(20_000))
  cfg = hf_config.get_config("smoke")
  cfg.data.update(path=str(root / "text.txt"), batch_size=8)  # one row per device
  summary = runs.convert(str(FIXTURES / "bert_pretraining"), str(root / "run"), cfg)
  return root, summary


def test_converted_encoder_run_holds_the_checkpoint(bert_run):
  root, summary = bert_run
  assert summary["model_type"] == "bert" and summary["mesh"]["data"] == jax.device_count()
  cfg, model, meta, step = load_run(str(root / "run"))
  assert step == 0 and cfg.data.objective == "mlm" and cfg.data.tokenizer == "hf"
  assert cfg.data.seq_len == 32  # the smoke variant's, within the model's 64 positions
  want = _params(HFCheckpoint(FIXTURES / "bert_pretraining").load())
  got = _params(model)
  assert got.keys() == want.keys() and all(np.array_equal(v, want[k]) for k, v in got.items())
  tok = tokenizer_from_dict(meta["tokenizer"])
  assert tok.mask_id == 4 and tok.encode("we hold").tolist()[0] == tok.bos_id  # [CLS] first
  dataset = build_dataset(cfg.data)
  graphdef, params = nnx.split(model)
  sums = jax.jit(make_eval_step(graphdef))(nnx.to_pure_dict(params), dataset.eval_batches(1)[0])
  assert float(sums["weight"]) > 0 and np.isfinite(float(sums["loss_sum"]))


def test_export_of_the_run_reads_back_identically(bert_run, tmp_path):
  root, _ = bert_run
  notes = runs.export_run(str(root / "run"), str(tmp_path / "out"))
  assert notes == []
  again = HFCheckpoint(tmp_path / "out")
  assert again.model_type == "bert" and (tmp_path / "out" / "tokenizer.json").exists()
  want = _params(HFCheckpoint(FIXTURES / "bert_pretraining").load())
  got = _params(again.load())
  assert all(np.array_equal(v, want[k]) for k, v in got.items())


def test_converting_into_a_run_with_checkpoints_is_refused(bert_run):
  root, _ = bert_run
  cfg = hf_config.get_config("smoke")
  with pytest.raises(ValueError, match=r"already holds a run with checkpoints") as e:
    runs.convert(str(FIXTURES / "gpt2"), str(root / "run"), cfg)
  assert "\n" not in str(e.value)
