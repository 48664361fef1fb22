"""Beyond the transformer: sequence mixers and MoE in the same small LM, equal steps and size.

  python -m experiments.ablate --ablation=experiments/configs/ablations/mixers.py \
      --workdir=/tmp/ablate_mixers

The tasks are those of the attention ablation (MQAR recall, Tiny Shakespeare val loss). Each arm
keeps the block's SwiGLU MLP and swaps the sequence mixer, with settings chosen so the parameter
count stays near the transformer's (2 layers x width 64 on MQAR: dense 102k, mamba 102k,
hybrid 102k, hyena 110k, monarch 90k, rwkv 126k; the table prints each run's count). The top-2 MoE
arm has 4 experts of half the MLP width, so its active parameters per token equal the dense
model's while its total is 1.6x. Zoology's expectation: attention beats pure SSM/convolution
mixers on MQAR at equal size.

`:smoke` runs two arms for a few steps on MQAR only (for tests).
"""

from experiments.configs.ablations import attention

ARMS = {
  "transformer": {"model.mixer": "dense"},
  # expand=1 puts Mamba's in/out projections at the size of attention's q/k/v/o.
  "mamba": {"model.mixer": "mamba", "model.mixer_options": {"expand": 1}},
  "rwkv6": {"model.mixer": "rwkv", "model.mixer_options": {"mix_lora": 8, "decay_lora": 16}},
  "hyena": {"model.mixer": "hyena", "model.mixer_options": {"filter_hidden": 16}},
  # M2's sequence kernel has max_seq_len x width parameters: size it to the tasks' 64 tokens.
  "monarch": {"model.mixer": "monarch", "model.max_seq_len": 64},
  "hybrid_mamba_attn": {
    "model.mixer": "mamba,dense",
    "model.mixer_options": {"mamba": {"expand": 1}},
  },
  "moe_top2": {
    "model.mlp": "moe",
    "model.mlp_options": {"num_experts": 4, "top_k": 2, "expert_dim": 0, "dispatch": "dropless"},
  },
}


def _moe_half_width(overrides: dict, d_model: int) -> dict:
  """The MoE arm with experts of half the dense MLP width (SwiGLU: 8/3 d), so 2 active = 1 MLP."""
  options = dict(overrides["model.mlp_options"], expert_dim=int(8 * d_model / 3) // 2)
  return {**overrides, "model.mlp_options": options}


def get_ablation(arg: str | None = None) -> dict:
  base = attention.get_ablation(arg)
  tasks = base["tasks"]
  arms = dict(ARMS)
  # The two tasks use different widths (64 / 128): the per-task expert width goes in the
  # task overrides, which the runner applies before the arm's.
  arms["moe_top2"] = _moe_half_width(ARMS["moe_top2"], 64)
  tasks = {name: dict(task) for name, task in tasks.items()}
  if "shakespeare" in tasks:
    tasks["shakespeare"]["arm_overrides"] = {"moe_top2": _moe_half_width(ARMS["moe_top2"], 128)}
  if arg == "smoke":
    arms = {k: arms[k] for k in ("transformer", "mamba")}
  return {"tasks": tasks, "arms": arms, "cost": "flops_per_token"}
