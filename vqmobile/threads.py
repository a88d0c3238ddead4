"""Thread policy for column passes (GPTQ, GPTVQ): thousands of tiny tensor ops run on one thread, large ones on all.

On a shared 2-core machine every multi-threaded op waits for a second core; for the per-column ops of a column pass
that wait dominates (measured 40x slower on a loaded 2-core box), while large matmuls still gain from all threads.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

PARALLEL_WORK = 1 << 24  # multiply-adds per op from which all threads are used


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    prev = torch.get_num_threads()
    if n != prev:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != prev:
            torch.set_num_threads(prev)


@contextlib.contextmanager
def column_pass() -> Iterator[Callable[[int], int]]:
    """Run the body on one thread; it gets a function mapping an op's work (multiply-adds) to the threads to use."""
    full = torch.get_num_threads()
    with num_threads(1):
        yield lambda work: full if work >= PARALLEL_WORK else 1
