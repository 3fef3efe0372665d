"""Thread control for small ops: one intra-op thread where threads only add hand-off cost."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def single_thread(enabled: bool = True) -> Iterator[None]:
    """Run the block on one intra-op thread, restoring the previous setting after.

    For loops of tiny ops (GPTQ's column loop, DuQuant's greedy steps) and small dense
    decompositions: on a loaded 2-core machine OpenMP hand-offs made them 30-300x slower
    (eigh of 384x384: 5.5 s on 2 threads vs 0.03 s on one). Process-wide while active.
    """
    threads = torch.get_num_threads()
    if not enabled or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def ort_session_options(**settings: object):
    """CPU session options for qpass's own ONNX Runtime sessions (calibration, verification, eval).

    Their intra-op threads follow torch's setting, so one knob (`torch.set_num_threads`, or
    OMP_NUM_THREADS at start-up) sizes both runtimes: by default both take every physical core;
    a process that limits torch, such as one of several workers sharing a machine, does not get
    ONNX Runtime's spinning threads on top, which on 2 cores made whole runs 2-3x slower.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    for key, value in settings.items():
        setattr(opts, key, value)
    return opts
