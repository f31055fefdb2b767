"""Limits and transfer settings: the one place where every tunable number lives."""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20

__all__ = ["TransferConfig", "MiB"]


@dataclass(frozen=True)
class TransferConfig:
    """How much a manager may do at once, and how it talks to object storage.

    The defaults suit a trainer on one host writing to S3 or MinIO. Every value is
    validated when the object is created.

    Concurrency and memory
        ``max_concurrency``: storage requests in flight per manager (the S3 connection
        pool is sized to match). ``max_nodes_in_flight``: nodes encoded/uploaded at once.
        ``max_bytes_in_flight``: encoded bytes buffered for upload at once, across nodes.
    Multipart
        ``part_size``: size of one multipart part (S3 needs >= 5 MiB except the last);
        a shard of at most one part is uploaded with a single PUT. ``range_size``: size of one ranged GET when a
        large shard is downloaded in parallel. ``coalesce_gap``: partial loads fetch two wanted blobs
        with one ranged GET when at most this many unwanted bytes lie between them.
    S3 client
        ``checksum_mode``: ``"when_required"`` (default: botocore adds no CRC of its own;
        asyncckpt's CRC32C protects every blob end to end; works on MinIO, Ceph, R2...)
        or ``"when_supported"`` (botocore >= 1.36 default: an extra CRC32 on every upload,
        which some S3-compatible stores reject). ``payload_signing``: SHA-256 the request
        body for SigV4 (costs about 1 CPU-second per GB; TLS and our CRC32C already
        guard the bytes). ``retry_mode``/``max_attempts``: botocore's retry strategy; ``max_attempts``
        counts every attempt, the first one included (botocore's ``total_max_attempts``).
        ``connect_timeout``/``read_timeout``: per request, in seconds.
    Multi-process jobs
        ``commit_timeout``: how long a process's ``save`` waits for the other
        processes' receipts before giving up (seconds).
    Incremental saves
        ``incremental``: a blob whose bytes and layout are those it had in the last
        epoch this manager committed or loaded (same location, still committed) is not
        uploaded again; the new epoch points at the stored bytes. Costs one more hash
        pass (XXH3-128, beside the CRC32C) over blobs of 64 KiB or more and one read of
        each node's blob index per save. On by default (README, "Incremental saves").
    """

    max_concurrency: int = 8
    max_nodes_in_flight: int = 4
    max_bytes_in_flight: int = 80 * MiB
    part_size: int = 16 * MiB
    range_size: int = 64 * MiB
    coalesce_gap: int = 1 * MiB
    checksum_mode: str = "when_required"
    payload_signing: bool = False
    retry_mode: str = "standard"
    max_attempts: int = 5
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    commit_timeout: float = 600.0
    incremental: bool = True

    def __post_init__(self) -> None:
        for name in ("max_concurrency", "max_nodes_in_flight", "max_attempts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TransferConfig.{name} must be a positive int, got {value!r}")
        if self.part_size < 5 * MiB:
            raise ValueError(f"TransferConfig.part_size must be at least 5 MiB (S3's minimum), got {self.part_size}")
        if self.range_size < 1:
            raise ValueError("TransferConfig.range_size must be positive")
        if not isinstance(self.coalesce_gap, int) or isinstance(self.coalesce_gap, bool) or self.coalesce_gap < 0:
            raise ValueError(f"TransferConfig.coalesce_gap must be a non-negative int, got {self.coalesce_gap!r}")
        if self.max_bytes_in_flight < self.part_size:
            raise ValueError(
                f"TransferConfig.max_bytes_in_flight ({self.max_bytes_in_flight}) must be at least part_size ({self.part_size})"
            )
        if self.checksum_mode not in ("when_required", "when_supported"):
            raise ValueError(
                f"TransferConfig.checksum_mode must be 'when_required' or 'when_supported', got {self.checksum_mode!r}"
            )
        if self.retry_mode not in ("legacy", "standard", "adaptive"):
            raise ValueError(
                f"TransferConfig.retry_mode must be 'legacy', 'standard' or 'adaptive', got {self.retry_mode!r}"
            )
        if self.connect_timeout <= 0 or self.read_timeout <= 0 or self.commit_timeout <= 0:
            raise ValueError("TransferConfig timeouts must be positive")
        if not isinstance(self.incremental, bool):
            raise ValueError(f"TransferConfig.incremental must be a bool, got {self.incremental!r}")
