"""What the last save, load and partial load cost, per node: caffe2's checkpoint stats."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from .manifest import EpochIndex, NodeStats
from .storage import Storage

__all__ = ["ACTIONS", "StatsBook"]

#: Action names of ``report_checkpoint_stats`` (as in caffe2).
ACTIONS = ("checkpoint_save", "checkpoint_load", "checkpoint_partial_load")


def _empty_report(action: str, epoch: int | None = None) -> dict[str, Any]:
    return {
        "action": action,
        "epoch": epoch,
        "nodes": {},
        "slowest_node": None,
        "seconds": 0.0,
        "bytes": 0,
        "reused_bytes": 0,
    }


class StatsBook:
    """The latest report of each action.

    A report is ``{"action", "epoch", "nodes": {node: {seconds, bytes, reused_bytes,
    objects, requests, retries, db_name}}, "slowest_node", "seconds", "bytes",
    "reused_bytes"}``. ``bytes`` are the bytes written (a save) or read (a load);
    ``reused_bytes``, of a save, the payload bytes it did not upload because they were
    stored already (an incremental save, ``TransferConfig.incremental``).
    """

    def __init__(self) -> None:
        self._reports: dict[str, dict[str, Any]] = {}

    @staticmethod
    def check_action(action: str) -> None:
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}; expected one of {ACTIONS}")

    def started(self, action: str, epoch: int) -> None:
        """An action began: until it records its own, its report is an empty one."""
        self._reports[action] = _empty_report(action, epoch)

    def record(
        self,
        action: str,
        index: EpochIndex,
        seconds: float,
        storage: Storage,
        node_stats: Mapping[str, NodeStats] | None = None,
    ) -> None:
        """Record ``action`` on ``index``'s epoch; ``node_stats`` default to the ones the
        index keeps from the save."""
        if node_stats is None:
            node_stats = {node: record.stats for node, record in index.nodes.items()}
        nodes = {
            node: {**stats.to_json(), "db_name": storage.url_of(index.nodes[node].shard)}
            for node, stats in node_stats.items()
        }
        self._reports[action] = {
            "action": action,
            "epoch": index.epoch,
            "nodes": nodes,
            "slowest_node": max(nodes, key=lambda n: nodes[n]["seconds"]) if nodes else None,
            "seconds": round(seconds, 6),
            "bytes": sum(n["bytes"] for n in nodes.values()),
            "reused_bytes": sum(n["reused_bytes"] for n in nodes.values()),
        }

    def report(self, action: str) -> dict[str, Any]:
        """A copy of the latest report of ``action`` (an empty one if it never ran)."""
        self.check_action(action)
        return copy.deepcopy(self._reports.get(action) or _empty_report(action))
