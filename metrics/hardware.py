"""Host description, process memory, and a measured matmul peak for MFU denominators.

On CPU there is no datasheet peak to divide by, so model FLOPs utilisation is reported against the
best square-matmul throughput measured in the same process, on the same device and dtype.
"""

import os
import platform
import resource
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import psutil

# Each timed repetition runs enough matmuls to last about this long, so that dispatch overhead and
# timer resolution are negligible while the default measurement stays well under a second.
_TARGET_REPETITION_SECONDS = 0.03
_MAX_MATMULS_PER_REPETITION = 64


def measure_matmul_peak(dtype: Any = jnp.float32, size: int = 1024, repeats: int = 10) -> dict:
  """Measures the achievable matmul throughput of the default device.

  A jitted `size × size` matmul is compiled and warmed up; then each of `repeats` repetitions
  dispatches several independent matmuls and blocks on all of them. The best repetition is
  reported as 2·n³ FLOPs per matmul divided by its per-matmul time.

  Args:
    dtype: Operand dtype.
    size: Side n of the square operands.
    repeats: Number of timed repetitions; the fastest is kept.

  Returns:
    A dict with `flops_per_second`, `dtype` (name), `size` and `device_kind`.
  """
  device = jax.devices()[0]
  ka, kb = jax.random.split(jax.random.key(0))
  # Scaling keeps values O(1) so no inf/denormal slow paths are hit.
  a = (jax.random.normal(ka, (size, size), jnp.float32) / size**0.5).astype(dtype)
  b = (jax.random.normal(kb, (size, size), jnp.float32) / size**0.5).astype(dtype)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()  # Compile.

  start = time.perf_counter()
  matmul(a, b).block_until_ready()
  single = max(time.perf_counter() - start, 1e-9)
  per_rep = int(min(max(_TARGET_REPETITION_SECONDS / single, 1), _MAX_MATMULS_PER_REPETITION))

  best = float("inf")
  for _ in range(max(repeats, 1)):
    start = time.perf_counter()
    outs = [matmul(a, b) for _ in range(per_rep)]
    for out in outs:
      out.block_until_ready()
    best = min(best, (time.perf_counter() - start) / per_rep)
  return {
    "flops_per_second": 2.0 * size**3 / best,
    "dtype": jnp.dtype(dtype).name,
    "size": size,
    "device_kind": device.device_kind,
  }


def process_memory() -> dict[str, int]:
  """Returns this process's resident set size and its peak so far, in bytes.

  Returns:
    A dict with `rss_bytes` (current, from psutil) and `peak_rss_bytes` (from
    `getrusage(RUSAGE_SELF).ru_maxrss`, which Linux reports in KiB and macOS in bytes).
  """
  rss = psutil.Process().memory_info().rss
  maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  peak = maxrss if sys.platform == "darwin" else maxrss * 1024
  return {"rss_bytes": int(rss), "peak_rss_bytes": int(max(peak, rss))}


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.lower().startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def usable_cores() -> int:
  """Returns the number of CPU cores this process may run on (affinity-aware)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # Not available on macOS.
    return os.cpu_count() or 1


def host_info() -> dict[str, Any]:
  """Returns a JSON-able description of the host and JAX devices.

  Returns:
    A dict with `cpu_model`, `cpu_count` (logical), `usable_cores`, `jax_backend`,
    `device_kinds` (sorted unique), `device_count`, and `jax_version` / `python_version`.
  """
  devices = jax.devices()
  return {
    "cpu_model": _cpu_model(),
    "cpu_count": os.cpu_count(),
    "usable_cores": usable_cores(),
    "jax_backend": jax.default_backend(),
    "device_kinds": sorted({d.device_kind for d in devices}),
    "device_count": len(devices),
    "jax_version": jax.__version__,
    "python_version": platform.python_version(),
  }
