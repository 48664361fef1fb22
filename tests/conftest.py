"""Test-wide setup: a CPU backend with 8 simulated devices, set before JAX starts.

Sharding tests need several devices; everything else runs on device 0. The platform is pinned to
CPU so that an installed `libtpu` (the test extra, used for ahead-of-time TPU compiles) does not try
to initialise a TPU that is not there.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Ahead-of-time TPU compiles load libtpu, which otherwise takes a machine-wide lock: parallel test
# workers (and other processes) compiling at the same time would fail with "ABORTED ... lockfile".
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
