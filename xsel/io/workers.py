"""Worker processes that end with the process that started them, and never collect what they inherit.

A decode worker of a ``ProcessPoolExecutor`` outlives a parent killed with SIGKILL — no cleanup runs — and keeps
its memory until someone finds it. :func:`die_with_parent`, run first in each worker (the executor's
``initializer``: the decoders of ``xsel embed`` and the site runtime, scan), ends it when its parent goes: on Linux
at once, by the kernel's parent-death signal; everywhere within a second, by a watchdog thread that notices the new
parent. :func:`worker_pool` starts such workers.
"""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent: int, poll_seconds: float = 1.0) -> None:
    """End this worker when process ``parent`` (its starter, ``os.getpid()`` there) has gone."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)

    def watch() -> None:  # the signal follows the thread that forked us; this follows the process, anywhere
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        os._exit(1)

    threading.Thread(target=watch, name="xsel-parent-watchdog", daemon=True).start()


def worker_pool(workers: int, initializer: Callable, initargs: tuple) -> ProcessPoolExecutor:
    """A process pool whose workers start now, forked while the garbage collector is frozen, so a worker's collector
    never visits what it inherits. An onnxruntime session an earlier run left as garbage, collected in a forked
    worker, waits forever on its thread pool, whose threads a fork does not copy (a test run hung that way).
    ``initializer(*initargs)`` runs first in each worker."""
    pool = ProcessPoolExecutor(workers, initializer=initializer, initargs=initargs)
    gc.freeze()
    try:
        pool.submit(int)  # with the fork start method the first task starts every worker, here
    finally:
        gc.unfreeze()
    return pool
