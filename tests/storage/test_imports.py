"""Importing asyncckpt stays light: the S3 stack loads only when an S3 location is opened."""

from __future__ import annotations

import subprocess
import sys

import pytest

_S3_STACK = ("aioboto3", "aiobotocore", "botocore")


def _loaded_modules_after(code: str) -> set[str]:
    """The top-level modules a fresh interpreter has loaded after running ``code``."""
    probe = f"{code}\nimport sys\nprint('\\n'.join(sorted({{m.partition('.')[0] for m in sys.modules}})))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    return set(result.stdout.split())


@pytest.mark.parametrize(
    "code",
    [
        "import asyncckpt",
        "import asyncckpt.storage",
        "from asyncckpt.storage import storage_for; storage_for('/tmp/asyncckpt-import-probe')",
        "from asyncckpt.storage import storage_for; storage_for('memory://import-probe')",
    ],
)
def test_import_does_not_load_the_s3_stack(code: str) -> None:
    loaded = _loaded_modules_after(code)
    assert not loaded & set(_S3_STACK), sorted(loaded & set(_S3_STACK))


def test_import_asyncckpt_leaves_no_s3_module_in_sys_modules() -> None:
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import asyncckpt, sys; "
            f"assert not any(m.startswith({_S3_STACK!r}) for m in sys.modules), sorted(sys.modules)",
        ],
        check=True,
        timeout=120,
    )


def test_s3_storage_is_importable_from_the_package_face() -> None:
    from asyncckpt.storage import S3Storage, storage_for

    assert isinstance(storage_for("s3://bucket-name/prefix"), S3Storage)
    assert S3Storage.__module__ == "asyncckpt.storage._s3"
