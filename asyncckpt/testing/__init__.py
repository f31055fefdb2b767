"""Test rigs shipped with asyncckpt, for its own suite and for its users' suites.

Nothing here is imported by the library itself; importing this package imports
nothing heavy. Pick the module you need:

* :mod:`asyncckpt.testing.s3_server`: an S3 endpoint on 127.0.0.1 (moto's server, in a
  thread or a subprocess), an admin client, and helpers to make and empty buckets.
* :mod:`asyncckpt.testing.storage_suite`: the storage conformance suite (pytest);
  subclass it once per backend.
* :mod:`asyncckpt.testing.wrappers`: storage wrappers that inject faults or latency.
"""
