"""What the `HpsLookup` op calls: the process's server (HPS's once-per-process init, explicit or implicit from the
op's `ps_config_file`), the checks, and the lookup callback - without TensorFlow's Python package.

Two ways in, one lookup path:
- A Python process: `interop.tf_plugin` loads the op library and calls `attach(path)`.
- A process with no Python (Triton's TensorFlow backend, TF Serving, a C++ loader): the op library finds no
  callback on its first lookup, starts an interpreter of the Python it was built with (the Python C API through
  dlopen, never linked), imports this module and calls `attach(path)` with its own path. The server then starts
  from the config path stored in the graph, as HPS's lazy initialisation does.

Nothing here imports TensorFlow: in the second case TensorFlow's C++ runtime is already in the process and its
Python package has no business there.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import sys
import threading
from typing import Any

import torch

from hps_core import engine as hps_engine
from interop import dlpack

log = logging.getLogger(__name__)

__all__ = ["ABI_VERSION", "attach", "set_native", "init", "server", "shutdown", "check_global_batch_size", "validate",
           "last_error", "clear_last_error"]

ABI_VERSION = 2  # must equal kAbiVersion in hps_lookup_op.cc

# absl::StatusCode numbers the kernel turns into TF errors.
_OK, _INVALID_ARGUMENT, _NOT_FOUND, _FAILED_PRECONDITION, _INTERNAL = 0, 3, 5, 9, 13

# ---------------------------------------------------------------------------------------------- initialisation

_init_lock = threading.Lock()
_init_source: Any = None  # what the server was started from, for the "already initialised" message


def _check_batch_size_arg(global_batch_size: Any) -> None:
    if isinstance(global_batch_size, bool) or not isinstance(global_batch_size, int) or global_batch_size < 1:
        raise ValueError(f"global_batch_size must be an int >= 1, found {global_batch_size!r}")


def check_global_batch_size(server: hps_engine.HierarchicalParameterServer, global_batch_size: Any,
                            num_replicas: int = 1) -> int:
    """HPS: global_batch_size / num_replicas <= max_batch_size (per replica) of every model."""
    _check_batch_size_arg(global_batch_size)
    per_replica = -(-global_batch_size // num_replicas)
    for name, model in server.config.models.items():
        if per_replica > model.max_batch_size:
            across = f" / {num_replicas} replicas = {per_replica}" if num_replicas > 1 else ""
            raise ValueError(
                f"global_batch_size = {global_batch_size}{across} exceeds models.{name}.max_batch_size = "
                f"{model.max_batch_size} (HPS: max_batch_size, per replica)"
            )
    return global_batch_size


def init(ps_config_file: Any, global_batch_size: Any, explicit: bool = False,
         replicas: int = 1) -> hps_engine.HierarchicalParameterServer:
    """Start the process's server once (HPS semantics: later calls are no-ops and return it)."""
    global _init_source
    with _init_lock:
        try:
            running = hps_engine.default_server()
        except RuntimeError:
            running = None
        if running is None:
            empty_path = isinstance(ps_config_file, (str, os.PathLike)) and not os.fspath(ps_config_file)
            if ps_config_file is None or empty_path:
                raise ValueError("ps_config_file must name an HPS JSON or YAML config (or be a config object), found "
                                 f"{ps_config_file!r}")
            _check_batch_size_arg(global_batch_size)  # before the server is built
            running = hps_engine.init(ps_config_file)
            try:
                check_global_batch_size(running, global_batch_size, replicas)
            except ValueError:
                hps_engine.shutdown()  # a rejected Init leaves nothing behind
                raise
            _init_source = ps_config_file
            log.info("hierarchical parameter server initialised from %s", ps_config_file)
        elif ps_config_file is not None and ps_config_file != _init_source and _init_source is not None:
            # HPS semantics: once per process, later calls are no-ops (an implicit init from a SavedModel's
            # recorded config path must not fail where the deployment initialised explicitly).
            log.log(logging.WARNING if explicit else logging.DEBUG,
                    "HPS is already initialised from %s (once per process); ignoring %s", _init_source, ps_config_file)
        return running


def shutdown() -> None:
    """Close this process's server so that a later init starts a new one (tests, redeploys)."""
    global _init_source
    with _init_lock:
        hps_engine.shutdown()
        _init_source = None


def server(ps_config_file: str, global_batch_size: int) -> hps_engine.HierarchicalParameterServer:
    """The running server; started from the op's config when there is none yet (HPS implicit init). An empty
    config path falls back to $HPS_PS_CONFIG_FILE (a graph saved without one, served where the config lives
    elsewhere)."""
    try:
        return hps_engine.default_server()
    except RuntimeError:
        ps_config_file = ps_config_file or os.environ.get("HPS_PS_CONFIG_FILE", "")
        if not ps_config_file:
            raise RuntimeError(
                "the hierarchical parameter server is not initialised: call "
                "hps.Init(global_batch_size=..., ps_config_file=...) first, or construct the layer with "
                "ps_config_file and global_batch_size (implicit init), or set HPS_PS_CONFIG_FILE"
            ) from None
        return init(ps_config_file, global_batch_size)


_TORCH_KEY_DTYPES = {torch.int32: "int32", torch.int64: "int64"}


def validate(running: hps_engine.HierarchicalParameterServer, model_name: str, table_id: int, emb_vec_size: int,
             key_dtype: str, num_keys: int | None) -> None:
    """HPS's forward_check, raising: model, table id, dim, key dtype, batch size (when known)."""
    rt = running.table(model_name, table_id)  # KeyError naming the models / table ids that exist
    if emb_vec_size != rt.dim:
        raise ValueError(
            f"emb_vec_size = {emb_vec_size} but table {table_id} ({rt.name!r}) of model {model_name!r} has "
            f"dimension {rt.dim}"
        )
    expected = running.config.key_dtype
    if key_dtype != expected:
        raise TypeError(
            f"ids are {key_dtype} but the deployment's keys are {expected} (supportlonglong = "
            f"{'true' if expected == 'int64' else 'false'}): cast the ids to {expected}"
        )
    if num_keys is not None and num_keys > rt.max_keys_per_call:
        raise ValueError(
            f"{num_keys} ids in one lookup of {model_name}/{rt.name} exceed max_batch_size × "
            f"maxnum_catfeature_query_per_table_per_sample = {rt.max_keys_per_call}"
        )


# ---------------------------------------------------------------------------------------------- the callback

_errors = threading.local()  # the Python exception behind the last failed kernel call of this thread


def last_error() -> BaseException | None:
    """The exception behind this thread's last failed kernel call (eager callers re-raise it), if any."""
    return getattr(_errors, "last", None)


def clear_last_error() -> None:
    _errors.last = None


def _error_code(exc: BaseException) -> int:
    if isinstance(exc, KeyError):
        return _NOT_FOUND
    if isinstance(exc, (TypeError, ValueError)):
        return _INVALID_ARGUMENT
    if isinstance(exc, RuntimeError):
        return _FAILED_PRECONDITION
    return _INTERNAL


def _exception_message(exc: BaseException) -> str:
    # KeyError's str() quotes its argument; show the text itself.
    text = exc.args[0] if isinstance(exc, KeyError) and len(exc.args) == 1 else str(exc)
    return f"{type(exc).__name__}: {text}"


_CALLBACK_TYPE = ctypes.CFUNCTYPE(
    ctypes.c_int,  # status code
    ctypes.c_char_p,  # model_name
    ctypes.c_int64,  # table_id
    ctypes.c_int64,  # emb_vec_size
    ctypes.c_char_p,  # ps_config_file
    ctypes.c_int64,  # global_batch_size
    ctypes.c_void_p,  # DLManagedTensor* keys (ours to free)
    ctypes.POINTER(ctypes.c_void_p),  # DLManagedTensor** result (the kernel's to free)
    ctypes.c_void_p,  # char* err
    ctypes.c_int64,  # err capacity
)

_ROUTE_TYPE = ctypes.CFUNCTYPE(
    ctypes.c_int64,  # the engine's CPU pipeline handle, or -1 (no route: the callback serves and reports)
    ctypes.c_char_p,  # model_name
    ctypes.c_int64,  # table_id
    ctypes.c_int64,  # emb_vec_size
    ctypes.c_char_p,  # ps_config_file
    ctypes.c_int64,  # global_batch_size
    ctypes.c_int,  # key_is_int64
)

_libraries: dict[str, ctypes.CDLL] = {}  # op libraries attached, by path
_delete_dlpack: Any = None  # hps_tf_delete_dlpack of the attached library


def _lookup_callback(model_name: bytes, table_id: int, emb_vec_size: int, ps_config_file: bytes,
                     global_batch_size: int, keys_ptr: int, result: Any, err: int, err_capacity: int) -> int:
    """Called by the HpsLookup kernel (any TF thread; ctypes holds the GIL). Never raises: returns a status."""
    try:
        keys = torch.from_dlpack(dlpack.capsule_from_pointer(keys_ptr))  # TF's buffer, not copied
    except BaseException as exc:  # noqa: BLE001 - must not unwind into C++
        _delete_dlpack(keys_ptr)
        return _fail(exc, err, err_capacity)
    try:
        model = model_name.decode()
        running = server(ps_config_file.decode(), global_batch_size)
        validate(running, model, table_id, emb_vec_size, _TORCH_KEY_DTYPES[keys.dtype], keys.numel())
        out = running.lookup(model, table_id, keys)
        # The kernel adopts this buffer as its output: it must be contiguous and 64-byte aligned for TF.
        result[0] = dlpack.release_to_pointer(dlpack.aligned(out))
        return _OK
    except BaseException as exc:  # noqa: BLE001 - must not unwind into C++
        return _fail(exc, err, err_capacity)


def _fail(exc: BaseException, err: int, err_capacity: int) -> int:
    _errors.last = exc
    message = _exception_message(exc).encode("utf-8", "replace")[: max(err_capacity - 1, 0)]
    ctypes.memmove(err, message + b"\0", len(message) + 1)
    if _error_code(exc) == _INTERNAL:
        log.error("HPS lookup failed", exc_info=exc)
    return _error_code(exc)


_callback = _CALLBACK_TYPE(_lookup_callback)  # module global: must outlive every kernel call


def _route_callback(model_name: bytes, table_id: int, emb_vec_size: int, ps_config_file: bytes,
                    global_batch_size: int, key_is_int64: int) -> int:
    """The native route of an op (called once per op kernel, and again after its server closed): the handle of the
    table's CPU lookup pipeline (its cache, or the pass-through of a table without one), which the kernel then
    calls without Python. -1 when a check fails (the callback raises it)."""
    try:
        running = server(ps_config_file.decode(), global_batch_size)
        model = model_name.decode()
        validate(running, model, table_id, emb_vec_size, "int64" if key_is_int64 else "int32", None)
        return int(running.cpu_pipeline(model, table_id).handle)
    except BaseException:  # noqa: BLE001 - must not unwind into C++; the callback path reports it
        return -1


_route = _ROUTE_TYPE(_route_callback)


_native_address = 0


def _native_lookup_address() -> int:
    """Address of hps_native_lookup in the engine's extension (the same loaded library: same path, same handle)."""
    global _native_address
    if not _native_address:
        from hps_core import _loader

        _loader.load_extension()
        extension = ctypes.CDLL(sys.modules["hps_core._C"].__file__)
        _native_address = int(ctypes.cast(extension.hps_native_lookup, ctypes.c_void_p).value)
    return _native_address


def attach(library_path: str | os.PathLike) -> None:
    """Register the lookup callback with the op library at `library_path` (already loaded in this process: the
    same path gives the same handle, so the kernel sees it). Idempotent.

    Raises:
        ImportError: the library was built for another callback ABI.
    """
    global _delete_dlpack
    path = os.fspath(library_path)
    lib = _libraries.get(path)
    if lib is None:
        lib = ctypes.CDLL(path)
        lib.hps_tf_op_abi_version.restype = ctypes.c_int
        if lib.hps_tf_op_abi_version() != ABI_VERSION:  # pragma: no cover - a stale library with another ABI
            raise ImportError(
                f"{path} has callback ABI {lib.hps_tf_op_abi_version()}, this module needs {ABI_VERSION}: "
                "rebuild it with `python -m interop.tf_op.build --force`"
            )
        lib.hps_tf_delete_dlpack.argtypes = [ctypes.c_void_p]
        lib.hps_tf_delete_dlpack.restype = None
        lib.hps_tf_register_lookup_callback.argtypes = [_CALLBACK_TYPE]
        lib.hps_tf_register_lookup_callback.restype = None
        lib.hps_tf_register_native.argtypes = [ctypes.c_void_p, _ROUTE_TYPE]
        lib.hps_tf_register_native.restype = None
        _libraries[path] = lib
    _delete_dlpack = lib.hps_tf_delete_dlpack
    lib.hps_tf_register_lookup_callback(_callback)
    _register_native(lib, _native_enabled)


# HPS_TF_NATIVE=0 keeps every lookup on the callback (debugging; the benchmark compares the two paths).
_native_enabled = os.environ.get("HPS_TF_NATIVE", "1") != "0"


def _register_native(lib: ctypes.CDLL, enabled: bool) -> None:
    if enabled:
        lib.hps_tf_register_native(_native_lookup_address(), _route)
    else:
        lib.hps_tf_register_native(None, _ROUTE_TYPE())


def set_native(enabled: bool) -> None:
    """Let the op reach the engine's CPU pipelines natively (the default), or send every lookup through the Python
    callback (what HPS_TF_NATIVE=0 does at start)."""
    global _native_enabled
    _native_enabled = bool(enabled)
    for lib in _libraries.values():
        _register_native(lib, _native_enabled)


def _detach_all() -> None:
    # A kernel running during interpreter shutdown gets a clean FailedPrecondition instead of calling into a
    # finalising interpreter.
    for lib in _libraries.values():
        lib.hps_tf_register_native(None, _ROUTE_TYPE())
        lib.hps_tf_register_lookup_callback(_CALLBACK_TYPE())


atexit.register(_detach_all)
