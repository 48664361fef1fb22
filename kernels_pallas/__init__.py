"""Pallas kernels: one folder per op, one file per backend, one public function per op.

Layout of an op folder `kernels_pallas/<op>/`:
  reference.py  the definition in plain `jnp` (float32 softmax, etc.): the test oracle and the CPU
                fallback.
  config.py     frozen dataclasses of static knobs (block sizes, ...) with per-backend defaults and
                the input checks; every bad shape, dtype or block size raises a one-line ValueError
                before anything is lowered.
  tpu.py        the Pallas TPU (Mosaic) kernels, forward and backward.
  gpu.py        the Pallas GPU kernels, forward and backward (see the file for the backend choice).
  api.py        the public function: a `jax.custom_vjp` around the kernels (pallas_call is never
                differentiated directly) that dispatches with `jax.lax.platform_dependent`
                (`implementation="auto"`) or to a named backend; `interpret=` runs the kernels
                on CPU for tests.

Tests live in `tests/kernels_pallas/<op>/` and climb a CPU-only ladder: numerics in interpret mode
against the reference, TPU semantics in the TPU simulator (races, uninitialised memory, output
revisits), lowering by `jax.export` for TPU and CUDA, and a real Mosaic compile for a TPU topology
through libtpu.
"""
