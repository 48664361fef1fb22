"""Model FLOPs per token of a configured model: its forward pass traced and counted.

`model_flops` builds the model from shapes alone (no weights are created), traces one forward call
on a [batch, seq_len] batch and counts it with `metrics.jaxpr_flops`: the FLOPs of every matmul
(and FFT), each loop body times its trip count, so scanned layers, chunked recurrences (Mamba,
RWKV, linear attention) and blocked attention (flash, memory-efficient) count in full, and a new
mixer or MLP is counted without writing a formula for it. Training is 3 × forward: the backward
pass of a matmul is two matmuls of the same size; rematerialisation and the recomputation inside
flash attention's backward kernel are implementation overhead, not model FLOPs. These are the MFU
numerator of the efficiency report and the cost axis of `experiments.ablate`.

With `xla_loop_free=True` it also reports the other convention, for comparison: XLA's count of
every op (elementwise work, softmax, the selective scan's recurrence, rematerialisation) of the
loss's forward and backward pass with every loop unrolled (`metrics.jaxpr_flops.
xla_loop_free_flops`); it costs a lowering of the unrolled program, so it is off by default.

Conventions: causal attention counts the full score matrix (what dense attention computes and
masks, and what PaLM's MFU formula 6·N + 12·L·H·Q·T counts); MoE counts the routed work (top-k
experts per token for dropless dispatch, every capacity slot for capacity dispatch); the embedding
lookup is a gather and costs nothing. An objective's extra forward passes (e.g. a distillation
teacher) are not part of the model and are not counted.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from reslm.metrics import jaxpr_flops
from reslm.metrics.params import active_params
from reslm.models import build_model
from reslm.models.config import ModelConfig
from reslm.models.moe import expert_usage

TRAIN_PER_FORWARD = 3
SOURCE = "counted: forward-pass matmul FLOPs (loops x trip count), train = 3 x forward"


def model_flops(
  model_cfg: ModelConfig, *, batch_size: int, seq_len: int, xla_loop_free: bool = False
) -> dict[str, Any]:
  """Counts one forward call of the model on a [batch_size, seq_len] batch of token ids.

  Per-call work that does not scale with the batch (e.g. Hyena's implicit filters, Monarch's
  kernel transform, capacity rounding in MoE) is spread over the call's tokens, so pass the batch
  one forward pass actually sees (the microbatch under gradient accumulation).

  Args:
    model_cfg: The model.
    batch_size: Sequences per forward call.
    seq_len: Tokens per sequence.
    xla_loop_free: Also return `xla_loop_free_train_per_token` (see the module docstring).

  Returns:
    A dict with `forward_per_token` and `train_per_token` FLOPs; `matmul_params`, the parameters
    that enter a matmul, active per token: the input embedding table is excluded (a lookup), the
    LM head included whether untied or tied (then the table, counted once, is the head), MoE
    experts scaled by experts per token / num_experts, and norm scales, biases, convolution
    filters and other elementwise parameters excluded; `source`, how the figures were obtained;
    and `uncounted`, work the count could not include (empty when complete).
  """
  graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(model_cfg)))
  params = nnx.to_pure_dict(state)
  tokens = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)

  def forward(params, tokens_bt):
    return nnx.merge(graphdef, params)(tokens_bt).logits

  count = jaxpr_flops.count_flops(forward, params, tokens)
  leaves, treedef = jax.tree.flatten(params)
  # Parameters outside any matmul become empty, so the count below skips them.
  matmul = treedef.unflatten(
    [
      x if i in count.matmul_inputs else jax.ShapeDtypeStruct((0,), x.dtype)
      for i, x in enumerate(leaves)
    ]
  )
  tokens_per_call = batch_size * seq_len
  out = {
    "forward_per_token": count.flops / tokens_per_call,
    "train_per_token": TRAIN_PER_FORWARD * count.flops / tokens_per_call,
    "matmul_params": active_params(matmul, **(expert_usage(model_cfg) or {})),
    "source": SOURCE,
    "uncounted": list(count.uncounted),
  }
  if xla_loop_free:

    def loss(params, tokens_bt):  # Next-token cross-entropy (targets: the inputs, for shapes).
      logits = forward(params, tokens_bt)
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens_bt).mean()

    flops = jaxpr_flops.xla_loop_free_flops(jax.value_and_grad(loss), params, tokens)
    out["xla_loop_free_train_per_token"] = None if flops is None else flops / tokens_per_call
  return out
