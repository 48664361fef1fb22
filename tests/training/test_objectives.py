"""Objective sections reach the loop through `training.objectives`, not by import of compress."""

import subprocess
import sys

import ml_collections
import pytest

from reslm.training import objectives


def test_training_does_not_import_the_packages_built_on_it():
  code = (
    "import sys, reslm.training, reslm.training.loop, reslm.training.config\n"
    "bad = sorted(m for m in sys.modules if m.startswith(('reslm.compress', 'experiments')))\n"
    "assert not bad, bad\n"
  )
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]


def test_distill_registers_its_section_when_imported():
  import reslm.compress.distill  # noqa: F401

  assert "distill" in objectives.SECTIONS


def test_setup_without_a_section_keeps_the_dataset():
  cfg = ml_collections.ConfigDict({"train": {"steps": 1}})
  assert objectives.setup(cfg, None, "dataset", "/nowhere") == (None, "dataset")


def test_two_objective_sections_are_refused(monkeypatch):
  monkeypatch.setitem(
    objectives.SECTIONS, "other", objectives.ObjectiveSection(validate=print, setup=print)
  )
  monkeypatch.setitem(
    objectives.SECTIONS, "again", objectives.ObjectiveSection(validate=print, setup=print)
  )
  cfg = ml_collections.ConfigDict({"other": {}, "again": {}})
  with pytest.raises(ValueError, match="several objective sections"):
    objectives.sections_in(cfg)
