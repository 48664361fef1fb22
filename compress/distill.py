"""Knowledge distillation from a trained run into a new student, through the normal training loop.

An experiment config with a `distill` section (see `get_default_config`) trains its `model` as a
student of the run in `distill.teacher_workdir`:

- white_box: the frozen teacher runs in the same compiled step as the student on every batch, and
  the loss per token is (1 - alpha) CE(student, labels) + alpha T^2 KL(teacher_T || student_T)
  (Hinton et al. 2015; both distributions softened by the temperature T), plus optionally
  hidden_weight x MSE between chosen student and teacher residual streams, the student's mapped
  through a learned linear projection when the widths differ (FitNets / TinyBERT). The
  projections are the objective's own parameters: optimised and checkpointed with the student,
  dropped when the student is loaded.
- black_box: only the teacher's samples are used (sequence-level KD, Kim & Rush 2016). A corpus
  of sequences sampled from the teacher (prompted by training-data prefixes or BOS) is generated
  once, deterministically from `black_box.seed`, saved as `teacher_samples.npz` in the workdir,
  and the student trains on it with plain cross-entropy on the generated tokens.

Either way eval is plain cross-entropy on the real validation split, so a distilled student and one
trained from scratch compare directly.
"""

import json
import math
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from reslm.training import load_run, objectives
from reslm.training.steps import Objective

MODES = ("white_box", "black_box")
PROMPTS = ("data", "bos")
SAMPLES_FILE = "teacher_samples.npz"
_SAMPLES_STREAM = 11  # Seed stream of the black-box batch draws (data.pipeline uses 0-3).
_LAYER_MAP = re.compile(r"^\s*\d+\s*:\s*\d+\s*(,\s*\d+\s*:\s*\d+\s*)*$")


def get_default_config() -> ml_collections.ConfigDict:
  """The `distill` section of an experiment config."""
  return ml_collections.ConfigDict(
    dict(
      teacher_workdir="/tmp/shakespeare_char",  # A run trained by experiments.train.
      teacher_best=False,  # Use the teacher's best (lowest eval loss) checkpoint.
      mode="white_box",  # white_box | black_box
      temperature=2.0,  # white_box: softening of both distributions.
      alpha=0.5,  # white_box: weight of the T^2-scaled KL; 1 - alpha on the label CE.
      hidden_weight=0.0,  # white_box: weight of the hidden-state MSE; 0 turns it off.
      # "s:t,...": student residual stream s matches the teacher's t; 0 is the embedding output
      # and i the output of block group i. "" pairs each student group with the teacher group
      # at the same relative depth.
      layer_map="",
      black_box=ml_collections.ConfigDict(
        dict(
          num_sequences=2048,  # Sequences in the teacher corpus.
          prompt="data",  # data (training-text prefixes) | bos
          prompt_len=4,  # Tokens of each data prefix; generation fills the rest.
          temperature=1.0,
          top_k=0,
          top_p=1.0,
          seed=0,
          batch_size=64,  # Sequences generated per compiled call.
        )
      ),
    )
  )


# ---------------------------------------------------------------------------------------------
# Losses (pure functions)
# ---------------------------------------------------------------------------------------------


def soft_kl(teacher_logits: jax.Array, student_logits: jax.Array, temperature: float) -> jax.Array:
  """KL(softmax(teacher / T) || softmax(student / T)) per position, [..., vocab] -> [...]."""
  t_logp = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  s_logp = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  return jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1)


def logit_losses(student_logits, teacher_logits, targets, *, temperature: float, alpha: float):
  """Per-token white-box losses, each [batch, seq].

  Returns:
    (total, ce, kl): total = (1 - alpha) ce + alpha T^2 kl, where ce is the student's label
    cross-entropy and kl the softened `soft_kl`. T^2 keeps the KL's gradient on the scale of the
    CE's as T grows (its gradient w.r.t. the logits shrinks as 1 / T^2).
  """
  ce = optax.softmax_cross_entropy_with_integer_labels(student_logits.astype(jnp.float32), targets)
  kl = soft_kl(teacher_logits, student_logits, temperature)
  return (1.0 - alpha) * ce + alpha * temperature**2 * kl, ce, kl


class HiddenProjection(nnx.Module):
  """A learned linear map per matched layer pair, student width -> teacher width.

  Args:
    num_pairs: Matched (student, teacher) layer pairs.
    student_dim, teacher_dim: Residual widths.
    rngs: Random streams.
  """

  def __init__(self, num_pairs: int, student_dim: int, teacher_dim: int, *, rngs: nnx.Rngs):
    shape = (num_pairs, student_dim, teacher_dim)
    # Variance-preserving init: projected streams start on the teacher's scale, not near zero.
    self.kernel = nnx.Param(student_dim**-0.5 * jax.random.normal(rngs.params(), shape))

  def __call__(self, h_pbtd: jax.Array) -> jax.Array:
    """[pairs, batch, seq, student_dim] -> float32 [pairs, batch, seq, teacher_dim]."""
    return jnp.einsum("pbtd,pde->pbte", h_pbtd.astype(jnp.float32), self.kernel[...])


def hidden_mse(student_hidden, teacher_hidden, projection: HiddenProjection | None) -> jax.Array:
  """Mean over pairs and features of (projection(student) - teacher)^2, per token.

  Args:
    student_hidden: [pairs, batch, seq, student_dim], the matched student residual streams.
    teacher_hidden: [pairs, batch, seq, teacher_dim].
    projection: The pairs' projections; None compares directly (equal widths).

  Returns:
    float32 [batch, seq].
  """
  s = student_hidden.astype(jnp.float32) if projection is None else projection(student_hidden)
  return jnp.mean((s - teacher_hidden.astype(jnp.float32)) ** 2, axis=(0, -1))


def layer_pairs(layer_map: str, student_groups: int, teacher_groups: int) -> list[tuple[int, int]]:
  """Parses `distill.layer_map` ("" = each student group at the teacher's relative depth).

  Raises:
    ValueError: An index outside [0, groups] of its model.
  """
  if not layer_map.strip():
    return [(s, round(s * teacher_groups / student_groups)) for s in range(1, student_groups + 1)]
  pairs = [tuple(int(v) for v in item.split(":")) for item in layer_map.split(",")]
  for s, t in pairs:
    if not (0 <= s <= student_groups and 0 <= t <= teacher_groups):
      raise ValueError(
        f"distill.layer_map={layer_map!r} names {s}:{t}, but the student has residual streams "
        f"0..{student_groups} and the teacher 0..{teacher_groups} (0 = embeddings)"
      )
  return pairs


# ---------------------------------------------------------------------------------------------
# Config checks and the teacher
# ---------------------------------------------------------------------------------------------


def validate_config(cfg: ml_collections.ConfigDict, *, pipeline: bool = False) -> None:
  """Checks the `distill` section alone (the teacher is checked by `setup`).

  Raises:
    ValueError: One line naming the first bad setting, its value and what is allowed.
  """
  d = cfg.distill
  if d.mode not in MODES:
    raise ValueError(f"distill.mode={d.mode!r} is not known; choose one of: {', '.join(MODES)}")
  if not d.teacher_workdir:
    raise ValueError("distill.teacher_workdir='' is empty; give the workdir of a trained run")
  if cfg.model.kind != "decoder":
    raise ValueError(f"distillation needs a decoder student; model.kind={cfg.model.kind!r}")
  if pipeline:
    raise ValueError("distillation does not run with a pipeline mesh axis; set parallel.pipeline=1")
  if d.temperature <= 0:
    raise ValueError(f"distill.temperature={d.temperature} must be > 0")
  if not 0.0 <= d.alpha <= 1.0:
    raise ValueError(f"distill.alpha={d.alpha} must be in [0, 1]")
  if d.hidden_weight < 0:
    raise ValueError(f"distill.hidden_weight={d.hidden_weight} must be >= 0")
  if d.layer_map and not _LAYER_MAP.match(d.layer_map):
    raise ValueError(f"distill.layer_map={d.layer_map!r} must look like '1:2,2:4' (or be '')")
  b = d.black_box
  if b.prompt not in PROMPTS:
    raise ValueError(
      f"distill.black_box.prompt={b.prompt!r} is not known; choose one of: {', '.join(PROMPTS)}"
    )
  for name in ("num_sequences", "batch_size", "prompt_len"):
    if b[name] <= 0:
      raise ValueError(f"distill.black_box.{name}={b[name]} must be > 0")
  if b.temperature < 0 or b.top_k < 0 or not 0 < b.top_p <= 1:
    raise ValueError(
      f"distill.black_box needs temperature >= 0 (got {b.temperature}), top_k >= 0 (got "
      f"{b.top_k}) and 0 < top_p <= 1 (got {b.top_p})"
    )


def load_teacher(cfg: ml_collections.ConfigDict, model_cfg, dataset):
  """The frozen teacher model and its checkpoint meta, checked against the student.

  Raises:
    ValueError: No trained run in `distill.teacher_workdir`, or a teacher whose vocabulary or
      tokenizer differs from the student's.
  """
  d = cfg.distill
  if not os.path.exists(os.path.join(d.teacher_workdir, "config.json")):
    raise ValueError(
      f"distill.teacher_workdir={d.teacher_workdir!r} holds no trained run (no config.json); "
      "train the teacher there first"
    )
  _, teacher, meta, step = load_run(d.teacher_workdir, best=d.teacher_best)
  if teacher.cfg.kind != "decoder":
    raise ValueError(f"the teacher in {d.teacher_workdir!r} is a {teacher.cfg.kind}, not a decoder")
  if teacher.cfg.vocab_size != model_cfg.vocab_size:
    raise ValueError(
      f"the teacher's vocab_size={teacher.cfg.vocab_size} differs from the student's "
      f"{model_cfg.vocab_size}; distillation needs the same tokens (same data.tokenizer and path)"
    )
  student_tok = dataset.tokenizer.to_dict() if dataset.tokenizer is not None else None
  if meta.get("tokenizer") != student_tok:
    raise ValueError(
      f"the teacher in {d.teacher_workdir!r} was trained with another tokenizer than the "
      "student's data; use the teacher's data settings"
    )
  return teacher, {**meta, "step": step}


def setup(cfg: ml_collections.ConfigDict, model_cfg, dataset, workdir: str):
  """The loop's hook: (objective or None, training dataset) for the `distill` section."""
  teacher, meta = load_teacher(cfg, model_cfg, dataset)
  if cfg.distill.mode == "white_box":
    return white_box_objective(cfg.distill, teacher, model_cfg), dataset
  return None, black_box_dataset(cfg, teacher, meta, dataset, workdir)


# ---------------------------------------------------------------------------------------------
# White box
# ---------------------------------------------------------------------------------------------


def white_box_objective(
  d: ml_collections.ConfigDict, teacher: nnx.Module, student_cfg
) -> Objective:
  """The white-box `Objective`: teacher logits (and hidden states) computed in the step.

  Args:
    d: The `distill` section.
    teacher: The trained teacher; its parameters become the step's frozen input.
    student_cfg: The student's `ModelConfig`.
  """
  t_graphdef, t_state = nnx.split(teacher)
  use_hidden = d.hidden_weight > 0
  pairs = []
  if use_hidden:
    s_groups = student_cfg.num_layers // student_cfg.group_size
    t_groups = teacher.cfg.num_layers // teacher.cfg.group_size
    pairs = layer_pairs(d.layer_map, s_groups, t_groups)
  s_idx, t_idx = jnp.array([s for s, _ in pairs]), jnp.array([t for _, t in pairs])
  project = use_hidden and student_cfg.d_model != teacher.cfg.d_model

  def make_projection():
    return HiddenProjection(
      len(pairs), student_cfg.d_model, teacher.cfg.d_model, rngs=nnx.Rngs(params=0)
    )

  p_graphdef = nnx.graphdef(nnx.eval_shape(make_projection)) if project else None

  def loss(out, batch, proj_params, frozen):
    teacher_out = nnx.merge(t_graphdef, frozen)(batch["inputs"], return_hidden=use_hidden)
    t_logits = jax.lax.stop_gradient(teacher_out.logits)  # The teacher only informs.
    total, ce, kl = logit_losses(
      out.logits, t_logits, batch["targets"], temperature=d.temperature, alpha=d.alpha
    )
    w = batch["weights"].astype(jnp.float32)
    loss_sum = jnp.sum(total * w)
    terms = {"ce": jnp.sum(ce * w), "kl": jnp.sum(kl * w)}
    if use_hidden:
      t_hidden = jax.lax.stop_gradient(teacher_out.hidden[t_idx])
      projection = nnx.merge(p_graphdef, proj_params) if project else None
      mse = hidden_mse(out.hidden[s_idx], t_hidden, projection)
      loss_sum = loss_sum + d.hidden_weight * jnp.sum(mse * w)
      terms["hidden_mse"] = jnp.sum(mse * w)
    return loss_sum, terms

  return Objective(
    loss=loss,
    forward=(lambda model, x: model(x, return_hidden=True)) if use_hidden else None,
    frozen=nnx.to_pure_dict(t_state),
    init_params=(lambda: nnx.to_pure_dict(nnx.state(make_projection()))) if project else None,
  )


# ---------------------------------------------------------------------------------------------
# Black box
# ---------------------------------------------------------------------------------------------


def sample_corpus(
  teacher: nnx.Module,
  prompts: np.ndarray,
  *,
  length: int,
  seed: int,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  batch_size: int = 64,
) -> np.ndarray:
  """Continues every prompt to `length` tokens with the teacher, deterministically from `seed`.

  Args:
    teacher: A decoder LM.
    prompts: int [num_sequences, prompt_len].
    length: Tokens per returned sequence (prompt included), at most the teacher's max_seq_len.
    seed: Chunk i of `batch_size` prompts samples with `fold_in(key(seed), i)`.
    temperature, top_k, top_p: The sampling rule (`inference.sample_logits`).
    batch_size: Sequences per compiled generation call (the last chunk is padded).

  Returns:
    int32 [num_sequences, length].
  """
  from reslm.inference import generate

  n, p = prompts.shape
  if not 0 < p < length:
    raise ValueError(f"prompts of {p} tokens cannot grow to {length}-token sequences")
  chunks = []
  for i, start in enumerate(range(0, n, batch_size)):
    chunk = prompts[start : start + batch_size]
    rows = len(chunk)
    chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - rows, axis=0)])  # One shape.
    out = generate(
      teacher,
      chunk,
      max_new_tokens=length - p,
      rng=jax.random.fold_in(jax.random.key(seed), i),
      temperature=temperature,
      top_k=top_k,
      top_p=top_p,
    )
    chunks.append(np.asarray(out)[:rows])
  return np.concatenate(chunks).astype(np.int32)


def corpus_prompts(cfg: ml_collections.ConfigDict, tokenizer, num: int) -> np.ndarray:
  """`num` prompts: training-text prefixes drawn like training batches, or the BOS token.

  Raises:
    ValueError: prompt="bos" with a tokenizer that has no BOS token.
  """
  b = cfg.distill.black_box
  if b.prompt == "bos":
    bos = getattr(tokenizer, "bos_id", None)
    if bos is None:
      raise ValueError(
        "distill.black_box.prompt='bos' but the tokenizer has no BOS token; use prompt='data'"
      )
    return np.full((num, 1), bos, np.int32)
  from reslm import data as data_lib

  full = data_lib.build_dataset(cfg.data)  # All rows, whatever the process count.
  per = full.batch_size
  rows = [full.train_batch(i)["inputs"][:, : b.prompt_len] for i in range(math.ceil(num / per))]
  return np.concatenate(rows)[:num]


def teacher_corpus(
  cfg: ml_collections.ConfigDict, teacher, teacher_meta: dict, tokenizer, workdir: str
) -> np.ndarray:
  """The black-box corpus [num_sequences, length]: read from the workdir, or sampled and saved.

  A saved corpus is reused only if it was made with the same settings from the same teacher
  checkpoint (so a resumed run trains on the same sequences); sampling is deterministic anyway.
  """
  b = cfg.distill.black_box
  length = min(cfg.data.seq_len + 1, teacher.cfg.max_seq_len)
  settings = json.dumps(
    {
      "teacher": [os.path.abspath(cfg.distill.teacher_workdir), teacher_meta["step"]],
      "teacher_best": cfg.distill.teacher_best,
      "black_box": b.to_dict(),
      "length": length,
      "data_seed": cfg.data.seed,
    },
    sort_keys=True,
  )
  path = os.path.join(workdir, SAMPLES_FILE)
  if os.path.exists(path):
    with np.load(path) as saved:
      if str(saved["settings"]) == settings:
        return saved["tokens"]
  prompts = corpus_prompts(cfg, tokenizer, b.num_sequences)
  tokens = sample_corpus(
    teacher,
    prompts,
    length=length,
    seed=b.seed,
    temperature=b.temperature,
    top_k=b.top_k,
    top_p=b.top_p,
    batch_size=b.batch_size,
  )
  if jax.process_index() == 0:
    tmp = path + ".tmp.npz"
    np.savez(tmp, tokens=tokens, settings=np.array(settings))
    os.replace(tmp, path)
  return tokens


class TeacherSamples:
  """A `data.Dataset` whose train batches are rows of the teacher corpus; all else is the base's.

  Each row of length L gives inputs row[:-1] and targets row[1:], right-padded to data.seq_len with
  weight 0 when the teacher's context made L shorter; targets inside the prompt get weight 0, so
  the student learns only from generated tokens. Draws are a pure function of (seed, step).
  """

  def __init__(self, base, tokens: np.ndarray, prompt_len: int, seed: int):
    self._base = base
    self._tokens = tokens  # [num_sequences, length]
    self._prompt_len = prompt_len
    self._seed = seed

  def __getattr__(self, name):  # Eval batches, tokenizer, vocab, bytes per token, ...
    return getattr(self._base, name)

  def train_batch(self, step: int):
    if step < 0:
      raise ValueError(f"step={step} must be >= 0")
    base = self._base
    rng = np.random.default_rng([self._seed, _SAMPLES_STREAM, step])
    per = base.batch_size // base.process_count
    rows = rng.integers(0, len(self._tokens), base.batch_size)
    seqs = self._tokens[rows[base.process_index * per : (base.process_index + 1) * per]]
    n = seqs.shape[1] - 1
    pad = base.seq_len - n
    weights = np.zeros((len(seqs), base.seq_len), np.float32)
    weights[:, self._prompt_len - 1 : n] = 1.0  # Targets that the teacher generated.
    return {
      "inputs": np.pad(seqs[:, :-1], ((0, 0), (0, pad))).astype(np.int32),
      "targets": np.pad(seqs[:, 1:], ((0, 0), (0, pad))).astype(np.int32),
      "weights": weights,
    }

  def describe(self) -> str:
    return (
      f"{len(self._tokens)} teacher-sampled sequences of {self._tokens.shape[1]} tokens for "
      f"training; eval on {self._base.describe()}"
    )


def black_box_dataset(cfg: ml_collections.ConfigDict, teacher, teacher_meta, dataset, workdir):
  """The student's training data: the teacher corpus, with the real dataset's eval batches."""
  b = cfg.distill.black_box
  prompt_len = 1 if b.prompt == "bos" else b.prompt_len
  length = min(cfg.data.seq_len + 1, teacher.cfg.max_seq_len)
  if prompt_len >= length:
    raise ValueError(
      f"distill.black_box.prompt_len={prompt_len} leaves nothing to generate in {length}-token "
      "sequences; use a shorter prompt"
    )
  tokens = teacher_corpus(cfg, teacher, teacher_meta, dataset.tokenizer, workdir)
  return TeacherSamples(dataset, tokens, prompt_len, cfg.data.seed)


objectives.register_section("distill", validate=validate_config, setup=setup)
