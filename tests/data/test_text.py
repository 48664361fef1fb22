"""Local text loading through the `datasets` text builder, and its errors."""

import pytest

from reslm.data.text import load_text, looks_local


def test_single_file_comes_back_exactly(corpus_file, corpus):
  assert load_text(str(corpus_file)) == corpus


def test_directory_and_glob_join_files_in_sorted_order(tmp_path):
  (tmp_path / "b.txt").write_text("second\n")
  (tmp_path / "a.txt").write_text("first\n")
  (tmp_path / "skip.json").write_text("{}")
  assert load_text(str(tmp_path)) == "first\n\nsecond\n"
  assert load_text(str(tmp_path / "*.txt")) == "first\n\nsecond\n"


def test_local_and_hub_names_are_told_apart(corpus_file):
  assert looks_local(str(corpus_file))
  assert looks_local("./missing") and looks_local("~/corpus") and looks_local("/abs/path")
  assert looks_local("notes.txt") and looks_local("shards/*.txt") and looks_local("a/b/c")
  assert not looks_local("roneneldan/TinyStories") and not looks_local("wikitext")


def test_missing_path(tmp_path):
  missing = str(tmp_path / "nope.txt")
  with pytest.raises(ValueError, match=r"^data\.path='.*nope\.txt' does not exist$"):
    load_text(missing)
  with pytest.raises(ValueError, match="does not exist"):
    load_text(str(tmp_path / "*.md"))
  with pytest.raises(ValueError, match="is a directory with no .txt files"):
    load_text(str(tmp_path))


def test_empty_file_and_empty_path(tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  with pytest.raises(ValueError, match=r"^data\.path='.*empty\.txt' is empty"):
    load_text(str(empty))
  with pytest.raises(ValueError, match=r"^data\.path='' is empty"):
    load_text("")


def test_missing_text_field_lists_columns(corpus_file):
  with pytest.raises(ValueError, match=r"data\.text_field='content'.*available columns: text"):
    load_text(str(corpus_file), text_field="content")
