"""glibc's allocator, set for meta-training's large, short-lived buffers on the CPU.

Why: a conv4 step on miniImageNet-sized images frees and re-allocates buffers of tens of
megabytes per task. With glibc's defaults two things make that slow, and both depend on the
process's history, so the same step ran at two speeds in two processes (part 10):

- buffers above the (dynamic) mmap threshold are mapped fresh and page-faulted on every
  step, and freed memory above the trim threshold goes back to the kernel;
- each worker thread gets an arena of its own, and a non-main arena cannot hold a buffer
  larger than its 64 MB heap, so it maps one per allocation whatever the threshold is.

One arena, a fixed 512 MiB mmap threshold and a 4 GiB trim threshold keep freed buffers for
reuse. Measured on the 2-core CPU, this made a plain per-task loop 1.25-1.44x faster on the
miniImageNet shape, and the conv loop's task threads ran at 1.02-1.05x that loop where, with
the thresholds alone (their own arenas), they had fallen to 0.76-0.89x (README, Speed). The
price is that the process keeps up to 4 GiB of freed memory instead of returning it. It must
run before another thread allocates (``M_ARENA_MAX`` binds only threads that have no arena
yet), so the console script calls it before importing torch.
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt(3) parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

SETTINGS = {_M_ARENA_MAX: 1, _M_MMAP_THRESHOLD: 512 << 20, _M_TRIM_THRESHOLD: 4 << 30}
OPT_OUT = "METAKD_RUN_MALLOC"  # =system leaves glibc's defaults
_USER_VARIABLES = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")

applied = False  # read by the benchmark, which reports the allocator's state


def tune() -> bool:
    """Apply :data:`SETTINGS` once; False where they do not apply or were not wanted.

    Nothing is changed off glibc, with ``METAKD_RUN_MALLOC=system``, or where the user set
    glibc's own variables: theirs win.
    """
    global applied
    if applied:
        return True
    if os.environ.get(OPT_OUT, "").strip().lower() == "system":
        return False
    if any(name in os.environ for name in _USER_VARIABLES):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    applied = all(mallopt(param, value) == 1 for param, value in SETTINGS.items())
    return applied
