"""Plan before you launch: compile for a Cloud TPU slice on a CPU-only machine and read the result.

`tpu_devices("v5e-16")` (or "v5e:4x4") gives compile-only TPU devices from the `libtpu` wheel;
programs traced with shardings over them compile with the real TPU compiler. `analyze` turns a
compiled program into per-device memory (does it fit in HBM?), XLA's estimated step time, an
estimated MFU and collective bytes. Traps (research/tpu_aot.md): XLA's `optimal_seconds` is a
static roofline estimate, not a measurement; every `ConcatBitcast` custom call adds -1.0 to it
(corrected here); and while-loop bodies are counted once, so time and FLOPs come from a loop-free
variant of the program (see `training.aot`).
"""

import dataclasses
import math
import os
import re

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """Per-chip figures of a TPU generation (public spec sheets).

  Attributes:
    hbm_bytes: High-bandwidth memory per chip.
    peak_flops: Dense bf16 peak FLOP/s per chip.
    cores_in_name: Whether slice names count TensorCores (2 per chip) rather than chips.
    dims: Topology rank (2: a 2-D torus such as 4x4; 3: a 3-D torus such as 2x2x4).
  """

  hbm_bytes: int
  peak_flops: float
  cores_in_name: bool
  dims: int


CHIPS = {
  "v2": Chip(16 * GIB, 45e12, True, 2),
  "v3": Chip(32 * GIB, 123e12, True, 2),
  "v4": Chip(32 * GIB, 275e12, True, 3),
  "v5e": Chip(16 * GIB, 197e12, False, 2),
  "v5p": Chip(95 * GIB, 459e12, True, 3),
  "v6e": Chip(32 * GIB, 918e12, False, 2),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e", "trillium": "v6e"}


def _grid(chips: int, dims: int) -> str:
  """The most compact torus of `chips` chips: 16 -> 4x4 (2-D) or 2x2x4 (3-D)."""
  shape = [1] * dims
  rest, i = chips, 0
  while rest > 1:
    shape[i % dims] *= 2
    rest //= 2
    i += 1
  return "x".join(str(n) for n in sorted(shape))


def parse_topology(name: str) -> tuple[str, str, int]:
  """A slice name ("v5e-16", "v5p-8") or topology ("v5e:4x4") -> (generation, topology, chips).

  Raises:
    ValueError: An unknown generation or a malformed name.
  """
  known = ", ".join(sorted(CHIPS))
  m = re.fullmatch(r"([a-z0-9]+)[:=]((?:\d+x)*\d+)", name.strip().lower())
  if m:
    gen, shape = _ALIASES.get(m.group(1), m.group(1)), m.group(2)
    chips = math.prod(int(d) for d in shape.split("x"))
  else:
    m = re.fullmatch(r"([a-z0-9]+)-(\d+)", name.strip().lower())
    if not m:
      raise ValueError(
        f"--topology={name} is not a TPU slice; use a slice name like v5e-16 or v5p-8, or a "
        "topology like v5e:4x4"
      )
    gen = _ALIASES.get(m.group(1), m.group(1))
    if gen not in CHIPS:
      raise ValueError(f"--topology={name}: TPU generation {gen!r} is not known; choose: {known}")
    count = int(m.group(2))
    chips = count // 2 if CHIPS[gen].cores_in_name else count
    if chips < 1:
      raise ValueError(f"--topology={name}: a {gen} slice needs at least 2 cores")
    if chips & (chips - 1):
      raise ValueError(f"--topology={name}: {chips} chips do not form a power-of-two slice")
    shape = _grid(chips, CHIPS[gen].dims)
    if CHIPS[gen].dims == 3 and chips < 8:
      shape = _grid(chips, 2) + "x1"  # Sub-cube slices: 2x2x1.
  if gen not in CHIPS:
    raise ValueError(f"--topology={name}: TPU generation {gen!r} is not known; choose: {known}")
  return gen, f"{gen}:{shape}", chips


def tpu_devices(name: str) -> tuple[list, str, int]:
  """Compile-only TPU devices for a slice; returns (devices, generation, chips).

  Needs the `libtpu` wheel (`pip install "jax[tpu]"`); no TPU has to be attached.
  """
  gen, topology, chips = parse_topology(name)
  # Compile-only devices touch no hardware, so several processes (tests, a planning run next to
  # another) may load libtpu at once; without this the second one fails on libtpu's lockfile.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies

  try:
    desc = topologies.get_topology_desc(topology, platform="tpu")
  except Exception as e:  # Missing libtpu, or a shape libtpu does not accept.
    raise RuntimeError(
      f"--topology={name}: libtpu could not describe {topology} ({type(e).__name__}: "
      f"{str(e).splitlines()[0] if str(e) else ''}); is libtpu installed (pip install "
      "'jax[tpu]')?"
    ) from e
  return list(desc.devices), gen, chips


def memory(compiled) -> dict[str, float]:
  """Per-device bytes from `memory_analysis()`; peak = arguments + unaliased outputs + temporaries
  + generated code (outputs that alias donated arguments take no extra space)."""
  m = compiled.memory_analysis()
  get = lambda field: float(getattr(m, field, 0) or 0)
  args, out, alias = (
    get("argument_size_in_bytes"),
    get("output_size_in_bytes"),
    get("alias_size_in_bytes"),
  )
  temp, code = get("temp_size_in_bytes"), get("generated_code_size_in_bytes")
  return {
    "argument_bytes": args,
    "output_bytes": out,
    "alias_bytes": alias,
    "temp_bytes": temp,
    "code_bytes": code,
    "peak_bytes": args + max(out - alias, 0.0) + temp + code,
    # Host-memory (pinned_host) share, e.g. an offloaded optimizer state; 0 on CPU backends.
    "host_bytes": get("host_argument_size_in_bytes") + get("host_temp_size_in_bytes"),
  }


def cost(compiled) -> dict[str, float | None]:
  """XLA's static cost estimate: flops, bytes accessed and optimal_seconds (per device).

  `optimal_seconds` gets +1.0 back per `ConcatBitcast` custom call (each contributes -1.0,
  "unknown"); a value still negative is reported as None.
  """
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  seconds = analysis.get("optimal_seconds")
  if seconds is not None:
    seconds += compiled.as_text().count('custom_call_target="ConcatBitcast"')
    seconds = seconds if seconds >= 0 else None
  return {
    "flops": analysis.get("flops"),
    "bytes_accessed": analysis.get("bytes accessed"),
    "optimal_seconds": seconds,
  }


def extrapolate(depths: list[int], values: list[float | None], depth: int) -> float | None:
  """Linear fit of value(depth) through the measured depths (exact for 1 or 2 points)."""
  if any(v is None for v in values) or not values:
    return None
  if len(values) == 1:
    return values[0] * depth / depths[0]
  slope = (values[-1] - values[0]) / (depths[-1] - depths[0])
  return values[0] + slope * (depth - depths[0])


def fits(peak_bytes: float, gen: str, devices: int, chips: int) -> tuple[bool, float]:
  """(fits in HBM, HBM bytes per device) for `devices` devices over `chips` chips."""
  hbm = CHIPS[gen].hbm_bytes * chips / devices
  return peak_bytes <= hbm, hbm
