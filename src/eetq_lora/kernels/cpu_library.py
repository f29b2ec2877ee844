"""Compile the CPU kernels on first use, cache the library and load it for ctypes.

The C source (``csrc/eetq_cpu.c``, package data) is built once per machine with the system C
compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``), tuned for the host CPU (``-march=native``)
and parallel with OpenMP, and cached in the ``kernels/`` folder of the package cache
(``$EETQ_LORA_CACHE``, default ``~/.cache/eetq_lora``) keyed by the source, the compiler and the
CPU. A library is only loaded from a folder only this user can write (created 0700; an existing
one is checked), only if this user owns it, and only if it reports the ABI version that the
source defines (``#define EETQ_ABI_VERSION``). Where no compiler works or no such folder exists
the kernels report unavailable, with one warning, and the dispatcher uses pure-torch paths.
``EETQ_LORA_NATIVE=0`` turns them off without a warning.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
import warnings
from importlib import resources
from pathlib import Path

from ..atomic import write_text_atomic
from ..cache import UnsafeFolderError, cache_dir, check_private_file, fallback_cache_dir, private_dir

# The kernels' C source, shipped as package data next to this module.
SOURCE_PATH = ("csrc", "eetq_cpu.c")
_ABI_DEFINE = re.compile(r"^#define EETQ_ABI_VERSION (\d+)[ \t]*$", re.MULTILINE)

# Tried in order until one compiles: the host-tuned OpenMP build first, then weaker ones.
_FLAG_SETS = (
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-mcpu=native", "-fopenmp"),
    ("-O3", "-fopenmp"),
    ("-O3", "-march=native"),
    ("-O3",),
)
# -ffp-contract=off: the C spells out every fused multiply-add it wants (fmadd); any other a * b + c
# keeps its two roundings, as PyTorch's float ops do (the LoRA epilogue's base + t * scaling).
_COMMON_FLAGS = ("-shared", "-fPIC", "-std=gnu11", "-ffp-contract=off")

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int
_SIGNATURES = {
    "eetq_abi_version": ([], _INT),
    "eetq_has_openmp": ([], _INT),
    "eetq_rowdot": ([_P, _I64, _I64, _P, _I64, _I64, _I64, _P, _P, _P, _I64, _INT], _INT),
    "eetq_rowaxpy": ([_P, _I64, _I64, _P, _I64, _I64, _I64, _P, _P, _P, _I64, _INT], _INT),
    "eetq_dequant": ([_P, _I64, _I64, _I64, _P, _P, _P, _I64, _INT, _INT], None),
    "eetq_has_bf16_dot": ([], _INT),
    # operands (native.StreamOperands), a, a_format, M, out, out_format, nthreads
    "eetq_stream_call": ([_P, _P, _INT, _I64, _P, _INT, _INT], _INT),
}
# Present only in builds for CPUs with AVX512-BF16.
_BF16_SIGNATURES = {
    "eetq_rowdot_bf16": ([_P, _I64, _I64, _P, _I64, _I64, _I64, _P, _P, _I64, _INT], None),
    "eetq_rowaxpy_bf16": ([_P, _I64, _I64, _P, _I64, _I64, _I64, _P, _P, _I64, _INT], _INT),
}

_lock = threading.Lock()
_state: dict[str, object] = {}


@functools.cache
def source() -> str:
    """The C source of the kernels, as installed with the package."""
    return resources.files(__package__).joinpath(*SOURCE_PATH).read_text(encoding="utf-8")


def abi_version(text: str) -> int:
    """The ABI version that C source ``text`` defines (its one ``#define EETQ_ABI_VERSION N`` line)."""
    found = _ABI_DEFINE.findall(text)
    if len(found) != 1:
        raise RuntimeError(
            f"the kernel source {'/'.join(SOURCE_PATH)} must define EETQ_ABI_VERSION exactly once "
            f"(found {len(found)} definitions); reinstall eetq_lora"
        )
    return int(found[0])


def _find_compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_identity() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [line for line in f if line.startswith(("flags", "model name", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _compiler_version(compiler: str) -> str:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def kernel_dir() -> Path:
    """Where compiled kernels are kept: ``kernels/`` in the package cache."""
    return cache_dir() / "kernels"


def _private_kernel_dir() -> Path:
    # The cache's kernels/ folder, else a per-user one in the temp directory; each must belong to
    # this user and be closed to others, since the library found there is loaded and run.
    problems = []
    for candidate in (kernel_dir(), fallback_cache_dir() / "kernels"):
        try:
            folder = private_dir(candidate)
            if os.access(folder, os.W_OK):
                return folder
            problems.append(f"{folder} is not writable")
        except OSError as error:
            problems.append(str(error))
    raise UnsafeFolderError("no private folder for the compiled kernels: " + "; ".join(problems))


def _build_digest(compiler: str) -> str:
    identity = "\0".join(
        (source(), repr(_FLAG_SETS), compiler, _compiler_version(compiler), _cpu_identity(), platform.machine())
    )
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def _build(compiler: str) -> tuple[Path, str]:
    """Compile (or reuse) the kernel library; returns its path and the build log of failed attempts."""
    digest = _build_digest(compiler)
    directory = _private_kernel_dir()
    target = directory / f"eetq_cpu_{digest}.so"
    if os.path.lexists(target):
        check_private_file(target)
        return target, ""
    # The compiler reads a private copy of exactly the hashed text, written atomically so that a
    # concurrent first use never compiles half a file.
    c_file = directory / f"eetq_cpu_{digest}.c"
    write_text_atomic(c_file, source())
    log = []
    for flags in _FLAG_SETS:
        # A private output name, then an atomic rename: concurrent first uses never see half a file.
        fd, partial = tempfile.mkstemp(suffix=".so", dir=directory)
        os.close(fd)
        command = [compiler, *flags, *_COMMON_FLAGS, str(c_file), "-o", partial]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as error:
            result = None
            log.append(f"{' '.join(command)}: {error}")
        if result is not None and result.returncode == 0:
            os.replace(partial, target)
            return target, "\n".join(log)
        if result is not None:
            log.append(f"{' '.join(command)}:\n{result.stderr.strip()}")
        os.unlink(partial)
    raise RuntimeError("\n".join(log))


def _load() -> ctypes.CDLL | None:
    if os.environ.get("EETQ_LORA_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        _state["reason"] = "disabled by EETQ_LORA_NATIVE=0"
        return None
    compiler = _find_compiler()
    if compiler is None:
        _state["reason"] = "no C compiler found (set CC or install gcc)"
        _warn(_state["reason"])
        return None
    try:
        expected_abi = abi_version(source())
        path, _ = _build(compiler)
        library = ctypes.CDLL(str(path))
        signatures = dict(_SIGNATURES)
        if library.eetq_has_bf16_dot():
            signatures.update(_BF16_SIGNATURES)
        for name, (argtypes, restype) in signatures.items():
            function = getattr(library, name)
            function.argtypes = argtypes
            function.restype = restype
        if library.eetq_abi_version() != expected_abi:
            raise RuntimeError(
                f"kernel library {path} has ABI {library.eetq_abi_version()}, expected {expected_abi}; "
                "delete it to rebuild"
            )
    except UnsafeFolderError as error:
        _state["reason"] = f"refusing to build or load compiled kernels ({error})"
        _warn(_state["reason"])
        return None
    except Exception as error:  # noqa: BLE001 - any build or load failure means "use the torch paths"
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        _state["reason"] = f"building the CPU kernels failed ({first_line})"
        _state["log"] = str(error)
        _warn(_state["reason"])
        return None
    _state["path"] = str(path)
    return library


def _warn(reason: str) -> None:
    warnings.warn(
        f"eetq_lora: {reason}; CPU int8 matmuls fall back to slower pure-torch paths", RuntimeWarning, stacklevel=3
    )


def library() -> ctypes.CDLL | None:
    """The compiled kernel library, building it on the first call; ``None`` where it cannot be had."""
    if "library" not in _state:
        with _lock:
            if "library" not in _state:
                _state["library"] = _load()
    return _state["library"]  # type: ignore[return-value]


def is_available() -> bool:
    """Whether the compiled CPU kernels can be used (builds them on first call)."""
    return library() is not None


def status() -> dict[str, object]:
    """What happened when loading: ``available``, and ``path`` or ``reason`` (plus the build ``log``)."""
    library()
    return {"available": _state.get("library") is not None, **{k: v for k, v in _state.items() if k != "library"}}


def _reset_for_tests() -> None:
    with _lock:
        _state.clear()


def has_bf16_dot() -> bool:
    """Whether the build has the bfloat16 dot-product kernels (CPUs with AVX512-BF16)."""
    lib = library()
    return lib is not None and bool(lib.eetq_has_bf16_dot())
