"""The public surface, pinned (as httpx's test_exported_members.py does).

``__all__`` of each public module equals the set written here, every name in it imports,
and nothing public-looking is reachable by accident: a change of the surface is a change
of this file, made on purpose.
"""

from __future__ import annotations

import importlib
import inspect
from types import ModuleType

import pytest

import asyncckpt
import asyncckpt.storage
import asyncckpt.testing

ASYNCCKPT = {
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
    "ObjectTooShortError",
    "Retention",
    "SaveHandle",
    "StorageError",
    "SyncCheckpointManager",
    "TransferConfig",
    "__version__",
    "job_from_env",
    "split_nodes",
}

STORAGE = {
    "PATH_TYPES",
    "ByteBudget",
    "LocalStorage",
    "MemoryStorage",
    "ObjectInfo",
    "ObjectWriter",
    "PendingUpload",
    "RequestStats",
    "S3Storage",
    "Storage",
    "collect_request_stats",
    "drop_memory_store",
    "parse_location",
    "reader_for",
    "storage_for",
    "validate_key",
}

TESTING_MODULES = {
    "asyncckpt.testing.s3_server": {
        "HOST",
        "REGION",
        "READY_LINE",
        "BODY_LOG_PREFIX",
        "S3Server",
        "SubprocessS3Server",
        "ThreadedS3Server",
        "admin_client",
        "create_bucket",
        "delete_bucket",
        "embedded_bucket",
        "empty_bucket",
        "new_bucket_name",
    },
    "asyncckpt.testing.storage_suite": {"INVALID_KEYS", "StorageConformance", "payload"},
    "asyncckpt.testing.wrappers": {"OPERATIONS", "Fault", "FaultyStorage", "LatencyStorage", "StorageWrapper"},
}

#: Names a package face binds only to write its own annotations: not part of the API.
TYPING_ONLY = {"annotations", "TYPE_CHECKING", "Any"}


def public_attributes(module: ModuleType) -> set[str]:
    """Every attribute a user reaches without an underscore, submodules left out."""
    return {
        name
        for name in dir(module)
        if not name.startswith("_") and name not in TYPING_ONLY and not inspect.ismodule(getattr(module, name))
    }


def star_import(module: ModuleType) -> set[str]:
    namespace: dict[str, object] = {}
    exec(f"from {module.__name__} import *", namespace)
    return set(namespace) - {"__builtins__"}


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        pytest.param(asyncckpt, ASYNCCKPT, id="asyncckpt"),
        pytest.param(asyncckpt.storage, STORAGE, id="asyncckpt.storage"),
    ],
)
def test_a_package_face_exports_exactly_its_expected_names(module: ModuleType, expected: set[str]) -> None:
    assert len(module.__all__) == len(set(module.__all__)), "a name is listed twice"
    assert set(module.__all__) == expected
    assert star_import(module) == expected
    for name in module.__all__:
        assert getattr(module, name) is not None, name


@pytest.mark.parametrize("module", [asyncckpt, asyncckpt.storage], ids=lambda m: m.__name__)
def test_a_package_face_has_no_public_attribute_outside_its_all(module: ModuleType) -> None:
    assert public_attributes(module) == set(module.__all__) - {"__version__"}


def test_the_version_is_a_str() -> None:
    assert isinstance(asyncckpt.__version__, str) and asyncckpt.__version__


def test_the_testing_package_exports_only_its_modules() -> None:
    assert not hasattr(asyncckpt.testing, "__all__")
    assert public_attributes(asyncckpt.testing) == set()


@pytest.mark.parametrize(("name", "expected"), TESTING_MODULES.items(), ids=TESTING_MODULES.keys())
def test_a_testing_module_exports_exactly_its_expected_names(name: str, expected: set[str]) -> None:
    module = importlib.import_module(name)
    assert len(module.__all__) == len(set(module.__all__)), "a name is listed twice"
    assert set(module.__all__) == expected
    assert star_import(module) == expected


@pytest.mark.parametrize("name", TESTING_MODULES, ids=TESTING_MODULES.keys())
def test_every_public_class_and_function_a_testing_module_defines_is_exported(name: str) -> None:
    module = importlib.import_module(name)
    defined_here = {
        attr
        for attr, value in vars(module).items()
        if not attr.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and value.__module__ == module.__name__
    }
    assert defined_here <= set(module.__all__), sorted(defined_here - set(module.__all__))
