"""Fixtures shared by the data tests: a generated multilingual corpus and a file holding it."""

import numpy as np
import pytest

_SYLLABLES = ("ka", "to", "ri", "mé", "sö", "lu", "ne", "pa", "日", "本", "qu", "ix", "zé")


def make_corpus(num_lines: int = 300, seed: int = 0) -> str:
  """Returns deterministic text of a few thousand chars with non-ASCII characters."""
  rng = np.random.default_rng(seed)
  lines = []
  for _ in range(num_lines):
    words = [
      "".join(rng.choice(_SYLLABLES, size=rng.integers(1, 4))) for _ in range(rng.integers(2, 7))
    ]
    lines.append(" ".join(words) + rng.choice([".", ",", "!", "?", ""]))
  return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def corpus() -> str:
  return make_corpus()


@pytest.fixture
def corpus_file(tmp_path, corpus):
  path = tmp_path / "corpus.txt"
  path.write_text(corpus, encoding="utf-8")
  return path
