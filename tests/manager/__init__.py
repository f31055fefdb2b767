"""MultiNodeCheckpointManager through its public API, one concern per module."""
