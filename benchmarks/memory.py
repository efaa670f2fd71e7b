"""Peak memory of one hypergradient, each measured in a fresh process.

A fresh process per (task, method, horizon) is the honest way to read the resident set: a
process that has run something before keeps freed memory in its heap, and a later run reuses
it without growing. Children are forked from a server that has only imported the libraries
(``multiprocessing``'s forkserver), so each starts clean without paying for the imports again.

Three readings per run, all above the level just before it:

- ``rss``: the process's resident-set high-water mark (Linux ``VmHWM``, reset just before the
  run through ``/proc/self/clear_refs``): everything the process touched, libraries' workspaces
  and allocator slack included. glibc's mmap threshold is pinned in these processes
  (:func:`_pin_mmap_threshold`) so that freed blocks leave the resident set.
- ``malloc``: :class:`metahpo.device.CostMeter`'s peak: on CPU the C allocator's bytes in use
  sampled every millisecond; on CUDA ``torch.cuda.max_memory_allocated``.
- ``torch``: PyTorch's own allocation counters. On CUDA the caching allocator's peak (the same
  number as ``malloc``). On CPU PyTorch keeps no peak counter; the profiler records every
  allocation and free (``profile_memory=True``), and the peak of their running sum is taken from
  a second, profiled run, which costs about 3-4 times the plain one (skipped, with the reason,
  where that exceeds the budget).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import multiprocessing
import os
from multiprocessing.connection import Connection
from typing import Any

import torch

from benchmarks.workloads import workloads

# torch._dynamo: torch.func imports it (and sympy...) on first use, ~3 s per process otherwise
PRELOAD = ["torch", "torch._dynamo", "torch.profiler", "benchmarks.workloads", "benchmarks.timing"]
MMAP_THRESHOLD = 4096  # bytes; see _pin_mmap_threshold
PROFILER_SLOWDOWN = 4.0  # a profiled run's time over a plain one's, with margin (measured ~3.5)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    """Reset ``VmHWM`` to the current resident set (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _pin_mmap_threshold() -> bool:
    """Make glibc serve every block of ``MMAP_THRESHOLD`` or more with its own mmap.

    By default glibc raises that threshold each time a large block is freed, after which such
    blocks come from the heap, and the heap's freed space stays resident: the high-water mark
    then records fragmentation, which grows with the number of steps (digits, forward mode:
    +31 % from T=50 to T=3200 with the live bytes flat; +3 % pinned at 4 KiB). Pinned, the
    resident set follows the live blocks, at the price of a system call per block (the memory
    runs are slower; their times are not reported as timings). False where there is no glibc.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD)) and bool(
            libc.mallopt(m_trim_threshold, 128 * 1024)
        )
    except (OSError, AttributeError):
        return False


def _torch_peak(run: Any) -> int | None:
    """Peak of PyTorch's allocations minus frees while ``run()`` executes, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None:
        return None
    events = sorted((e.start_ns(), e.nbytes()) for e in results.events() if e.name() == "[memory]")
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return peak


def child(conn: Connection, spec: dict[str, Any]) -> None:
    """Measure one cell in this (fresh) process and send a dict back through ``conn``."""
    from benchmarks.timing import run_once
    from metahpo.device import CostMeter, host_memory_sampling, resolve_device
    from metahpo.estimators.forward import ForwardMode

    # Objects inherited from the server are never garbage: a collection that walks them takes a
    # second and copies every page they live on.
    gc.freeze()
    pinned = _pin_mmap_threshold()
    try:
        torch.set_num_threads(spec["threads"])
        device = resolve_device(spec["device"])
        workload = workloads(spec["quick"])[spec["task"]]
        task = workload.build(device)
        forward = ForwardMode(**spec["forward"])
        method, horizon = spec["method"], spec["horizon"]
        # lazy initialisation, on a run small enough to leave little freed memory behind
        run_once(method, task, workload, 1, forward, clock=False)
        gc.collect()
        out: dict[str, Any] = {"mmap_threshold_pinned": pinned}
        rss_ok = _reset_rss_peak()
        rss_start = _status_kib("VmRSS")
        with CostMeter(device) as cost:  # samples memory; the run inside does not
            with host_memory_sampling(False):
                run_once(method, task, workload, horizon, forward, clock=False)
        hwm = _status_kib("VmHWM")
        out["seconds"] = cost.seconds
        out["malloc"] = cost.peak
        out["rss"] = (hwm - rss_start) * 1024 if rss_ok and hwm and rss_start else None
        if device.type == "cuda":
            out["torch"] = cost.peak
        elif not spec["torch_memory"]:
            out["torch_skipped"] = "--no-torch-memory"
        elif cost.seconds * PROFILER_SLOWDOWN > spec["budget_profile_seconds"]:
            out["torch_skipped"] = (
                f"profiled run est. {cost.seconds * PROFILER_SLOWDOWN:.0f} s > "
                f"--budget-profile-seconds {spec['budget_profile_seconds']:g}"
            )
        else:
            gc.collect()
            out["torch"] = _torch_peak(
                lambda: run_once(method, task, workload, horizon, forward, clock=False)
            )
        conn.send(out)
    except BaseException as e:  # report, do not hang the parent
        conn.send({"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})
    finally:
        conn.close()


class MemoryRunner:
    """Runs :func:`child` per measurement in processes forked from one clean server."""

    def __init__(self) -> None:
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(PRELOAD)

    def measure(self, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
        """One measurement; ``{"error": ...}`` if the child fails or outlives ``timeout``."""
        recv, send = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=child, args=(send, spec), daemon=True)
        proc.start()
        send.close()
        try:
            if recv.poll(timeout):
                return recv.recv()
            return {"error": f"no result within {timeout:.0f} s"}
        except EOFError:
            proc.join()
            return {"error": f"the measuring process died (exit code {proc.exitcode})"}
        finally:
            if proc.is_alive():
                proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
            recv.close()


def rss_reset_supported() -> bool:
    return os.path.exists("/proc/self/clear_refs")
