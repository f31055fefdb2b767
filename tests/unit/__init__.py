"""Pure layers tested alone: codec, layout, manifest, node (one shard), config, task helpers."""
