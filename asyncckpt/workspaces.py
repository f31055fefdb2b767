"""What ``init`` and ``set_params`` take as nodes: names, or names with their workspaces."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

from . import layout

__all__ = ["Workspaces", "job_workspaces", "normalize_nodes", "partial_request"]

Workspaces = dict[str, MutableMapping[str, Any]]


def normalize_nodes(nodes: Any) -> Workspaces:
    """Node names (a sequence) or a mapping name -> workspace, as name -> workspace, in
    order; a name without a workspace gets a new dict. Bad names, duplicates and
    workspaces that are not a ``MutableMapping`` raise :class:`ValueError`/:class:`TypeError`."""
    if isinstance(nodes, (str, bytes)):
        raise TypeError(f"nodes must be a sequence of node names or a mapping, not a single {type(nodes).__name__}")
    if isinstance(nodes, Mapping):
        pairs = list(nodes.items())
    elif isinstance(nodes, Iterable):
        pairs = [(name, None) for name in nodes]
    else:
        raise TypeError(f"nodes must be a sequence of node names or a mapping, got {type(nodes).__name__}")
    if not pairs:
        raise ValueError("nodes must name at least one node")
    out: Workspaces = {}
    for name, workspace in pairs:
        layout.validate_node_name(name)
        if name in out:
            raise ValueError(f"duplicate node name {name!r}")
        if workspace is None:
            workspace = {}
        elif not isinstance(workspace, MutableMapping):
            raise TypeError(f"workspace of node {name!r} must be a MutableMapping, got {type(workspace).__name__}")
        out[name] = workspace
    return out


def job_workspaces(nodes: Any, local_nodes: Any = None) -> tuple[Workspaces, Workspaces]:
    """(every node of the job, the nodes this process holds), each name -> workspace.

    ``local_nodes`` (names or a mapping) must be among ``nodes``; by default every node
    is local. A local node named without a workspace takes the one ``nodes`` gave it.
    """
    normalized = normalize_nodes(nodes)
    if local_nodes is None:
        return normalized, normalized
    local = normalize_nodes(local_nodes)
    strangers = [n for n in local if n not in normalized]
    if strangers:
        raise ValueError(f"local_nodes {strangers} are not among the job's nodes {list(normalized)}")
    if isinstance(nodes, Mapping) and not isinstance(local_nodes, Mapping):
        local = {n: normalized[n] for n in local}
    return normalized, local


def partial_request(nodes: Any, blob_names: Any, session: Any) -> tuple[list[str], list[str]]:
    """``load_blobs_locally``'s arguments checked: (node names, blob names); bad ones raise
    :class:`TypeError`/:class:`ValueError` before any I/O."""
    node_names = list(normalize_nodes(nodes))
    if isinstance(blob_names, (str, bytes)) or not isinstance(blob_names, Iterable):
        raise TypeError("blob_names must be a sequence of blob names")
    names = list(blob_names)
    for name in names:
        if not isinstance(name, str) or not name:
            raise TypeError(f"blob names must be non-empty str, got {name!r}")
    if not isinstance(session, MutableMapping):
        raise TypeError(f"session must be a MutableMapping, got {type(session).__name__}")
    return node_names, names
