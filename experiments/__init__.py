"""Experiment configs, thin absl entry points and benchmark scripts."""
