"""Device, dtype and memory accounting: the one place that knows about CPU vs CUDA."""

from __future__ import annotations

import contextvars
import ctypes
import ctypes.util
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType

import torch

from metahpo.core import ConfigError

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available, else CPU).

    Under torchrun, ``cuda`` (and ``auto`` on a CUDA machine) is the local rank's GPU,
    ``cuda:LOCAL_RANK``; an explicit ``cuda:N`` is taken as given.
    """
    name = str(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu" or name == "cuda" or name.startswith("cuda:"):
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device={name!r} but CUDA is not available; use device=cpu or auto")
        if name == "cuda" and "LOCAL_RANK" in os.environ:
            return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        return torch.device(name)
    raise ConfigError(f"device={name!r} is unknown; allowed: auto, cpu, cuda, cuda:N")


def set_threads(n: int | None) -> None:
    """torch's intra-op CPU threads: ``n``, or torch's default (one per core) when None.

    On a machine whose cores other jobs share, fewer threads can be much faster (measured in
    docs/benchmarks.md); float results may differ in the last bits between thread counts.
    """
    if n is not None and n != torch.get_num_threads():
        torch.set_num_threads(int(n))


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[str(name)]
    except KeyError:
        raise ConfigError(f"dtype={name!r} is unknown; allowed: {', '.join(DTYPES)}") from None


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def _mallinfo2() -> Callable[[], _MallInfo2] | None:
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn  # type: ignore[no-any-return]


_MALLINFO2 = _mallinfo2()


def host_bytes_in_use() -> int:
    """Bytes the C allocator has handed out and not taken back (glibc), else the resident set.

    PyTorch's CPU tensors come from malloc, so this follows them exactly; the resident set
    (the fallback off glibc) does not shrink when memory is freed, so a later, smaller peak
    can hide behind it.
    """
    if _MALLINFO2 is not None:
        info = _MALLINFO2()
        return int(info.uordblks + info.hblkhd)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


_SAMPLE_HOST_MEMORY = contextvars.ContextVar("sample_host_memory", default=True)


@contextmanager
def host_memory_sampling(enabled: bool) -> Iterator[None]:
    """Within the block, :class:`CostMeter` samples CPU memory only if ``enabled``.

    For timing: each sample calls mallinfo2, which holds the C allocator's lock while it walks
    the heap, and that slows small models measurably (docs/benchmarks.md). The benchmark times
    with sampling off and meters memory in runs of its own.
    """
    token = _SAMPLE_HOST_MEMORY.set(enabled)
    try:
        yield
    finally:
        _SAMPLE_HOST_MEMORY.reset(token)


class CostMeter:
    """Wall time and peak memory of a block of code: ``with CostMeter(device) as cost: ...``.

    ``cost.seconds``: wall time, with queued CUDA kernels waited for at both ends.
    ``cost.peak``: peak memory above the level at the start, in bytes (0 on CPU with
    ``sample_memory=False`` or inside ``host_memory_sampling(False)``, which skip the sampling
    thread for timings). CUDA: the caching allocator's peak. CPU: :func:`host_bytes_in_use`,
    sampled every millisecond by a background thread (PyTorch keeps no CPU peak counter);
    allocations that live shorter than a millisecond can be missed, so CPU figures are a close
    lower bound. A sample holds the C allocator's lock while it walks the heap, which takes
    longer the more chunks the heap has (5-9 ms for exact reverse's tape at T=3200 on digits,
    which a 1 ms interval slowed 40-fold): the sampler then waits ``MAX_DUTY`` times as long as
    the sample took, so it holds the lock at most ``1 / MAX_DUTY`` of the time, and the peak
    of a fast-growing heap can be missed by what it grows in one such wait.
    """

    MAX_DUTY = 20

    def __init__(
        self, device: torch.device, interval: float = 1e-3, sample_memory: bool = True
    ) -> None:
        self.device = device
        self.interval = interval
        self.sample_memory = sample_memory and _SAMPLE_HOST_MEMORY.get()
        self.peak = 0
        self.seconds = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> CostMeter:
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.sample_memory:
            self._base = self._max = host_bytes_in_use()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self._start = time.perf_counter()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            start = time.perf_counter()
            self._max = max(self._max, host_bytes_in_use())
            took = time.perf_counter() - start
            self._stop.wait(max(self.interval, self.MAX_DUTY * took))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._start
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self.sample_memory:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            self._max = max(self._max, host_bytes_in_use())
            self.peak = self._max - self._base


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels (for honest timings on CUDA; a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rng_states() -> dict[str, object]:
    """Every random number generator a run may draw from, for a checkpoint."""
    import random

    import numpy as np

    states: dict[str, object] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, object]) -> None:
    """Restore what :func:`rng_states` saved (CUDA states only where CUDA is present)."""
    import random

    import numpy as np

    random.setstate(states["python"])  # type: ignore[arg-type]
    np.random.set_state(states["numpy"])  # type: ignore[arg-type]
    torch.set_rng_state(states["torch"])  # type: ignore[arg-type]
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])  # type: ignore[arg-type]
