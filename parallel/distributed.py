"""Multi-host runs: one JAX process per host (or per local group of devices), one global mesh.

`initialize` wraps `jax.distributed.initialize`: the coordinator address, process count and id
come from arguments, else from the environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID), else from the cluster (TPU metadata, SLURM, ...). On CPU it selects gloo
collectives so that cross-process all-reduces work. A dead peer is detected by the coordination
service's heartbeats: the surviving processes are terminated with an error after
`heartbeat_timeout` seconds instead of waiting forever in a collective.

Each process loads only its rows of the global batch (`data.build_dataset(process_index=...)`);
`global_batch` assembles them into global arrays sharded over the mesh.
"""

import os

import jax
import numpy as np

CPU_COLLECTIVES = ("gloo", "mpi")


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  return int(value) if value not in (None, "") else None


def is_initialized() -> bool:
  from jax._src import distributed as _distributed  # The public API has no such query.

  return _distributed.global_state.client is not None


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  cpu_collectives: str = "gloo",
  initialization_timeout: int = 300,
  heartbeat_timeout: int = 100,
) -> dict[str, int]:
  """Joins this process to the job (idempotent); returns its place in it.

  Args:
    coordinator_address: host:port of process 0's coordination service.
    num_processes: Processes in the job.
    process_id: This process, in [0, num_processes).
    cpu_collectives: Cross-process collectives on the CPU backend: "gloo" or "mpi".
    initialization_timeout: Seconds to wait for every process to connect.
    heartbeat_timeout: Seconds without a heartbeat after which a process counts as dead and the
      others are shut down with an error.

  Returns:
    {"process_index", "process_count", "local_devices", "global_devices"}.

  Raises:
    ValueError: A bad setting.
    RuntimeError: The job could not be joined (one line, with the cause).
  """
  if cpu_collectives not in CPU_COLLECTIVES:
    raise ValueError(
      f"cpu_collectives={cpu_collectives!r} is not known; choose one of: {', '.join(CPU_COLLECTIVES)}"
    )
  num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
  process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"--num_processes={num_processes} must be >= 1")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id={process_id} must be in [0, {num_processes})")
  if not is_initialized():
    # Must be set before the CPU backend starts; harmless on TPU/GPU.
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    try:
      jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=initialization_timeout,
        heartbeat_timeout_seconds=heartbeat_timeout,
      )
    except Exception as e:  # The runtime raises several types; callers want one clear line.
      where = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or "auto-detected"
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise RuntimeError(
        f"could not join the distributed job (coordinator {where}, process {process_id} of "
        f"{num_processes}): {first}"
      ) from e
  return describe()


def describe() -> dict[str, int]:
  """This process's place in the job."""
  return {
    "process_index": jax.process_index(),
    "process_count": jax.process_count(),
    "local_devices": jax.local_device_count(),
    "global_devices": jax.device_count(),
  }


def global_batch(local_batch: dict, sharding) -> dict:
  """Assembles each process's rows (stacked in process order) into global arrays on `sharding`.

  Args:
    local_batch: This process's rows, {name: [rows, ...]} (the leading axis after any stacked
      steps axis is split over processes).
    sharding: The global arrays' sharding.
  """
  return {
    key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
    for key, value in local_batch.items()
  }
