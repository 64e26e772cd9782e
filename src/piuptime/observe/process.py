"""Process metrics, read at scrape time from ``/proc/self`` (Linux) and ``resource``.

``register_process_metrics(metrics)`` adds, all ``piuptime_``-prefixed so one ``{__name__=~
"piuptime_.*"}`` selects everything the gateway publishes:

- ``process_cpu_seconds_total``: user + system CPU time (``resource.getrusage``)
- ``process_resident_memory_bytes``, ``process_virtual_memory_bytes`` (``/proc/self/statm``)
- ``process_open_fds`` (``/proc/self/fd``), ``process_max_fds`` (``RLIMIT_NOFILE``)
- ``process_start_time_seconds``: Unix time the process started (``/proc/self/stat``)
- ``process_threads`` (``/proc/self/stat``)
- ``python_gc_collections_total{generation}``, ``python_gc_objects_collected_total{generation}``
- ``build_info{version,python}``: always 1

Where ``/proc`` is missing (not Linux) the figures it gives are left out rather than guessed;
the start time then falls back to the time this module was imported.
"""

from __future__ import annotations

import gc
import os
import platform
import resource
import time

from piuptime.observe.metrics import Metrics

__all__ = ["register_process_metrics"]

_IMPORTED_AT = time.time()
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

Samples = list[tuple[tuple[str, ...], float]]


def _stat_fields() -> list[str] | None:
    """``/proc/self/stat`` after the command name (which may hold spaces), or None."""
    try:
        with open("/proc/self/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def _start_time() -> float:
    """Unix time this process started: boot time plus the start tick from /proc."""
    fields = _stat_fields()
    try:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"btime "):
                    boot = float(line.split()[1])
                    break
            else:
                return _IMPORTED_AT
    except OSError:
        return _IMPORTED_AT
    if fields is None:
        return _IMPORTED_AT
    # field 22 of stat (starttime); fields here begin at field 3 (state)
    return boot + int(fields[22 - 3]) / _TICKS


def cpu_seconds() -> Samples:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return [((), ru.ru_utime + ru.ru_stime)]


def memory(index: int) -> Samples:
    try:
        with open("/proc/self/statm", "rb") as f:
            parts = f.read().split()
    except OSError:
        return []
    return [((), float(int(parts[index]) * _PAGE))]


def open_fds() -> Samples:
    try:
        return [((), float(len(os.listdir("/proc/self/fd"))))]
    except OSError:
        return []


def max_fds() -> Samples:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return [] if soft == resource.RLIM_INFINITY else [((), float(soft))]


def threads() -> Samples:
    fields = _stat_fields()
    return [] if fields is None else [((), float(fields[20 - 3]))]


def gc_collections() -> Samples:
    return [((str(i),), float(s["collections"])) for i, s in enumerate(gc.get_stats())]


def gc_collected() -> Samples:
    return [((str(i),), float(s["collected"])) for i, s in enumerate(gc.get_stats())]


def register_process_metrics(metrics: Metrics, version: str) -> None:
    """Add the process families to ``metrics`` (idempotent)."""
    started = _start_time()
    m = metrics
    m.counter("process_cpu_seconds", "User and system CPU time spent, seconds", read=cpu_seconds)
    m.gauge(
        "process_resident_memory_bytes",
        "Resident set size (RSS), bytes",
        read=lambda: memory(1),
    )
    m.gauge("process_virtual_memory_bytes", "Virtual memory size, bytes", read=lambda: memory(0))
    m.gauge("process_open_fds", "Open file descriptors (sockets included)", read=open_fds)
    m.gauge("process_max_fds", "Limit on open file descriptors (RLIMIT_NOFILE)", read=max_fds)
    m.gauge(
        "process_start_time_seconds",
        "Start time of the process, seconds since the Unix epoch",
        read=lambda: [((), started)],
    )
    m.gauge("process_threads", "OS threads of the process", read=threads)
    m.counter(
        "python_gc_collections",
        "Garbage collector runs, by generation",
        ("generation",),
        read=gc_collections,
    )
    m.counter(
        "python_gc_objects_collected",
        "Objects the garbage collector freed, by generation",
        ("generation",),
        read=gc_collected,
    )
    info = (version, platform.python_version())
    m.gauge(
        "build_info",
        "Always 1; the piuptime version and Python version as labels",
        ("version", "python"),
        read=lambda: [(info, 1.0)],
    )
