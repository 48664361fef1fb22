"""Multi-host runs: one JAX process per host (or per local group of devices), one global mesh.

`initialize` wraps `jax.distributed.initialize`: the coordinator address, process count and id
come from arguments, else from the environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID), else from the cluster (TPU metadata, SLURM, ...). On CPU it selects gloo
collectives so that cross-process all-reduces work.

A dead peer: JAX's coordination service notices missing heartbeats, but then aborts every
surviving process from C++ (SIGABRT and a page of stack; its `missed_heartbeat_callback` cannot
be given from Python: the binding fails to pass the status and terminates). So each process also
runs a watchdog thread: it bumps a counter in the service's key-value store every
`heartbeat_timeout / 5` seconds and reads the others'. A peer whose counter stops for
`heartbeat_timeout` seconds, or that reports a failure, or a coordinator that cannot be reached,
ends this process with one `error:` line and exit code 1, before the service's own (later)
timeout. A process that finishes normally says so (`finish`), so its peers do not mistake a
clean exit for a death.

Each process loads only its rows of the global batch (`data.build_dataset(process_index=...)`);
`global_batch` assembles them into global arrays sharded over the mesh.
"""

import atexit
import contextlib
import os
import sys
import threading
import time

import jax
import numpy as np

CPU_COLLECTIVES = ("gloo", "mpi")
_WATCH_PREFIX = "reslm_watchdog"
# JAX's own detection (which aborts) waits this much longer than the watchdog's.
_SERVICE_GRACE = 2.0
_watchdog = None


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
  for name, value in (
    ("heartbeat_timeout", heartbeat_timeout),
    ("initialization_timeout", initialization_timeout),
  ):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"--{name}={value} must be a whole number of seconds >= 1")
  if not is_initialized():
    # Must be set before the CPU backend starts; harmless on TPU/GPU.
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    try:
      jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=initialization_timeout,
        heartbeat_timeout_seconds=int(_SERVICE_GRACE * heartbeat_timeout) + 5,
      )
    except Exception as e:  # The runtime raises several types; callers want one clear line.
      where = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or "auto-detected"
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise RuntimeError(
        f"could not join the distributed job (coordinator {where}, process {process_id} of "
        f"{num_processes}): {first}"
      ) from e
    if jax.process_count() > 1:
      _start_watchdog(heartbeat_timeout)
  return describe()


class _Watchdog(threading.Thread):
  """Ends this process with one line when a peer dies, fails, or the coordinator is gone."""

  def __init__(self, timeout: float):
    super().__init__(name="peer-watchdog", daemon=True)
    from jax._src import distributed as _distributed

    self.client = _distributed.global_state.client
    self.timeout = timeout
    self.interval = max(0.2, timeout / 5)
    self.me = jax.process_index()
    self.count = 0
    self.stopped = threading.Event()

  def _set(self, name: str, value: str) -> None:
    self.client.key_value_set(f"{_WATCH_PREFIX}/{name}/{self.me}", value, allow_overwrite=True)

  def _read(self, name: str) -> dict[int, str]:
    pairs = self.client.key_value_dir_get(f"{_WATCH_PREFIX}/{name}/")
    return {int(key.rsplit("/", 1)[-1]): value for key, value in pairs}

  def _die(self, message: str) -> None:
    if self.stopped.is_set():
      return
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(1)

  def run(self) -> None:
    seen: dict[int, tuple[str, float]] = {}
    while not self.stopped.wait(self.interval):
      now = time.monotonic()
      try:
        self.count += 1
        self._set("beat", str(self.count))
        beats = self._read("beat")
        states = self._read("state")
      except Exception as e:  # The coordinator (process 0) is gone.
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        self._die(f"lost the job's coordinator (process 0 died or is unreachable): {first}")
        return
      for peer, value in beats.items():
        state = states.get(peer)
        if peer == self.me or state == "done":
          continue
        if state == "failed":
          self._die(
            f"process {peer} of the job failed (see its output); stopping process {self.me}"
          )
        if seen.get(peer, (None,))[0] != value:
          seen[peer] = (value, now)
        elif now - seen[peer][1] > self.timeout:
          self._die(
            f"process {peer} of the job stopped responding (no heartbeat for "
            f"{now - seen[peer][1]:.0f} s > --heartbeat_timeout={self.timeout:g}): it died or "
            f"hangs; stopping process {self.me}"
          )

  def finish(self, ok: bool) -> None:
    self.stopped.set()
    with contextlib.suppress(Exception):  # The coordinator is gone: nobody is left to tell.
      self._set("state", "done" if ok else "failed")


def _start_watchdog(timeout: float) -> None:
  global _watchdog
  if _watchdog is None:
    _watchdog = _Watchdog(timeout)
    _watchdog.start()


def finish(ok: bool = True) -> None:
  """Tells the other processes this one ends (normally, or with an error: then they stop too).

  Call once at the end of a multi-process job's main; a no-op in single-process runs. After an
  error the process exits without JAX's shutdown barrier (registered at exit), which waits for
  every peer and, if one is dead, aborts with a C++ stack once the heartbeats time out.
  """
  if _watchdog is not None:
    _watchdog.finish(ok)
    if not ok:
      atexit.register(_exit_without_shutdown)  # Runs before JAX's own exit handler (LIFO).


def _exit_without_shutdown() -> None:
  for stream in (sys.stdout, sys.stderr):
    with contextlib.suppress(Exception):
      stream.flush()
  os._exit(1)


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
