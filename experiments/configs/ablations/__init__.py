"""Sweeps for `experiments.ablate`: each file defines `get_ablation(arg)`."""
