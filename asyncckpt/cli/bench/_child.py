"""The entry point of one measurement: ``python -m asyncckpt.cli.bench._child JOB``.

``JOB`` is a :class:`~._state.ChildJob` as JSON. The process runs that one op (on an
event loop of its own when the op is a coroutine) and prints one JSON line: what the op
returned, the meter's readings, and ``status`` (``ok``, ``mismatch`` when a load read
back other bytes, ``unavailable`` when the op's feature is missing in this asyncckpt, or
``error`` with the exception). Its exit code is 0 when the status
is ``ok``, else 1. Only :mod:`._run` starts it.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import sys
import warnings
from typing import Any

from ._meters import Meter, rss_kib
from ._ops import CHILD_OPS, ChildContext
from ._peer_ops import PEER_CHILD_OPS
from ._state import ChildJob

__all__ = ["main"]


def main(argv: list[str]) -> int:
    """Run the op of ``argv[0]`` (a JSON :class:`~._state.ChildJob`); print its one JSON line."""
    warnings.simplefilter("ignore")  # e.g. aiohttp's ResourceWarning about large raw bodies
    rss_libs = rss_kib("VmRSS")
    job = ChildJob.from_json(argv[0])
    ctx = ChildContext(job, job.params.layout(), Meter(job.server_pid, job.server_log))
    out: dict[str, Any] = {"op": job.op, "prefix": job.prefix, "pid": os.getpid()}
    try:
        op = CHILD_OPS.get(job.op) or PEER_CHILD_OPS[job.op]
        extra = asyncio.run(op(ctx)) if inspect.iscoroutinefunction(op) else op(ctx)
        out.update(extra)
        out.setdefault("status", "ok")
        if out["status"] == "ok" and job.op != "prep":
            out.update(ctx.meter.result())
            if out.get("verified") is False:
                out["status"] = "mismatch"
    except BaseException as exc:  # report, never hang the parent
        lines = str(exc).strip().splitlines() or [""]  # a multi-line message (a traceback): its first and last line
        summary = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1].strip()}"
        out.update(status="error", error=f"{type(exc).__name__}: {summary}")
    out["rss_libs_mib"] = (rss_libs or 0) / 1024
    print(json.dumps(out), flush=True)
    return 0 if out["status"] == "ok" else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m asyncckpt.cli.bench._child JOB (a JSON job; `asyncckpt bench` starts this)")
    sys.exit(main(sys.argv[1:]))
