"""A training job driven by ``JobRunner`` or by a plain loop over ``SyncCheckpointManager``,
run as a child process by the resume tests, and SIGKILLed by itself at a chosen epoch.

    python runner_child.py MODE LOCATION NUM_EPOCHS [--kill-after K [--in-flight]] [--endpoint URL]

MODE is ``runner`` (``JobRunner`` with a plain ``train_epoch``, run in a worker thread),
``runner-async`` (the same with a coroutine ``train_epoch``) or ``sync`` (a synchronous
loop: ``SyncCheckpointManager`` with ``save_async`` overlapping the next epoch).
``--kill-after K`` kills the process (SIGKILL, to its own PID) once epoch K is
committed, when epoch K+1 starts (``--in-flight``: without waiting for the commit, so
the save of epoch K may be cut short). A run that ends prints ``FINAL <digest>`` of its
workspaces. The parent starts it with :func:`run_child` and compares what it left with an
uninterrupted run, recomputed in-process (:func:`assert_same_as_uninterrupted`).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

NODES = ("trainer_0", "trainer_1")
SEED = 11
WAIT = 30.0


def initial_state() -> dict[str, dict[str, Any]]:
    """The workspaces before training (epoch 0)."""
    return {
        node: {"w": np.linspace(-1.0, 1.0, 2048, dtype=np.float32) * (i + 1), "step": 0, "seen": []}
        for i, node in enumerate(NODES)
    }


def train_step(workspaces: dict[str, Any], epoch: int) -> dict[str, float]:
    """One epoch of "training", in place (as an optimizer step is): the new state depends
    on the old one, so a resume that loaded the wrong epoch ends elsewhere."""
    losses = []
    for i, node in enumerate(NODES):
        ws = workspaces[node]
        noise = np.random.default_rng([SEED, epoch, i]).standard_normal(ws["w"].shape, dtype=np.float32)
        ws["w"] *= np.float32(0.9)
        ws["w"] += noise * np.float32(0.1)
        ws["step"] += 1
        ws["seen"] = [*ws["seen"], epoch]
        losses.append(float(np.mean(ws["w"].astype(np.float64) ** 2)))
    return {"loss": sum(losses) / len(losses), "epoch": float(epoch)}


def uninterrupted(num_epochs: int) -> tuple[list[dict[str, dict[str, Any]]], list[dict[str, float]]]:
    """The state after each epoch 0..num_epochs of an uninterrupted run, and each
    epoch's metrics (epoch 0 has none)."""
    workspaces = initial_state()
    states = [_copy(workspaces)]
    metrics: list[dict[str, float]] = [{}]
    for epoch in range(1, num_epochs + 1):
        metrics.append(train_step(workspaces, epoch))
        states.append(_copy(workspaces))
    return states, metrics


def state_digest(workspaces: dict[str, Any]) -> str:
    digest = hashlib.sha256()
    for node in NODES:
        ws = workspaces[node]
        digest.update(f"{node}:{ws['step']}:{ws['seen']}:{ws['w'].dtype}:{ws['w'].shape}".encode())
        digest.update(ws["w"].tobytes())
    return digest.hexdigest()


def run_child(
    mode: str, location: Any, num_epochs: int, *, kill_after: int | None = None, in_flight: bool = False
) -> list[str]:
    """Run the child job on ``location`` (a test ``Location``) to its end, or to its SIGKILL
    when ``kill_after`` is given; its stdout lines."""
    command = [sys.executable, str(Path(__file__)), mode, location.url, str(num_epochs)]
    if kill_after is not None:
        command += ["--kill-after", str(kill_after)] + (["--in-flight"] if in_flight else [])
    if location.options:
        command += ["--endpoint", location.options["endpoint_url"]]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)  # killed (by PID) past it
    expected = -signal.SIGKILL if kill_after is not None else 0
    assert done.returncode == expected, f"exit {done.returncode}, expected {expected}:\n{done.stdout}{done.stderr}"
    return done.stdout.splitlines()


def run_example(script: str, cwd: Path, args: list[str]) -> list[str]:
    """Run ``examples/<script>`` to its end; its stdout lines, the last of which is ``PASS``."""
    path = Path(__file__).parents[2] / "examples" / script
    done = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, timeout=120, cwd=cwd)
    assert done.returncode == 0, f"exit {done.returncode}:\n{done.stdout}{done.stderr}"
    lines = done.stdout.splitlines()
    assert lines[-1] == "PASS", done.stdout
    return lines


def run_readme_snippet(name: str, url: str, location: Path) -> list[str]:
    """Run the README.md example marked ``<!-- readme-example: name -->`` as it is written,
    but with ``url`` replaced by the directory ``location``; its stdout lines."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    match = re.search(rf"<!-- readme-example: {name} -->\n```python\n(.*?)```", readme, re.S)
    assert match, f"README has no example marked {name!r}"
    assert url in match.group(1), f"{url} is not in the README example {name!r}"
    code = match.group(1).replace(url, str(location))
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=location.parent
    )
    assert done.returncode == 0, f"exit {done.returncode}:\n{done.stdout}{done.stderr}"
    return done.stdout.splitlines()


async def assert_same_as_uninterrupted(location: Any, num_epochs: int, final_line: str) -> None:
    """Every epoch 0..num_epochs is committed at ``location`` and holds, bit for bit, the
    state (and metrics) of an uninterrupted run; ``final_line`` is the digest such a run
    ends with."""
    from asyncckpt import MultiNodeCheckpointManager
    from tests.support.crash_child import assert_state_equal

    states, metrics = uninterrupted(num_epochs)
    assert final_line == f"FINAL {state_digest(states[-1])}"
    async with MultiNodeCheckpointManager(location.url, storage_options=location.options) as mgr:
        await mgr.init(list(NODES))
        assert await mgr.committed_epochs() == list(range(num_epochs + 1))
        manifests = await mgr.committed_manifests()
        for epoch, want in enumerate(states):
            for node in NODES:
                mgr.workspace(node).clear()
            await mgr.load(epoch)
            for node in NODES:
                assert_state_equal(dict(mgr.workspace(node)), want[node], f"epoch {epoch} node {node}")
            assert manifests[epoch].metrics == metrics[epoch], epoch


def _copy(workspaces: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        node: {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in ws.items()}
        for node, ws in workspaces.items()
    }


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _wait_until(committed: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not committed():
        if time.monotonic() > deadline:
            raise TimeoutError("the awaited epoch was never committed")
        time.sleep(0.01)


async def run_with_job_runner(args: argparse.Namespace, options: dict[str, Any] | None) -> None:
    from asyncckpt import JobRunner, MultiNodeCheckpointManager

    workspaces = initial_state()
    async with MultiNodeCheckpointManager(args.location, storage_options=options) as mgr:
        await mgr.init(workspaces)
        loop = asyncio.get_running_loop()

        def committed(epoch: int) -> bool:
            future = asyncio.run_coroutine_threadsafe(mgr.committed_epochs(), loop)
            return epoch in future.result(WAIT)

        def train_epoch(epoch: int) -> dict[str, float]:  # runs in a worker thread
            if args.kill_after is not None and epoch == args.kill_after + 1:
                if not args.in_flight:
                    _wait_until(lambda: committed(args.kill_after))
                _die()
            return train_step(workspaces, epoch)

        async def train_epoch_async(epoch: int) -> dict[str, float]:
            if args.kill_after is not None and epoch == args.kill_after + 1:
                deadline = time.monotonic() + WAIT
                while not args.in_flight and args.kill_after not in await mgr.committed_epochs():
                    assert time.monotonic() < deadline, "the awaited epoch was never committed"
                    await asyncio.sleep(0.01)
                _die()
            return train_step(workspaces, epoch)

        runner = JobRunner(mgr)
        last = await runner.run(train_epoch_async if args.mode == "runner-async" else train_epoch, args.num_epochs)
        assert last == args.num_epochs and not runner.failed_saves, (last, runner.failed_saves)
        print(f"RESUMED {runner.resumed_from}", flush=True)
    if args.kill_after == args.num_epochs:
        _die()
    print(f"FINAL {state_digest(workspaces)}", flush=True)


def run_sync_loop(args: argparse.Namespace, options: dict[str, Any] | None) -> None:
    """The loop a PyTorch user writes: no asyncio in sight."""
    from asyncckpt import SyncCheckpointManager

    workspaces = initial_state()
    with SyncCheckpointManager(args.location, storage_options=options) as mgr:
        mgr.init(workspaces)
        resume = mgr.get_resume_from_epoch_id()
        if resume is None:
            mgr.save(0)
            first = 1
        else:
            mgr.load(resume)
            first = resume + 1
        print(f"RESUMED {resume}", flush=True)
        if args.kill_after == 0 and resume is None:
            _die()
        pending = None
        for epoch in range(first, args.num_epochs + 1):
            metrics = train_step(workspaces, epoch)
            if pending is not None:
                pending.result()
            pending = mgr.save_async(epoch, metrics=metrics)
            if epoch == args.kill_after:
                if not args.in_flight:
                    pending.result()
                _die()
        if pending is not None:
            pending.result()
    print(f"FINAL {state_digest(workspaces)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["runner", "runner-async", "sync"])
    parser.add_argument("location")
    parser.add_argument("num_epochs", type=int)
    parser.add_argument("--kill-after", type=int)
    parser.add_argument("--in-flight", action="store_true")
    parser.add_argument("--endpoint")
    args = parser.parse_args()
    options = None
    if args.endpoint:
        options = {"endpoint_url": args.endpoint, "region_name": "us-east-1", "addressing_style": "path"}
    if args.mode == "sync":
        run_sync_loop(args, options)
    else:
        asyncio.run(run_with_job_runner(args, options))


if __name__ == "__main__":
    main()
