"""Device meshes and the placement of parameters, optimizer state, activations and batches on them.

mesh         the Mesh from the `parallel` config (axes data, fsdp, tensor, pipeline, expert)
rules        logical-axis rule presets (dp, fsdp, tp, pp, ep and combinations) -> shardings
comm         collective bytes of a compiled program, from its HLO
pipeline     pipeline stages with shard_map + ppermute (GPipe and circular schedules)
experts      expert parallelism with all-to-all token exchange
distributed  multi-process jobs (jax.distributed) and process-local data -> global arrays
aot          compiling for a TPU slice on a CPU-only machine (memory, estimated time and MFU)
"""

from reslm.parallel.mesh import AXES, get_default_config, make_mesh, mesh_shape

__all__ = ["AXES", "get_default_config", "make_mesh", "mesh_shape"]
