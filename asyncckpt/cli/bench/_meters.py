"""What one measurement records, read from ``/proc``, ``getrusage`` and the server's log (Linux).

A :class:`Meter` brackets one operation in a child process: wall time, client CPU (user
and system, self and children), page faults, peak RSS (``VmHWM`` after resetting it
through ``/proc/self/clear_refs``; ``ru_maxrss`` as a fallback), RSS before the op, the
server's CPU (``/proc/PID/stat``) and the requests the server logged meanwhile, with the
bytes of the object bodies it sent (:func:`parse_server_log`).
"""

from __future__ import annotations

import gc
import os
import re
import resource
import time
from typing import Any

from asyncckpt.testing.s3_server import BODY_LOG_PREFIX

__all__ = ["Meter", "parse_server_log", "process_cpu_s", "process_rss_mib", "rss_kib"]


def rss_kib(field: str = "VmRSS") -> int | None:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``...) in KiB; None when unreadable."""
    return _status_kib("/proc/self/status", field)


def process_rss_mib(pid: int) -> float | None:
    """The resident memory of process ``pid`` in MiB; None when unreadable."""
    kib = _status_kib(f"/proc/{pid}/status", "VmRSS")
    return None if kib is None else kib / 1024


def _status_kib(path: str, field: str) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    """Reset VmHWM (the peak RSS) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cpu_self() -> float:
    user, system = _cpu_split()
    return user + system


def _cpu_split() -> tuple[float, float]:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + c.ru_utime, s.ru_stime + c.ru_stime


def _faults() -> int:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_minflt + s.ru_majflt + c.ru_minflt + c.ru_majflt


def process_cpu_s(pid: int | None) -> float | None:
    """CPU seconds of process ``pid`` and its waited-for children (``/proc/PID/stat``); None when unreadable."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # fields[0] is field 3 (state): utime=14, stime=15, cutime=16, cstime=17
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_REQUEST = re.compile(r'"([A-Z]+) (\S+) HTTP/[0-9.]+" (\d{3})')
_BODY = re.compile(rf"^{BODY_LOG_PREFIX} ([A-Z]+) (\S+) \d{{3}} (\d+)$")


def parse_server_log(text: str) -> dict[str, Any]:
    """Count the server's (werkzeug's) request lines: total, per method, per status, the
    multipart parts uploaded; and ``object_body_bytes``, the bytes of the object bodies
    the server sent (GETs of a key, not of a bucket listing)."""
    methods: dict[str, int] = {}
    statuses: dict[str, int] = {}
    multipart_parts = 0
    total = 0
    object_body_bytes = 0
    for line in _ANSI.sub("", text).splitlines():
        body = _BODY.match(line)
        if body is not None:
            method, path, length = body.groups()
            if method == "GET" and _is_object_path(path):
                object_body_bytes += int(length)
            continue
        m = _REQUEST.search(line)
        if not m:
            continue
        method, path, status = m.groups()
        total += 1
        methods[method] = methods.get(method, 0) + 1
        statuses[status] = statuses.get(status, 0) + 1
        if method == "PUT" and "partNumber=" in path:
            multipart_parts += 1
    return {
        "total": total,
        "methods": methods,
        "statuses": statuses,
        "upload_parts": multipart_parts,
        "object_body_bytes": object_body_bytes,
    }


def _is_object_path(path: str) -> bool:
    """``/bucket/key...`` (path-style addressing), not ``/bucket`` or ``/bucket/?list-type=2``."""
    bucket_and_key = path.partition("?")[0].strip("/").split("/", 1)
    return len(bucket_and_key) == 2 and bool(bucket_and_key[1])


class Meter:
    """Measures one operation of a child process (see the module docstring)."""

    def __init__(self, server_pid: int | None, server_log: str | None):
        self.server_pid = server_pid
        self.server_log = server_log
        self.laps: dict[str, dict[str, Any]] = {}

    def _log_size(self) -> int | None:
        try:
            return os.path.getsize(self.server_log) if self.server_log else None
        except OSError:
            return None

    def start(self) -> None:
        gc.collect()
        self.loadavg = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        self.rss_before_kib = rss_kib("VmRSS")
        self.ru_maxrss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.hwm_reset = _reset_hwm()
        self.log0 = self._log_size()
        self.srv0 = process_cpu_s(self.server_pid)
        self.faults0 = _faults()
        self.split0 = _cpu_split()
        self.cpu0 = _cpu_self()
        self.t0 = time.perf_counter()

    def lap(self, name: str) -> None:
        """An intermediate reading (e.g. when ``save_async`` returns)."""
        t = time.perf_counter()
        cpu = _cpu_self()
        self.laps[name] = {"wall_s": t - self.t0, "cpu_s": cpu - self.cpu0, "peak_rss_kib": rss_kib("VmHWM")}

    def stop(self) -> None:
        self.t1 = time.perf_counter()
        self.cpu1 = _cpu_self()
        self.split1 = _cpu_split()
        self.faults1 = _faults()
        self.srv1 = process_cpu_s(self.server_pid)
        self.hwm_kib = rss_kib("VmHWM")
        self.ru_maxrss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.log1 = self._log_size()

    def result(self) -> dict[str, Any]:
        """Every reading of the op between :meth:`start` and :meth:`stop`, JSON-ready."""
        requests = None
        if self.log0 is not None and self.log1 is not None and self.server_log:
            with open(self.server_log, "rb") as f:
                f.seek(self.log0)
                requests = parse_server_log(f.read(self.log1 - self.log0).decode("utf-8", "replace"))
        peak = self.hwm_kib if self.hwm_reset and self.hwm_kib else self.ru_maxrss_kib
        return {
            "wall_s": self.t1 - self.t0,
            "cpu_s": self.cpu1 - self.cpu0,
            "cpu_user_s": self.split1[0] - self.split0[0],
            "cpu_sys_s": self.split1[1] - self.split0[1],
            "page_faults": self.faults1 - self.faults0,
            "server_cpu_s": (self.srv1 - self.srv0) if self.srv0 is not None and self.srv1 is not None else None,
            "rss_before_mib": (self.rss_before_kib or 0) / 1024,
            "peak_rss_mib": (peak or 0) / 1024,
            "peak_rss_source": "VmHWM" if self.hwm_reset and self.hwm_kib else "ru_maxrss",
            "ru_maxrss_mib": self.ru_maxrss_kib / 1024,
            "ru_maxrss_before_mib": self.ru_maxrss_before_kib / 1024,
            "requests": requests,
            # what the clients of the op received as object bodies, as the server counts it
            "received_bytes": requests["object_body_bytes"] if requests is not None else None,
            "laps": self.laps,
            "loadavg_1m": self.loadavg,
        }
