"""Hugging Face checkpoints in and out: safetensors weights, config.json and tokenizer.json."""
