"""asyncckpt: asyncio checkpoints of multi-node training state on S3-compatible storage.

The public face is :class:`MultiNodeCheckpointManager`, the asyncio descendant of
caffe2's class of the same name::

    async with MultiNodeCheckpointManager("s3://bucket/run1") as mgr:
        await mgr.init({"trainer_0": ws0, "trainer_1": ws1})
        await mgr.save(epoch)
"""

from .codec import FORMAT_VERSION
from .config import MiB, TransferConfig
from .errors import (
    CheckpointConflictError,
    CheckpointCorruptedError,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointStateError,
    CheckpointTimeoutError,
    ObjectTooShortError,
    StorageError,
)
from .handler import MetadataHandler
from .housekeeping import GcReport
from .launcher import JobIdentity, job_from_env, split_nodes
from .manager import MultiNodeCheckpointManager
from .manifest import EpochManifest, NodeRecord, NodeStats
from .retention import Retention
from .runner import JobRunner
from .staging import SaveHandle
from .stats import ACTIONS
from .sync import SyncCheckpointManager

__version__ = "0.1.0"

__all__ = [
    "ACTIONS",
    "FORMAT_VERSION",
    "CheckpointConflictError",
    "CheckpointCorruptedError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointStateError",
    "CheckpointTimeoutError",
    "EpochManifest",
    "GcReport",
    "JobIdentity",
    "JobRunner",
    "MetadataHandler",
    "MiB",
    "MultiNodeCheckpointManager",
    "NodeRecord",
    "NodeStats",
    "Retention",
    "ObjectTooShortError",
    "SaveHandle",
    "StorageError",
    "SyncCheckpointManager",
    "TransferConfig",
    "__version__",
    "job_from_env",
    "split_nodes",
]
