"""Hugging Face checkpoints in and out: safetensors weights, config.json and tokenizer.json.

  from reslm.hf import HFCheckpoint, export
  model = HFCheckpoint("/path/to/SmolLM-135M").load()   # checked, then placed shard by shard
  export(model, "/tmp/out")

weights.py (safetensors reading by positioned reads, sharded writing), layout.py / llama.py /
gpt2.py / bert.py / families.py (config.json <-> model settings and tensor layouts per family),
reader.py (import), export.py, runs.py (run directories: `python -m experiments.convert`). The
tokenizer is `reslm.data.hf_tokenizer` (`data.tokenizer="hf"`).
"""

from reslm.hf.export import export
from reslm.hf.reader import HFCheckpoint

__all__ = ["HFCheckpoint", "export"]
