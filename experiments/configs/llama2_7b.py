"""A Llama-2-7B-shaped decoder trained with FSDP on a Cloud TPU slice: the planning config.

Plan on any machine (no TPU; libtpu from requirements-test.txt), then launch on the slice:

  JAX_PLATFORMS=cpu python -m experiments.train --config=experiments/configs/llama2_7b.py \
      --compile_only --topology=v5e-16

  gcloud compute tpus tpu-vm create llama7b --zone=$ZONE --accelerator-type=v5litepod-16 \
      --version=v2-alpha-tpuv5-lite
  gcloud compute tpus tpu-vm scp --recurse . llama7b:~/repo --zone=$ZONE --worker=all
  gcloud compute tpus tpu-vm ssh llama7b --zone=$ZONE --worker=all \
      --command="cd repo && pip install -r requirements.txt 'jax[tpu]==0.12.0.1' && \
      pip install --no-deps -e ."
  gcloud compute tpus tpu-vm ssh llama7b --zone=$ZONE --worker=all --command="cd repo && \
      python -m experiments.train --config=experiments/configs/llama2_7b.py \
      --workdir=/mnt/gcs/llama7b --multihost --config.data.path=<tokenized corpus>"

Shape of Llama 2 7B (Touvron et al. 2023): vocabulary 32000, width 4096, 32 layers, 32 heads of
128, SwiGLU 11008, RMSNorm, RoPE, untied embeddings; sequences of 2048 tokens. bfloat16 compute
with float32 parameters and AdamW state, FSDP over every chip (`parallel.fsdp=-1`), layers scanned.
The batch is per chip: `batch_size` = per-chip batch x 16 chips of a v5e-16 (override
`data.batch_size` for other slices; `experiments/benchmarks/tpu_plan.py` does). The data is the
synthetic copy task at the real vocabulary, so planning needs no corpus; for a real run set
`data.source=text` and `data.path`.

Variants (`--config=experiments/configs/llama2_7b.py:<variant>`):
  default     = flash_bs1.
  flash_bs1   the Pallas flash-attention kernel, 1 sequence per chip.
  flash_bs4   the same, 4 sequences per chip.
  dense_bs1   plain dot-product attention (XLA), 1 sequence per chip.
  dense_bs4   the same, 4 sequences per chip.
  smoke       the same recipe at toy size (2 layers x 128, 128 tokens), for tests.
"""

from reslm.training.config import get_base_config

VARIANTS = ("default", "flash_bs1", "flash_bs4", "dense_bs1", "dense_bs4", "smoke")
CHIPS = 16  # v5e-16: the batch below is per chip times this.
# Llama-2 shapes by size (width, layers, heads, SwiGLU width); tpu_plan.py compiles all three.
SHAPES = {
  "1b": dict(d_model=2048, num_layers=22, num_heads=16, mlp_dim=5632),  # TinyLlama-1.1B.
  "7b": dict(d_model=4096, num_layers=32, num_heads=32, mlp_dim=11008),
  "13b": dict(d_model=5120, num_layers=40, num_heads=40, mlp_dim=13824),
}


def get_config(arg: str | None = None):
  variant = arg or "default"
  if variant not in VARIANTS:
    raise ValueError(
      f"llama2_7b variant {variant!r} is not known; choose one of: {', '.join(VARIANTS)}"
    )
  if variant == "default":
    variant = "flash_bs1"
  cfg = get_base_config()
  cfg.name = f"llama2_7b_{variant}"
  attention, _, per_chip = ("flash_bs1" if variant == "smoke" else variant).partition("_bs")
  per_chip = int(per_chip)
  cfg.data.update(source="copy", vocab_size=32000, seq_len=2048, batch_size=per_chip * CHIPS)
  cfg.model.update(
    vocab_size=32000,
    max_seq_len=2048,
    tie_embeddings=False,
    dtype="bfloat16",
    param_dtype="float32",
    scan_layers=True,
    remat="full",
    **SHAPES["7b"],
  )
  if attention == "flash":
    cfg.model.mixer = "flash"
    cfg.model.mixer_options = {"implementation": "pallas", "block_q": 512, "block_k": 512}
  else:
    cfg.model.mixer = "dense"
  cfg.parallel.update(data=1, fsdp=-1, rules="fsdp", warn_replicated_mb=64.0)
  cfg.train.update(
    steps=10_000,
    learning_rate=3e-4,
    end_learning_rate=3e-5,
    warmup_steps=1000,
    b1=0.9,
    b2=0.95,
    weight_decay=0.1,
    grad_clip=1.0,
    log_every=10,
    eval_every=1000,
    eval_batches=4,
  )
  cfg.checkpoint.every = 1000
  if variant == "smoke":
    cfg.data.update(seq_len=128, batch_size=8)
    cfg.model.update(
      vocab_size=512, d_model=128, num_layers=2, num_heads=4, mlp_dim=256, max_seq_len=128
    )
    cfg.model.mixer_options = {"implementation": "pallas", "block_q": 128, "block_k": 128}
    cfg.data.vocab_size = 512
    cfg.train.update(steps=4, warmup_steps=1, log_every=2, eval_every=2, eval_batches=1)
    cfg.checkpoint.every = 2
  return cfg
