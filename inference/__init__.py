"""Decoding: sampling rules and KV-cached generation inside one jitted loop."""

from reslm.inference.sampling import generate, sample_logits

__all__ = ["generate", "sample_logits"]
