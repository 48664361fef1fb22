"""Hugging Face checkpoints <-> run directories (what `python -m experiments.convert` does).

`convert(hf_dir, workdir, config)` makes a training run directory from a Hugging Face model: the
experiment config (its model section the imported architecture, its data section reading text
with the checkpoint's tokenizer), the ownership marker and a checkpoint of step 0 holding the
weights and a fresh optimizer state, written through `training.checkpoint.Checkpointer` (with its
checksum manifest) like any training step. `experiments.evaluate`, `generate` and `compress` then
read it as a trained run, and `experiments.train` with the same workdir continues training from
step 0 (fine-tuning); the run's config is `experiments/configs/hf.py:<workdir>`.

`export_run(workdir, out)` writes a run (or a compressed run from `experiments.compress`,
dequantised) back as a Hugging Face model directory.

Bad input is a one-line ValueError before any weight is read: an unsupported checkpoint (see
`reader.HFCheckpoint`), a workdir holding something else or a run already, bad settings.
"""

import os
from typing import Any

import jax
import ml_collections
from flax import nnx
from jax.sharding import NamedSharding

from reslm.data.hf_tokenizer import HFTokenizer
from reslm.hf.export import export as export_model
from reslm.hf.reader import HFCheckpoint, warn
from reslm.parallel import mesh as mesh_lib
from reslm.training import config as config_lib
from reslm.training import runs
from reslm.training.checkpoint import Checkpointer
from reslm.training.loop import placement
from reslm.training.optim import build_optimizer
from reslm.training.steps import TrainState

# Model settings a run may choose freely; the rest of the model section comes from config.json.
RUNTIME_SETTINGS = ("scan_layers", "remat")


def _refuse_existing_run(workdir: str) -> None:
  if os.path.isdir(os.path.join(workdir, "checkpoints")) and os.listdir(
    os.path.join(workdir, "checkpoints")
  ):
    raise ValueError(
      f"--workdir={workdir} already holds a run with checkpoints; convert into a new or empty "
      "directory (to fine-tune a converted run, train in its own workdir)"
    )


def prepare_config(
  cfg: ml_collections.ConfigDict, ckpt: HFCheckpoint, hf_dir: str
) -> ml_collections.ConfigDict:
  """The experiment config of the converted run: `cfg` with the imported model section, the
  objective the model kind needs, and the checkpoint's tokenizer for `data.tokenizer='hf'`."""
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.model = ml_collections.ConfigDict(ckpt.cfg.to_dict())
  cfg.data.objective = "mlm" if ckpt.cfg.kind == "encoder" else "causal"
  if cfg.data.tokenizer == "hf" and not cfg.data.get("tokenizer_path"):
    cfg.data.tokenizer_path = os.path.abspath(hf_dir)
  if cfg.data.seq_len > ckpt.cfg.max_seq_len:
    print(
      f"data.seq_len={cfg.data.seq_len} is longer than the model's {ckpt.cfg.max_seq_len} "
      f"positions; using {ckpt.cfg.max_seq_len}"
    )
    cfg.data.seq_len = ckpt.cfg.max_seq_len
  return cfg


def convert(
  hf_dir: str,
  workdir: str,
  cfg: ml_collections.ConfigDict,
  *,
  dtype: str | None = None,
  param_dtype: str | None = None,
) -> dict[str, Any]:
  """Makes `workdir` a run holding the Hugging Face model in `hf_dir` (see the module docstring).

  Args:
    hf_dir: The Hugging Face model directory.
    workdir: The new run directory (new or empty).
    cfg: An experiment config (e.g. `experiments/configs/hf.py`); its model section contributes
      only `RUNTIME_SETTINGS`, the rest comes from config.json.
    dtype, param_dtype: Compute / parameter dtypes (default: the checkpoint's stored dtype).

  Returns:
    A summary: model type, parameter count and dtype, mesh, notes.
  """
  runs.claim_workdir(workdir, write=False)  # Refused before anything is read.
  _refuse_existing_run(workdir)
  overrides = {k: cfg.model[k] for k in RUNTIME_SETTINGS if k in cfg.model}
  ckpt = HFCheckpoint(hf_dir, dtype=dtype, param_dtype=param_dtype, overrides=overrides)
  cfg = prepare_config(cfg, ckpt, hf_dir)
  config_lib.validate_experiment(cfg, num_devices=jax.device_count())
  tokenizer = None
  if os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
    tokenizer = HFTokenizer.from_path(hf_dir)
    if tokenizer.vocab_size > ckpt.cfg.vocab_size:
      raise ValueError(
        f"{hf_dir}/tokenizer.json has {tokenizer.vocab_size} tokens, more than the model's "
        f"vocab_size={ckpt.cfg.vocab_size}"
      )
  elif cfg.data.tokenizer == "hf":
    raise ValueError(f"{hf_dir} has no tokenizer.json; set data.tokenizer to another tokenizer")

  mesh = mesh_lib.make_mesh(cfg.parallel)
  place = placement(ckpt.cfg, cfg.train, cfg.parallel, mesh)
  shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), place.specs)
  model = ckpt.load(shardings)  # Each device's shards straight from the files.
  ckpt.close()
  params = nnx.to_pure_dict(nnx.state(model))
  del model
  tx = build_optimizer(cfg.train, params)
  create = jax.jit(lambda p: TrainState.create(p, tx), donate_argnums=0, out_shardings=place.state)
  state = create(params)  # The parameters move into the state (donated), no copy.
  meta = {
    "model": ckpt.cfg.to_dict(),
    "tokenizer": tokenizer.to_dict() if tokenizer is not None else None,
    "hf": {
      "model_type": ckpt.model_type,
      "config": ckpt.hf_config,
      "source": os.path.abspath(hf_dir),
    },
  }
  runs.claim_workdir(workdir)
  saver = Checkpointer(workdir, keep=cfg.checkpoint.keep, keep_best=False, async_save=False)
  saver.save(0, state, meta)
  saver.wait()
  saver.close()
  if jax.process_index() == 0:
    runs.write_config(cfg, workdir)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  return {
    "model_type": ckpt.model_type,
    "parameters": int(n_params),
    "param_dtype": ckpt.cfg.param_dtype,
    "dtype": ckpt.cfg.dtype,
    "mesh": {k: int(v) for k, v in mesh.shape.items()},
    "notes": ckpt.notes,
    "workdir": os.path.abspath(workdir),
  }


def _source_hf_meta(meta: dict[str, Any]) -> dict[str, Any] | None:
  """The imported checkpoint's meta of a run, or of the run a compressed model came from."""
  if meta.get("hf"):
    return meta["hf"]
  source = meta.get("compress", {}).get("source", {}).get("workdir")
  if not source or not os.path.isdir(source):
    return None
  try:
    reader = Checkpointer(source, keep_best=False, read_only=True)
    try:
      return reader.read_meta().get("hf")
    finally:
      reader.close()
  except ValueError:
    return None


def export_run(
  workdir: str, out: str, *, best: bool = False, max_shard_bytes: int = 5 * 2**30
) -> list[str]:
  """Writes the run (or compressed run) in `workdir` as a Hugging Face model directory `out`.

  Returns:
    Notes on what was dequantised or dropped.
  """
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise ValueError(f"--to_hf={out} is not a new or empty directory; choose another")
  if not os.path.isfile(os.path.join(workdir, "config.json")) and not os.path.isdir(
    os.path.join(workdir, "checkpoints")
  ):
    raise ValueError(f"--workdir={workdir} holds no run (no config.json or checkpoints/)")
  reader = Checkpointer(workdir, keep_best=best, read_only=True)
  try:
    meta = reader.read_meta(best=best)
  finally:
    reader.close()
  if "compress" in meta:
    from reslm.compress import load_compressed

    model, meta = load_compressed(workdir)
  else:
    from reslm.training import load_run

    _, model, meta, _ = load_run(workdir, best=best)
  hf_meta = _source_hf_meta(meta)
  tok = meta.get("tokenizer") or {}
  tokenizer_json = tok.get("tokenizer_json") if tok.get("name") == "hf" else None
  notes = export_model(
    model, out, hf_meta=hf_meta, tokenizer_json=tokenizer_json, max_shard_bytes=max_shard_bytes
  )
  if tokenizer_json is None:
    notes.append(f"no tokenizer.json written: this run's tokenizer is {tok.get('name')!r}")
  for note in notes:
    warn(note)
  return notes
