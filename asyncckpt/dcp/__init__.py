"""A ``torch.distributed.checkpoint`` (DCP) storage plugin on asyncckpt's storage.

::

    import torch.distributed.checkpoint as dcp
    from asyncckpt.dcp import StorageReader, StorageWriter

    dcp.save(state_dict, storage_writer=StorageWriter("s3://bucket/run/step-100"))
    dcp.async_save(state_dict, storage_writer=StorageWriter(...)).result()
    dcp.load(state_dict, storage_reader=StorageReader("s3://bucket/run/step-100"))

A location (``s3://``, ``file://`` or a path, ``memory://``) is the directory of one
checkpoint: data objects under a per-attempt key, and DCP's metadata committed last,
create-only (see ``_format`` for the layout). Importing this module imports torch;
``import asyncckpt`` never does.
"""

from __future__ import annotations

from ._format import StoredItem
from ._reader import StorageReader
from ._writer import StorageWriter

__all__ = ["StorageReader", "StorageWriter", "StoredItem"]
