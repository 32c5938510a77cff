"""What a latency figure depends on: the CPU, its ISA, the CPUs this process may use, how busy the machine
was, the library versions; and a sampler of this process's resident memory."""

from __future__ import annotations

import os
import platform
import threading
import time
from datetime import datetime, timezone

# The instruction-set extensions that decide which kernels the CPU backends pick.
ISA_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
    "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "sve",
)  # fmt: skip

# A machine is "busy" when other processes keep, on average, more than this share of the usable CPUs
# running: latency figures taken then are not comparable with a quiet machine's.
BUSY_SHARE = 0.5


def _cpuinfo() -> tuple[str, list[str]]:
    model, flags = "", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = value.split()
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), [f for f in ISA_FLAGS if f in flags]


def u8s8_saturates() -> bool:
    """Whether ONNX Runtime's default U8S8 integer kernels can saturate on this CPU: x86 without VNNI, where
    MLAS multiplies uint8 activations by int8 weights with ``vpmaddubsw``, which sums each pair of products
    into int16 and clips (255 * 127 * 2 > 32767); VNNI's ``vpdpbusd`` accumulates in int32 and is exact.
    Unknown CPUs (no /proc/cpuinfo) count as saturating, so the exact path is the one taken there."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    _, isa = _cpuinfo()
    return not {"avx512_vnni", "avx_vnni"} & set(isa)


def usable_cpus() -> int:
    """CPUs this process may run on (``os.sched_getaffinity``), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> float | None:
    """The 1-minute load average, or None where the platform has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def busy_warning(
    load_start: float | None, load_during: float | None, load_end: float | None, threads: int
) -> str | None:
    """A warning when other processes kept the machine busy.

    The 1-minute load average counts every runnable thread; at the start this command has barely run,
    during the timing (the highest reading taken between batch sizes) and at the end its own ``threads``
    have been running for the last minute, so they are subtracted there.
    """
    cpus = usable_cpus()
    own = [load_during, load_end]
    others = [v for v in (load_start, *(None if v is None else v - threads for v in own)) if v is not None]
    if not others or max(others) <= BUSY_SHARE * cpus:
        return None
    idle = cpus - max(others)
    # With fewer idle CPUs than threads, a multi-threaded runner waits at every parallel region for a
    # thread the scheduler preempted: PyTorch eager on edge_cnn took 1.6 ms with 1 thread and 450 ms with 2
    # on 2 CPUs at load 2.3.
    advice = (
        f"; fewer CPUs were idle ({max(idle, 0):.1f}) than --threads {threads}, so multi-threaded runners "
        f"waited on preempted threads: --threads {max(1, int(idle))} measures what this machine can give"
        if threads > 1 and idle < threads
        else ""
    )
    return (
        f"the machine was busy: 1-minute load average {load_start} before, {load_during} during the timing "
        f"(highest) and {load_end} after, on {cpus} usable CPU(s), this command running {threads} "
        "thread(s): latency figures are not comparable with a quiet machine's (the ratios between rows, "
        f"taken round by round, are the figures that hold){advice}"
    )


def machine_info(threads: int) -> dict:
    """The facts a latency figure needs beside it (the versions are added by the caller)."""
    model, isa = _cpuinfo()
    return {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu_model": model,
        "isa": isa,
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "threads": threads,
        "python": platform.python_version(),
    }


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


class PeakMemory:
    """Peak resident memory of this process while the ``with`` block runs, above its level at entry,
    sampled every ``interval_s`` by a background thread (the backends allocate in native code, which
    Python's allocator hooks do not see)."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()

    def _sample(self, base: int) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, _rss_bytes() - base)
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakMemory:
        self._thread = threading.Thread(target=self._sample, args=(_rss_bytes(),), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
