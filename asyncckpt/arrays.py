"""Array-likes and their bytes on the host: numpy (with the ``ml_dtypes`` dtypes),
``torch.Tensor`` and ``jax.Array``, plus the ``Stateful`` protocol of training objects.

This module decides what counts as an array, names its dtype in the shard format, gives
its data as a numpy array in host memory (a view where the value lives there, a copy from
a device otherwise) and turns host bytes back into a value of the kind that was saved, or
into an existing one (in-place restore). torch and jax are never imported to classify a
value: a value is a tensor only if torch is already loaded (``sys.modules``); decoding a
blob that was saved as a tensor imports torch then. ``ml_dtypes`` is imported only to
decode one of its dtypes.

Kinds: ``"numpy"`` (``np.ndarray``, ``np.memmap``), ``"torch"`` (``torch.Tensor`` and
``torch.nn.Parameter``, strided, not quantized, any device; conj/neg bits resolved) and
``"jax"`` (fully addressable ``jax.Array``).
"""

from __future__ import annotations

import importlib
import mmap
import re
import sys
from typing import Any

import numpy as np

from .errors import CheckpointError

__all__ = [
    "KINDS",
    "ML_DTYPE_NAMES",
    "UnsupportedArray",
    "array_kind",
    "assign",
    "device_target",
    "dtype_from_spec",
    "dtype_spec",
    "from_host",
    "host_memory",
    "host_target",
    "host_view",
    "is_stateful",
    "stage_copy",
]

KINDS = ("numpy", "torch", "jax")

#: ml_dtypes dtypes stored under their name (their numpy ``.str`` is an ambiguous ``'<V2'``)
ML_DTYPE_NAMES = frozenset(
    {
        "bfloat16",
        "float8_e3m4",
        "float8_e4m3",
        "float8_e4m3b11fnuz",
        "float8_e4m3fn",
        "float8_e4m3fnuz",
        "float8_e5m2",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
        "float6_e2m3fn",
        "float6_e3m2fn",
        "float4_e2m1fn",
        "int2",
        "int4",
        "uint2",
        "uint4",
    }
)
_ARRAY_KINDS = frozenset("biufcmMSU")
_DTYPE_RE = re.compile(r"^[<>|][biufcmMSU][0-9]{1,6}(\[[0-9]*[A-Za-z]{1,2}\])?$")
_SAME_SIZE_INT = {1: "uint8", 2: "int16"}  # torch dtypes numpy lacks are moved through these


class UnsupportedArray(TypeError):
    """An array-like that can not be saved as it is; the message says why."""


# --------------------------------------------------------------------------- dtypes


def dtype_spec(dtype: np.dtype[Any]) -> str | None:
    """The dtype's name in the shard format: numpy's ``.str`` (``'<f4'``) or an ml_dtypes
    name (``'bfloat16'``); ``None`` for dtypes that can not be stored (object, structured,
    void, zero-sized)."""
    if dtype.fields is not None or dtype.itemsize == 0:
        return None
    if dtype.type.__module__ == "ml_dtypes":  # before the kinds: float8_e5m2's .str is '<f1'
        return dtype.name if dtype.name in ML_DTYPE_NAMES else None
    if dtype.kind in _ARRAY_KINDS:
        return dtype.str
    return None


def dtype_from_spec(spec: Any) -> np.dtype[Any]:
    """The dtype a spec of :func:`dtype_spec` names; :class:`ValueError` for anything else
    (strictly: numpy warns or worse on legacy spellings, so they are refused first)."""
    if isinstance(spec, str) and spec in ML_DTYPE_NAMES:
        ml_dtype: np.dtype[Any] = np.dtype(getattr(_ml_dtypes(spec), spec))
        return ml_dtype
    if not isinstance(spec, str) or not _DTYPE_RE.match(spec):
        raise ValueError(f"bad dtype {spec!r}")
    try:
        dtype = np.dtype(spec)
    except TypeError as exc:
        raise ValueError(f"bad dtype {spec!r}") from exc
    if dtype_spec(dtype) != spec:
        raise ValueError(f"unsupported dtype {spec!r}")
    return dtype


def _ml_dtypes(name: str) -> Any:
    try:
        module = importlib.import_module("ml_dtypes")
    except ImportError:
        raise CheckpointError(f"dtype {name!r} needs the ml_dtypes package (pip install ml_dtypes)") from None
    if not hasattr(module, name):
        raise CheckpointError(f"dtype {name!r} needs a newer ml_dtypes than {module.__version__}")
    return module


# --------------------------------------------------------------------------- classify


def array_kind(value: Any) -> str | None:
    """``"numpy"``, ``"torch"`` or ``"jax"`` when ``value`` is an array of that kind, else
    ``None`` (subclasses included: :func:`host_view` refuses those it can not save)."""
    if isinstance(value, np.ndarray):
        return "numpy"
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return "torch"
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(value, getattr(jax, "Array", ())):
        return "jax"
    return None


def is_stateful(value: Any) -> bool:
    """Whether ``value`` follows the ``Stateful`` protocol (callable ``state_dict`` and
    ``load_state_dict``: a module, optimizer, scheduler or a user's object). A class is
    not: only its instances are."""
    return (
        not isinstance(value, type)
        and callable(getattr(value, "state_dict", None))
        and callable(getattr(value, "load_state_dict", None))
    )


# --------------------------------------------------------------------------- to the host


def host_view(value: Any, kind: str) -> np.ndarray[Any, Any]:
    """The data of array-like ``value`` (of :func:`array_kind` ``kind``) as a numpy array
    in host memory: a view of a numpy array or CPU tensor, a copy of device memory.
    Raises :class:`UnsupportedArray` for what can not be saved as it is."""
    if kind == "numpy":
        arr: np.ndarray[Any, Any] = value
    elif kind == "torch":
        arr = _torch_numpy(_torch_host_tensor(value))
    else:
        arr = _jax_numpy(value)
    _check_plain(arr)
    return arr


_PLAIN_PAGES_MIN = 1 << 20  # buffers at least this big are mapped, not malloc'ed
_POPULATED = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)  # Linux only


def host_memory(nbytes: int) -> memoryview:
    """``nbytes`` of fresh, writable host memory on ordinary pages, faulted in by the
    kernel in one call (``MAP_POPULATE``, on Linux), for a caller that fills all of it.

    Neither ``np.empty`` nor ``bytearray``: numpy asks the kernel for transparent huge
    pages on large arrays, whose first touch stalls where the kernel compacts memory to
    find them (THP defrag "madvise": 0.1-0.7 s for 192 MiB here, against a steady
    0.1-0.2 s), and ``bytearray(n)`` writes n zero bytes in a pass of its own. Populated
    at once, the pages cost about half of what faulting them in one by one as they are
    written does (192 MiB: 0.045 against 0.075-0.12 CPU-s here). That is CPU work of
    ~0.2 ms per MiB: call it off the event loop for large buffers."""
    if nbytes < _PLAIN_PAGES_MIN:
        return memoryview(bytearray(nbytes))
    return memoryview(mmap.mmap(-1, nbytes, flags=_POPULATED))


def _host_array(shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
    count = 1
    for size in shape:
        count *= size
    return np.frombuffer(host_memory(count * dtype.itemsize), dtype, count).reshape(shape)


def stage_copy(value: Any, kind: str, previous: Any) -> tuple[Any, np.ndarray[Any, Any]]:
    """A private host copy of ``value``'s data: (the buffer to keep for the next copy, a
    C-contiguous numpy view of it). ``previous`` (a buffer this function returned before,
    or ``None``) is reused when it has the same dtype and shape. A tensor is copied into a
    host tensor by torch (its copy runs on torch's intra-op threads: 0.06 s for 192 MiB
    into fresh memory here, against 0.11 s for ``np.copyto``), pinned for a CUDA tensor;
    everything else into a numpy array."""
    if kind == "torch":
        torch = sys.modules["torch"]
        tensor = _torch_resolved(value)
        if not isinstance(previous, torch.Tensor) or previous.dtype != tensor.dtype or previous.shape != tensor.shape:
            previous = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.device.type == "cuda")
        previous.copy_(tensor)  # blocking: the copy is done when copy_ returns
        return previous, _torch_numpy(previous)
    source = host_view(value, kind)
    if not isinstance(previous, np.ndarray) or previous.dtype != source.dtype or previous.shape != source.shape:
        previous = _host_array(source.shape, source.dtype)
    np.copyto(previous, source)
    return previous, previous


def _check_plain(arr: np.ndarray[Any, Any]) -> None:
    if type(arr) is not np.ndarray and type(arr) is not np.memmap:
        # a subclass carries state beyond the data (a mask, matrix semantics...) that a
        # load would silently drop: refuse it rather than return something else
        if isinstance(arr, np.ma.MaskedArray):
            raise UnsupportedArray("masked arrays are not supported (save .data and .mask as two blobs)")
        raise UnsupportedArray("ndarray subclasses are not supported (save np.asarray(value))")
    if dtype_spec(arr.dtype) is None:
        raise UnsupportedArray(f"dtype {arr.dtype} is not supported")


def _torch_resolved(tensor: Any) -> Any:
    """``tensor`` detached, with its lazy conj/neg bits applied, or refused."""
    torch = sys.modules["torch"]
    if type(tensor) is not torch.Tensor and type(tensor) is not torch.nn.Parameter:
        raise UnsupportedArray("tensor subclasses are not supported (DTensor and the like: use asyncckpt.dcp)")
    if tensor.layout != torch.strided or tensor.is_quantized or tensor.device.type == "meta":
        raise UnsupportedArray(f"only dense tensors with data are supported, not {tensor.layout} on {tensor.device}")
    tensor = tensor.detach()
    if tensor.is_conj():
        tensor = tensor.resolve_conj()
    if tensor.is_neg():
        tensor = tensor.resolve_neg()
    return tensor


def _torch_host_tensor(tensor: Any) -> Any:
    tensor = _torch_resolved(tensor)
    return tensor if tensor.device.type == "cpu" else tensor.cpu()


def _torch_numpy(tensor: Any) -> np.ndarray[Any, Any]:
    """A numpy view of a CPU tensor; bfloat16 and float8 through a same-sized int view."""
    torch = sys.modules["torch"]
    name = str(tensor.dtype).removeprefix("torch.")
    if name in ML_DTYPE_NAMES:
        carrier = getattr(torch, _SAME_SIZE_INT[tensor.element_size()])
        ml_dtype = np.dtype(getattr(_ml_dtypes(name), name))
        out: np.ndarray[Any, Any] = tensor.view(carrier).numpy().view(ml_dtype)
        return out
    try:
        arr: np.ndarray[Any, Any] = tensor.numpy()
    except (TypeError, RuntimeError):
        raise UnsupportedArray(f"tensor dtype {tensor.dtype} has no numpy equivalent") from None
    return arr


def _jax_numpy(array: Any) -> np.ndarray[Any, Any]:
    if not array.is_fully_addressable:
        raise UnsupportedArray("jax arrays spanning several processes are not supported (save each process's shards)")
    try:
        return np.asarray(array)
    except Exception as exc:  # a tracer, a deleted (donated) buffer...
        raise UnsupportedArray(f"jax array has no data to save ({type(exc).__name__}: {exc})") from None


# --------------------------------------------------------------------------- from the host


def from_host(arr: np.ndarray[Any, Any], kind: str, like: Any = None) -> Any:
    """The value of ``kind`` holding ``arr``'s data: ``arr`` itself, a CPU tensor sharing
    its memory, or a new ``jax.Array`` (on ``like``'s sharding when ``like`` is a
    ``jax.Array``). ``arr`` must be writable (torch shares it)."""
    if kind == "numpy":
        return arr
    if kind == "torch":
        torch = _framework("torch")
        name = arr.dtype.name
        if name in ML_DTYPE_NAMES:
            carrier = np.dtype(_SAME_SIZE_INT[arr.dtype.itemsize])
            return torch.from_numpy(arr.view(carrier)).view(getattr(torch, name))
        return torch.from_numpy(arr)
    jax = _framework("jax")
    if like is not None and isinstance(like, jax.Array):
        return jax.device_put(arr, like.sharding)
    return jax.numpy.asarray(arr)


def _framework(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        raise CheckpointError(f"this blob was saved from {name}: install {name} to load it") from None


# --------------------------------------------------------------------------- in place


def host_target(target: Any, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray[Any, Any] | None:
    """A writable numpy view of ``target``'s own memory when it is a numpy array or a CPU
    tensor of ``dtype`` and ``shape`` (any strides), else ``None``."""
    kind = array_kind(target)
    if kind == "numpy":
        if type(target) is not np.ndarray or not target.flags.writeable:
            return None
        view: np.ndarray[Any, Any] = target
    elif kind == "torch":
        torch = sys.modules["torch"]
        if (
            type(target) not in (torch.Tensor, torch.nn.Parameter)
            or target.device.type != "cpu"
            or target.layout != torch.strided
            or target.is_quantized
            or target.is_conj()
            or target.is_neg()
        ):
            return None
        try:
            view = _torch_numpy(target.detach())
        except UnsupportedArray:
            return None
    else:
        return None
    if view.dtype != dtype or view.shape != shape:
        return None
    if any(stride == 0 and size > 1 for stride, size in zip(view.strides, view.shape)):
        return None  # a broadcast view: several elements share one memory location
    return view


def device_target(target: Any, dtype: np.dtype[Any], shape: tuple[int, ...]) -> bool:
    """Whether ``target`` is a tensor on a device (not the CPU) of ``dtype`` and ``shape``,
    which :func:`assign` can fill from host memory."""
    torch = sys.modules.get("torch")
    if torch is None or type(target) not in (torch.Tensor, torch.nn.Parameter) or target.device.type == "cpu":
        return False
    if target.layout != torch.strided or target.is_quantized or target.device.type == "meta":
        return False
    name = str(target.dtype).removeprefix("torch.")
    try:
        expected = np.dtype(getattr(_ml_dtypes(name), name)) if name in ML_DTYPE_NAMES else None
        if expected is None:
            expected = torch.empty(0, dtype=target.dtype).numpy().dtype
    except (TypeError, RuntimeError, CheckpointError):
        return False
    return bool(expected == dtype and tuple(target.shape) == shape)


def assign(target: Any, arr: np.ndarray[Any, Any]) -> None:
    """Copy host array ``arr`` into ``target`` (a value :func:`host_target` or
    :func:`device_target` accepted), in place."""
    view = host_target(target, arr.dtype, arr.shape)
    if view is not None:
        np.copyto(view, arr)
        return
    with sys.modules["torch"].no_grad():
        target.copy_(from_host(np.ascontiguousarray(arr), "torch"))
