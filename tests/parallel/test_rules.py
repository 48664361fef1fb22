"""Rule presets: golden PartitionSpec tables, FSDP memory, the replicated check, invalid meshes."""

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from experiments.configs import mqar
from reslm.models import build_model
from reslm.models.sharding import logical_to_spec
from reslm.parallel import rules as rules_lib
from reslm.training import validate_experiment
from tests.parallel import common

L = "layers/groups/blocks/0/"  # Prefix of the stacked block parameters.
NAMES = {
  "embed/embedding": "emb",
  "final_norm/scale": "final_norm",
  "lm_head/kernel": "lm_head",
  **{f"{L}mixer/{p}/kernel": p for p in "qkvo"},
  **{f"{L}mlp/{p}/kernel": p for p in ("gate", "up", "down")},
  f"{L}norm1/scale": "norm1",
  f"{L}norm2/scale": "norm2",
}
# Logical axes (reference model): emb [vocab, embed]; final_norm [embed]; lm_head [embed, vocab];
# q, k, v [layers, embed, heads, head_dim]; o [layers, heads, head_dim, embed];
# gate, up [layers, embed, mlp]; down [layers, mlp, embed]; norm1, norm2 [layers, embed].
F, T = "fsdp", "tensor"
# fmt: off
GOLDEN = {
  "dp": {k: P() for k in NAMES.values()},
  "fsdp": {
    "emb": P(None, F), "final_norm": P(F), "lm_head": P(F),
    "q": P(None, F), "k": P(None, F), "v": P(None, F), "o": P(None, None, None, F),
    "gate": P(None, F), "up": P(None, F), "down": P(None, None, F),
    "norm1": P(None, F), "norm2": P(None, F),
  },
  "tp": {
    "emb": P(T), "final_norm": P(), "lm_head": P(None, T),
    "q": P(None, None, T), "k": P(None, None, T), "v": P(None, None, T), "o": P(None, T),
    "gate": P(None, None, T), "up": P(None, None, T), "down": P(None, T),
    "norm1": P(), "norm2": P(),
  },
  "fsdp_tp": {
    "emb": P(T, F), "final_norm": P(F), "lm_head": P(F, T),
    "q": P(None, F, T), "k": P(None, F, T), "v": P(None, F, T), "o": P(None, T, None, F),
    "gate": P(None, F, T), "up": P(None, F, T), "down": P(None, T, F),
    "norm1": P(None, F), "norm2": P(None, F),
  },
  "pp": {
    "emb": P(), "final_norm": P(), "lm_head": P(),
    **{k: P("pipeline") for k in ("q", "k", "v", "o", "gate", "up", "down", "norm1", "norm2")},
  },
}
# fmt: on
GOLDEN["dp_tp"] = GOLDEN["tp"]
GOLDEN["dp_pp"] = GOLDEN["pp"]


def specs_for(preset: str, model=common.MODEL, size: int = 2) -> dict[str, P]:
  sizes = {axis: size for axis in rules_lib.PRESETS[preset]}
  rules = rules_lib.get_rules(preset)
  state = nnx.state(nnx.eval_shape(lambda: build_model(model)))
  abstract = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(state))
  specs = rules_lib.param_specs(rules_lib.logical_axes(state), abstract, rules, sizes)
  return rules_lib.describe(specs)


@pytest.mark.parametrize("preset", sorted(GOLDEN))
def test_golden_partition_specs(preset):
  got = specs_for(preset)
  assert set(got) == set(NAMES)
  assert {NAMES[k]: v for k, v in got.items()} == {k: str(v) for k, v in GOLDEN[preset].items()}


def test_rules_tables_map_every_logical_name():
  for preset in rules_lib.PRESETS:
    rules = rules_lib.get_rules(preset)
    assert [name for name, _ in rules] == list(rules_lib.LOGICAL_AXES)
  assert dict(rules_lib.get_rules("fsdp_ep"))["batch"] == ("data", "fsdp", "expert")
  assert rules_lib.get_rules("auto", {"data": 2, "tensor": 4}) == rules_lib.get_rules("dp_tp")


def test_spec_uses_each_mesh_axis_once_and_only_if_it_divides():
  rules = rules_lib.get_rules("fsdp")
  # Activations: batch takes fsdp, so embed stays whole.
  assert logical_to_spec(("batch", "seq", "embed"), rules) == P(("data", "fsdp"))
  # A dimension the axis does not divide stays whole (here batch 6 over fsdp 4).
  sizes = {"data": 1, "fsdp": 4}
  assert logical_to_spec(("batch", "embed"), rules, (6, 8), sizes) == P("data", "fsdp")


def test_fsdp_bytes_per_device_are_one_nth_of_data_parallel():
  """Parameters + optimizer state per device: FSDP over 8 ≈ DP / 8 (only scalars replicate)."""
  n = 8
  dp = common.placement("dp", {"data": n})
  dp_bytes = sum(rules_lib.placement_summary(dp.abstract, dp.state).values())
  place, _, state, _ = common.setup("fsdp", {"fsdp": n})
  planned = rules_lib.placement_summary(place.abstract, place.state)
  # What a device actually holds: device 0's shards of the created arrays.
  held = sum(
    shard.data.nbytes
    for leaf in jax.tree.leaves((state.params, state.opt_state))
    for shard in leaf.addressable_shards
    if shard.device == jax.devices()[0]
  )
  assert held == sum(planned.values())
  unsharded = sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state)))
  assert dp_bytes == unsharded  # Data parallel: a full copy per device.
  assert 1 / n <= held / dp_bytes < 1.01 / n, held / dp_bytes


def test_replicated_check_reports_large_unsplit_parameters():
  place = common.placement("tp", {"tensor": 8})
  found = rules_lib.check_replicated(place.abstract.params, place.specs, place.rules, 1e-4)
  names = {path.split("/")[-2] for path, _ in found}  # Module names of the replicated params.
  assert names == {"final_norm", "norm1", "norm2"}  # Only [embed] vectors: no tensor-split axis.
  assert rules_lib.check_replicated(place.abstract.params, place.specs, place.rules, 1.0) == []
  dp = common.placement("dp", {"data": 8})  # Data parallel replicates by design: no report.
  assert rules_lib.check_replicated(dp.abstract.params, dp.specs, dp.rules, 1e-4) == []


def smoke_config(**parallel):
  cfg = mqar.get_config("smoke")
  cfg.model.update(num_heads=4, num_layers=2)
  cfg.parallel.update(parallel)
  return cfg


@pytest.mark.parametrize(
  "parallel, message",
  [
    ({"data": 3}, "mesh data=3 has 3 devices but 8 are available"),
    ({"data": 2, "tensor": 8, "rules": "dp_tp"}, "mesh data=2 x tensor=8 has 16 devices"),
    ({"data": 1, "tensor": 8, "rules": "tp"}, "model.num_heads=4 is not divisible by"),
    ({"data": 1, "pipeline": 8, "rules": "pp"}, "do not split into parallel.pipeline=8 stages"),
    ({"data": 4, "tensor": 2, "rules": "dp"}, "parallel.rules='dp' does not use the tensor axis"),
    ({"rules": "zero3"}, "parallel.rules='zero3' is not a preset"),
    ({"data": 4, "expert": 2}, "parallel.expert=2 needs a mixture-of-experts model"),
    ({"warn_replicated_mb": -1.0}, "parallel.warn_replicated_mb=-1.0 must be >= 0"),
    ({"expert_dispatch": "magic"}, "parallel.expert_dispatch='magic' is not known"),
    (
      {"data": 4, "pipeline": 2, "rules": "dp_pp", "pipeline_microbatches": 4},
      "does not split into parallel.pipeline_microbatches=4 pipeline microbatches",
    ),
    (
      {"data": 4, "pipeline": 2, "rules": "dp_pp", "pipeline_schedule": "circular"},
      "do not split into parallel.pipeline=2 stages x parallel.pipeline_repeats=2 laps",
    ),
  ],
)
def test_invalid_meshes_fail_in_one_line(parallel, message):
  with pytest.raises(ValueError, match=message) as err:
    validate_experiment(smoke_config(**parallel), num_devices=8)
  assert "\n" not in str(err.value)
