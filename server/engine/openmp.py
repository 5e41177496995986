"""OpenMP settings for decoding in a worker thread, applied before torch is imported.

The local engine decodes in its own thread. A second thread's OpenMP team finds more OpenMP
threads than cores (the main thread's team from loading the model is still there), and libgomp
then spins only ~100 iterations before a waiting thread sleeps, so each of a decode step's few
hundred small parallel regions pays a futex wake-up. Measured on SmolLM2 on this project's
2-core CPU: a 1-row int4 decode step took 16.4 ms in a worker thread against 7.8 ms in the main
thread; with these settings, 8.4 ms, and through the real server one stream went from 54-57 to
89-101 tokens/s (bench/serve.py). Waiting threads still sleep after ~300,000 spins (about a
millisecond), so an idle server burns no CPU (measured: 0.04 CPU-seconds in 10 idle seconds).
Training is not affected: its products are large enough to amortise the wake-ups (a round's
generate and forward/backward in a thread took the same time either way).
"""

from __future__ import annotations

import os
import sys

SETTINGS = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "300000"}


def tune_for_a_decode_thread() -> None:
    """Set SETTINGS where the operator has not; libgomp reads them once, when torch loads it,
    so this must run first (a warning says when it is too late)."""
    if "torch" in sys.modules:
        import logging

        logging.getLogger(__name__).warning("torch is already imported: the OpenMP settings for the "
                                            "decode thread come too late to take effect")
    for name, value in SETTINGS.items():
        os.environ.setdefault(name, value)
