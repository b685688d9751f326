"""Small C/OpenMP kernels built on first use with the system C compiler, loaded with ctypes.

`load(name, source, signatures)` compiles `source` once per source version (and machine:
-march=native) into $SPARSEGROW_CACHE or ~/.cache/sparsegrow, atomically, and returns the ctypes
library with each function's argument and return types set from `signatures`, or None with a
warning when no compiler is found or the build fails (the reason in `errors[name]`): every caller
keeps a torch fallback.

Processes that start together (DataLoader workers, one rank per core) share the cache: the build
holds an exclusive `fcntl.flock` on `<name>_<digest>.lock` beside the library, so one process
compiles while the others wait and then load its result, instead of each running the compiler.

ctypes calls trust their pointers: a caller validates every tensor (dtype, device, contiguity,
size, index range) before it passes `data_ptr()` here, so bad input is a ValueError, not a crash.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: builds stay atomic (os.replace) but may run once per process
    fcntl = None

_libs: dict[str, ctypes.CDLL | None] = {}
errors: dict[str, str] = {}


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """Hold an exclusive inter-process lock on `lock_path` (created if missing)."""
    with open(lock_path, "a") as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # released when f is closed
        yield


def load(name: str, source: str, signatures: dict[str, tuple[list, object]]) -> ctypes.CDLL | None:
    """signatures: {function name: (argtypes, restype)}."""
    if name in _libs:
        return _libs[name]
    _libs[name] = None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        errors[name] = "no C compiler (cc/gcc) on PATH"
        return None
    # The machine is part of the key: the library is built with -march=native.
    key = f"{source}\n{platform.machine()}\n{platform.processor()}\n{platform.node()}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    cache = Path(os.environ.get("SPARSEGROW_CACHE", Path.home() / ".cache" / "sparsegrow"))
    lib_path = cache / f"{name}_{digest}.so"
    try:
        if not lib_path.exists():
            cache.mkdir(parents=True, exist_ok=True)
            with _exclusive(cache / f"{name}_{digest}.lock"):
                if not lib_path.exists():  # another process may have built it while we waited
                    _build(cc, name, source, cache, lib_path)
        lib = ctypes.CDLL(str(lib_path))
        for fn, (argtypes, restype) in signatures.items():
            getattr(lib, fn).argtypes, getattr(lib, fn).restype = argtypes, restype
        _libs[name] = lib
    except (OSError, subprocess.CalledProcessError) as e:
        err = getattr(e, "stderr", b"") or b""
        errors[name] = f"{e} {err.decode(errors='replace')[-500:]}"
        warnings.warn(f"sparsegrow: C kernels {name!r} unavailable, using torch ({errors[name]})")
    return _libs[name]


def _build(cc: str, name: str, source: str, cache: Path, lib_path: Path) -> None:
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        src = Path(tmp) / f"{name}.c"
        src.write_text(source)
        out = Path(tmp) / f"{name}.so"
        subprocess.run([cc, "-O3", "-march=native", "-fopenmp", "-fPIC", "-shared",
                        str(src), "-o", str(out)], check=True, capture_output=True)
        os.replace(out, lib_path)  # atomic: a reader never sees a half-written library
