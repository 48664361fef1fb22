"""Built-in synthetic tasks that need no files: MQAR, copying and ListOps.

Every task is a function of a `np.random.Generator` and sizes that returns one batch in
next-token (decoder LM) layout: a token sequence `s` of length `seq_len + 1` gives
`inputs = s[:-1]`, `targets = s[1:]` (both `[batch, seq_len]` int32) and a float32 `weights` mask
that is 1 exactly at the positions a task scores. Token 0 is always the filler / pad token.

- `mqar`: multi-query associative recall (Zoology, Arora et al. 2023), the probe for how well a
  sequence mixer recalls key-value bindings from context.
- `copy_task`: copy a random string after a separator.
- `listops`: ListOps (Long Range Arena) nested MAX / MIN / MED / SM expressions over digits.

`TASKS` maps a task name to a `Task` giving its generator, default vocabulary and options.
"""

import dataclasses
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Batch = dict[str, np.ndarray]

PAD_ID = 0


def _lm_batch(seq: np.ndarray, weights: np.ndarray) -> Batch:
  """Shifts a `[batch, seq_len + 1]` sequence into inputs / targets of length seq_len."""
  return {
    "inputs": seq[:, :-1].astype(np.int32),
    "targets": seq[:, 1:].astype(np.int32),
    "weights": weights.astype(np.float32),
  }


def _distinct(rng: np.random.Generator, batch: int, population: int, k: int) -> np.ndarray:
  """Draws k distinct ints from [0, population) per row, shape [batch, k]."""
  return np.argsort(rng.random((batch, population)), axis=1)[:, :k]


# ---------------------------------------------------------------------------------------------
# MQAR
# ---------------------------------------------------------------------------------------------


def mqar_vocab_split(vocab_size: int) -> tuple[range, range]:
  """Returns the (key, value) token ranges: token 0 is filler, keys then values split the rest."""
  num_keys = (vocab_size - 1) // 2
  return range(1, 1 + num_keys), range(1 + num_keys, vocab_size)


def mqar(
  rng: np.random.Generator, batch: int, seq_len: int, vocab_size: int, num_kv_pairs: int = 8
) -> Batch:
  """Multi-query associative recall.

  The inputs are `k1 v1 ... kn vn` with distinct keys and distinct values, then a query region of
  filler 0 in which each of the n keys appears exactly once (random order, random non-overlapping
  places). The target at a queried key is its bound value; weights are 1 exactly there. As in
  Zoology, answers are never shown in the inputs: were each query followed by its value, the last
  query could be answered by elimination (the one value not yet used), a shortcut a small model
  finds long before it learns to recall.

  Args:
    rng: randomness source.
    batch: number of sequences.
    seq_len: model sequence length T.
    vocab_size: total vocabulary, split by `mqar_vocab_split`.
    num_kv_pairs: n, the number of bindings per sequence.

  Returns:
    A batch dict; `weights` has exactly n ones per row.

  Raises:
    ValueError: if the n pairs and n queries do not fit (4 n > seq_len + 1) or the vocabulary has
      fewer than n key or n value tokens.
  """
  n = num_kv_pairs
  if n < 1:
    raise ValueError(f"data.mqar.num_kv_pairs={n} must be >= 1")
  if 4 * n > seq_len + 1:
    raise ValueError(
      f"data.mqar.num_kv_pairs={n} needs data.seq_len >= {4 * n - 1} (4 tokens per pair: "
      f"the binding and its query); got data.seq_len={seq_len}"
    )
  key_tokens, value_tokens = mqar_vocab_split(vocab_size)
  if len(key_tokens) < n or len(value_tokens) < n:
    raise ValueError(
      f"data.vocab_size={vocab_size} is too small for data.mqar.num_kv_pairs={n}; "
      f"need at least {2 * n + 1} (filler + {n} keys + {n} values)"
    )
  length = seq_len + 1
  rows = np.arange(batch)[:, None]  # [batch, 1]

  keys = _distinct(rng, batch, len(key_tokens), n) + key_tokens.start  # [batch, n]
  values = _distinct(rng, batch, len(value_tokens), n) + value_tokens.start  # [batch, n]
  seq = np.full((batch, length), PAD_ID, dtype=np.int64)
  seq[:, 0 : 2 * n : 2] = keys
  seq[:, 1 : 2 * n : 2] = values

  # Non-overlapping (key, value) query slots, uniform over placements: choose n of the
  # region_len - n "compressed" slots, then shift the i-th chosen slot right by i.
  region_len = length - 2 * n
  slots = np.sort(_distinct(rng, batch, region_len - n, n), axis=1)  # [batch, n]
  starts = 2 * n + slots + np.arange(n)  # [batch, n], gaps >= 2
  order = np.argsort(rng.random((batch, n)), axis=1)  # [batch, n], which pair each slot asks
  seq[rows, starts] = np.take_along_axis(keys, order, axis=1)
  seq[rows, starts + 1] = np.take_along_axis(values, order, axis=1)

  weights = np.zeros((batch, seq_len), dtype=np.float32)
  weights[rows, starts] = 1.0
  out = _lm_batch(seq, weights)
  shown = starts + 1 < seq_len  # The last answer may fall past the inputs (targets only).
  out["inputs"][np.broadcast_to(rows, starts.shape)[shown], (starts + 1)[shown]] = PAD_ID
  return out


# ---------------------------------------------------------------------------------------------
# Copy
# ---------------------------------------------------------------------------------------------

COPY_SEPARATOR_ID = 1


def copy_task(rng: np.random.Generator, batch: int, seq_len: int, vocab_size: int) -> Batch:
  """Copying: `x sep x` (then filler when seq_len is odd), x of length seq_len // 2.

  Tokens 2..vocab_size-1 are content, 1 is the separator, 0 filler. Weights are 1 on the positions
  whose target is a token of the second copy (the separator and the first m - 1 copied tokens).

  Raises:
    ValueError: if seq_len < 2 or vocab_size < 3.
  """
  if seq_len < 2:
    raise ValueError(f"data.seq_len={seq_len} is too short for the copy task; need >= 2")
  if vocab_size < 3:
    raise ValueError(f"data.vocab_size={vocab_size} is too small for the copy task; need >= 3")
  m = seq_len // 2
  x = rng.integers(COPY_SEPARATOR_ID + 1, vocab_size, size=(batch, m))  # [batch, m]
  seq = np.full((batch, seq_len + 1), PAD_ID, dtype=np.int64)
  seq[:, :m] = x
  seq[:, m] = COPY_SEPARATOR_ID
  seq[:, m + 1 : 2 * m + 1] = x
  weights = np.zeros((batch, seq_len), dtype=np.float32)
  weights[:, m : 2 * m] = 1.0
  return _lm_batch(seq, weights)


# ---------------------------------------------------------------------------------------------
# ListOps
# ---------------------------------------------------------------------------------------------

LISTOPS_OPERATORS = ("MAX", "MIN", "MED", "SM")
LISTOPS_VOCAB = ("<pad>", *(str(d) for d in range(10)), *LISTOPS_OPERATORS, "[", "]", "=")
LISTOPS_IDS = {tok: i for i, tok in enumerate(LISTOPS_VOCAB)}
LISTOPS_VOCAB_SIZE = len(LISTOPS_VOCAB)
_LEAF_PROB = 0.25  # chance a non-root node is a digit, as in the LRA generator
_TRIES_PER_DEPTH = 10


def listops_tokenize(expr: str) -> list[str]:
  """Splits an expression like "[MAX 2 9 [MIN 4 7 ] 0 ]" into tokens ("[", "MAX", "2", ...)."""
  return expr.replace("[", " [ ").replace("]", " ] ").split()


def _apply(op: str, args: list[int]) -> int:
  if not args:
    raise ValueError(f"ListOps operator {op} has no arguments")
  if op == "MAX":
    return max(args)
  if op == "MIN":
    return min(args)
  if op == "MED":
    s = sorted(args)
    mid = len(s) // 2
    # Even counts take the floor of the mean of the two middle values, as LRA's int(np.median).
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) // 2
  if op == "SM":
    return sum(args) % 10
  raise ValueError(
    f"unknown ListOps operator {op!r}; choose one of: {', '.join(LISTOPS_OPERATORS)}"
  )


def evaluate_listops(expr: str | Sequence[str]) -> int:
  """Evaluates a ListOps expression (a string or its tokens) to a digit 0..9.

  Raises:
    ValueError: if the expression is malformed.
  """
  tokens = listops_tokenize(expr) if isinstance(expr, str) else list(expr)

  def parse(i: int) -> tuple[int, int]:
    if i >= len(tokens):
      raise ValueError(f"ListOps expression ends early: {' '.join(tokens)!r}")
    tok = tokens[i]
    if tok.isdigit() and len(tok) == 1:
      return int(tok), i + 1
    if tok != "[" or i + 1 >= len(tokens):
      raise ValueError(f"unexpected ListOps token {tok!r} at {i} in {' '.join(tokens)!r}")
    op, i = tokens[i + 1], i + 2
    args = []
    while i < len(tokens) and tokens[i] != "]":
      value, i = parse(i)
      args.append(value)
    if i >= len(tokens):
      raise ValueError(f"unclosed '[' in ListOps expression {' '.join(tokens)!r}")
    return _apply(op, args), i + 1

  value, end = parse(0)
  if end != len(tokens):
    raise ValueError(f"trailing tokens after ListOps expression {' '.join(tokens)!r}")
  return value


def _random_expression(
  prng: random.Random, depth: int, max_depth: int, max_args: int, out: list[str]
) -> None:
  """Appends a random expression's tokens to `out`; the root (depth 0) is always an operator."""
  if depth > 0 and (depth >= max_depth or prng.random() < _LEAF_PROB):
    out.append(str(prng.randrange(10)))
    return
  out.append("[")
  out.append(prng.choice(LISTOPS_OPERATORS))
  for _ in range(prng.randint(2, max_args)):
    _random_expression(prng, depth + 1, max_depth, max_args, out)
  out.append("]")


def _fitting_expression(prng: random.Random, budget: int, max_depth: int, max_args: int):
  """Draws expressions until one has <= budget tokens, lowering the depth after repeated misses."""
  for depth in range(max_depth, 1, -1):
    for _ in range(_TRIES_PER_DEPTH):
      out: list[str] = []
      _random_expression(prng, 0, depth, max_args, out)
      if len(out) <= budget:
        return out
  # Depth 1 is one operator over digits ("[", op, digits, "]"): cap its arity so it always fits.
  out = []
  _random_expression(prng, 0, 1, min(max_args, budget - 3), out)
  return out


def listops(
  rng: np.random.Generator, batch: int, seq_len: int, max_depth: int = 4, max_args: int = 5
) -> Batch:
  """ListOps in decoder-LM form: `expression = answer <pad>...`, scored only on the answer.

  Token ids follow `LISTOPS_VOCAB` (pad 0, digits 1..10, operators, "[", "]", "="). Expressions
  longer than seq_len - 1 tokens are redrawn, at lower depth after repeated misses.

  Args:
    rng: randomness source.
    batch: number of sequences.
    seq_len: model sequence length T.
    max_depth: maximum operator nesting (1 = one operator over digits).
    max_args: maximum arguments per operator (at least 2).

  Returns:
    A batch dict; `weights` is 1 only at the "=" position, whose target is the answer digit.

  Raises:
    ValueError: if seq_len < 6, max_depth < 1 or max_args < 2.
  """
  # The shortest sequence is "[ op d d ] = answer": 7 tokens, so seq_len + 1 >= 7.
  if seq_len < 6:
    raise ValueError(f"data.seq_len={seq_len} is too short for listops; need >= 6")
  if max_depth < 1:
    raise ValueError(f"data.listops.max_depth={max_depth} must be >= 1")
  if max_args < 2:
    raise ValueError(f"data.listops.max_args={max_args} must be >= 2")
  # Python's RNG is much faster than numpy scalar draws in this recursive loop.
  prng = random.Random(int(rng.integers(2**63)))
  budget = seq_len + 1 - 2  # room left for "=" and the answer
  seq = np.full((batch, seq_len + 1), LISTOPS_IDS["<pad>"], dtype=np.int64)
  weights = np.zeros((batch, seq_len), dtype=np.float32)
  for b in range(batch):
    expr = _fitting_expression(prng, budget, max_depth, max_args)
    tokens = [*expr, "=", str(evaluate_listops(expr))]
    seq[b, : len(tokens)] = [LISTOPS_IDS[t] for t in tokens]
    weights[b, len(expr)] = 1.0  # input "=", target the answer
  return _lm_batch(seq, weights)


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Task:
  """A synthetic task: its generator, vocabulary and the options read from `data.<name>`.

  Attributes:
    name: registry name (also the `data.source` value and the config sub-section).
    fn: the generator.
    default_vocab_size: vocabulary used when `data.vocab_size` is 0.
    fixed_vocab: the vocabulary is fixed by the task (no `vocab_size` argument).
    options: keyword arguments `fn` takes from the task's config sub-section.
  """

  name: str
  fn: Callable[..., Batch]
  default_vocab_size: int
  fixed_vocab: bool = False
  options: tuple[str, ...] = ()

  def resolve_vocab_size(self, requested: int) -> int:
    """Returns the vocabulary for `data.vocab_size=requested` (0 = the task default).

    Raises:
      ValueError: if the task has a fixed vocabulary and `requested` is another size.
    """
    if requested == 0:
      return self.default_vocab_size
    if self.fixed_vocab and requested != self.default_vocab_size:
      raise ValueError(
        f"data.vocab_size={requested} but {self.name} has a fixed vocabulary of "
        f"{self.default_vocab_size}; set data.vocab_size=0 or {self.default_vocab_size}"
      )
    return requested

  def generate(
    self, rng: np.random.Generator, batch: int, seq_len: int, vocab_size: int, **options: Any
  ) -> Batch:
    """Calls the generator with a uniform signature."""
    if self.fixed_vocab:
      return self.fn(rng, batch, seq_len, **options)
    return self.fn(rng, batch, seq_len, vocab_size, **options)


TASKS: dict[str, Task] = {
  # Zoology's MQAR default vocabulary.
  "mqar": Task("mqar", mqar, default_vocab_size=8192, options=("num_kv_pairs",)),
  "copy": Task("copy", copy_task, default_vocab_size=32),
  "listops": Task(
    "listops",
    listops,
    default_vocab_size=LISTOPS_VOCAB_SIZE,
    fixed_vocab=True,
    options=("max_depth", "max_args"),
  ),
}


def get_task(name: str) -> Task:
  """Returns the registered task.

  Raises:
    ValueError: listing the registered names, if `name` is not one.
  """
  if name not in TASKS:
    raise ValueError(
      f"data.source={name!r} is not a known synthetic task; choose one of: {', '.join(TASKS)}"
    )
  return TASKS[name]
