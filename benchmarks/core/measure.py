"""One way to time a step and to measure peak memory, for every benchmark script.

* :func:`time_steps`: ``warmup`` untimed rounds, then ``repeats`` timed rounds; with several
  steps they run interleaved round by round, so that a change in the machine's load (it is
  shared) touches them all alike. ``time.perf_counter`` around each step, with the device
  synchronised before and after it (CUDA); an optional untimed ``before`` runs ahead of each
  step (clearing gradients, a barrier).
* :class:`PeakMemory`: the peak over a baseline taken by :meth:`PeakMemory.start`: on CUDA
  ``torch.cuda.max_memory_allocated`` (tensor memory), on CPU the process's peak resident set
  (VmHWM of /proc/self/status, reset at the baseline by writing 5 to /proc/self/clear_refs;
  where the kernel refuses, it counts from the process start and ``reset`` is False).
* :func:`allocation_peak_mib`: the tensor memory one CPU step allocates at its worst moment,
  from the torch profiler's record of every allocation (not the process's resident set).
* :func:`product_floor`: the reference every speed ratio divides by.
* :func:`host_syncs`: the synchronising CUDA calls of one step, as CUDA itself reports them.
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import Action, MemoryProfileTimeline

Step = Callable[[], Any]
MIB = 2**20


def product_floor(embeddings: torch.Tensor, proxies: torch.Tensor) -> torch.Tensor:
    """The forward-only ``F.normalize(X) @ F.normalize(P).T`` of a shape: the least any
    proxy loss pays there (its backward and what it does with the product come on top)."""
    with torch.no_grad():
        return F.normalize(embeddings) @ F.normalize(proxies).T


def proc_field(path: str, key: str) -> str | None:
    """Value of the first ``key: value`` line of a /proc file, or None where there is none."""
    try:
        with open(path) as lines:
            for line in lines:
                name, _, value = line.partition(":")
                if name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return None


def proc_status_kib(key: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM, VmSize...) in KiB."""
    return int(proc_field("/proc/self/status", key).split()[0])


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
    except OSError:
        return False
    return True


def usable_cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the machine's total)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages: above the core count, timings are disturbed."""
    return [round(load, 2) for load in os.getloadavg()] if hasattr(os, "getloadavg") else None


def synchronizer(device: str | torch.device) -> Callable[[], None]:
    """Waits for the device's queued work (CUDA); does nothing on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


# The text of the warning torch.cuda.set_sync_debug_mode("warn") gives for each such call.
SYNCHRONIZING_CALL = "called a synchronizing CUDA operation"


def host_syncs(step: Step, device: str | torch.device) -> int | None:
    """How many synchronising CUDA calls one ``step`` makes, counted from the warnings of
    ``torch.cuda.set_sync_debug_mode("warn")`` (backward's worker threads included); None
    off CUDA, where nothing waits for the device."""
    if torch.device(device).type != "cuda":
        return None
    synchronizer(device)()
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum(SYNCHRONIZING_CALL in str(warning.message) for warning in caught)


def time_steps(
    steps: Mapping[str, Step],
    repeats: int,
    warmup: int = 1,
    before: Step | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, list[float]]:
    """Seconds of each timed call of each step: ``{name: [repeats values]}``."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    synchronize = synchronizer(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(warmup + repeats):
        for name, step in steps.items():
            if before is not None:
                before()
            synchronize()
            start = time.perf_counter()
            step()
            synchronize()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def relative_difference(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """|ours - theirs| / |theirs| (Frobenius norms): how far two codes' results lie apart."""
    return float((ours - theirs).norm() / theirs.norm().clamp_min(1e-30))


def median_seconds(
    step: Step,
    repeats: int,
    warmup: int = 1,
    before: Step | None = None,
    device: str | torch.device = "cpu",
) -> float:
    """Median seconds of ``step`` (see :func:`time_steps`)."""
    return statistics.median(time_steps({"step": step}, repeats, warmup, before, device)["step"])


class PeakMemory:
    """Peak memory above a baseline, in bytes, on ``device`` (see the module docstring)."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.baseline = 0
        self.reset = False

    def start(self) -> PeakMemory:
        """Take the baseline now and count the peak from here."""
        synchronizer(self.device)()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            self.reset = True
        else:
            self.reset = reset_peak_rss()
            self.baseline = proc_status_kib("VmRSS") * 1024
        return self

    def peak_bytes(self) -> int:
        """The peak since :meth:`start` (CPU: of the whole process's resident memory)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return proc_status_kib("VmHWM") * 1024

    def extra_bytes(self) -> int:
        """The peak since :meth:`start` above the baseline."""
        return max(0, self.peak_bytes() - self.baseline)


def allocation_peak_mib(
    step: Callable[[], Any], leaves: Sequence[torch.Tensor] = ()
) -> tuple[float, float]:
    """(peak, working peak): tensor memory of one ``step`` over what was live before it.

    From the torch profiler's memory timeline, which records every allocation and free of
    torch's CPU allocator: tensor memory, not the process's RSS. "working" leaves out the
    gradients that the step leaves in ``leaves``' ``.grad`` from the moment each is
    allocated: it is what the computation itself holds at its worst moment.
    """
    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as profiler:
        step()
    gradients = {leaf.grad.untyped_storage().data_ptr() for leaf in leaves if leaf.grad is not None}
    events = [
        (key, action, size)
        for _, action, (key, _), size in MemoryProfileTimeline(profiler._memory_profile()).timeline
        if key.device.type == "cpu" and action != Action.INCREMENT_VERSION
    ]
    live_at_end: dict[Any, int] = {}
    for key, action, size in events:
        if action == Action.DESTROY:
            live_at_end.pop(key, None)
        else:
            live_at_end[key] = size
    gradient_keys = {key for key in live_at_end if key.storage.ptr in gradients}
    live = working = 0
    before = peak = working_peak = None
    for key, action, size in events:
        change = -size if action == Action.DESTROY else size
        live += change
        working += 0 if key in gradient_keys else change
        if action != Action.PREEXISTING:
            if before is None:
                before = (live - change, working - (0 if key in gradient_keys else change))
            peak, working_peak = max(peak or live, live), max(working_peak or working, working)
    if before is None:  # the step allocated nothing
        return 0.0, 0.0
    return (peak - before[0]) / MIB, (working_peak - before[1]) / MIB
