"""Builds and loads the C++ kernels (qmatmul.cpp, decode_ops.cpp, grid_search.cpp) on first use, or says why they cannot be used.

The extension is compiled once by torch.utils.cpp_extension.load (JIT, ninja) into torch's extension folder
(~/.cache/torch_extensions/..., or $TORCH_EXTENSIONS_DIR), or into $INFOPT_EXT_DIR when that is set; torch
rebuilds it when the source or flags change. It registers its ops under torch.ops.infopt_kernels, so calls go
through the dispatcher (no pybind module). INFOPT_NO_EXT=1 turns it off; so does a non-x86-64 CPU or one without
AVX-512 F/BW/VL/DQ, FMA and F16C, a missing C++ compiler or ninja, or any build error (one warning with the
reason, then the torch fallback). A first build takes about 10-15 s; later processes load the cached library.

Each build is also kept under a name made from a hash of its sources, flags and torch version
(~/.cache/infopt/kernels/, or $INFOPT_EXT_DIR/kernels), and a process whose hash has a kept library loads it directly:
no setuptools import and no ninja run (0.1 s warm, seconds more when this host has evicted those files).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import threading
import time
import warnings
from pathlib import Path

import torch

from infopt.device import cpu_flags

NAME = "infopt_qkernels"
SOURCES = [Path(__file__).with_name(name) for name in ("qmatmul.cpp", "decode_ops.cpp", "grid_search.cpp")]
# Explicit ISA flags rather than -march=native, so a cached build never uses more than precheck() verified.
# -ffp-contract=off: no fused multiply-adds beyond the explicit ones, so each weight (value - zero) * scale is
# rounded exactly as torch rounds it.
CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-ffp-contract=off",
          "-fopenmp", "-DNDEBUG"]
# torch's wheel ships libgomp.so.1 under the same soname, so this resolves to the copy torch already loaded and
# at::parallel_for follows torch.set_num_threads.
LDFLAGS = ["-fopenmp"]
REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c")
# Optional: the int8-activation (W4A8) path needs AVX512-VNNI; without it the op exists but refuses.
VNNI_CPU_FLAG = "avx512_vnni"
VNNI_CFLAGS = ["-mavx512vnni", "-DINFOPT_VNNI"]

_state: dict[str, object] = {}
_lock = threading.Lock()


def _ensure_ninja_on_path() -> bool:
    """cpp_extension runs `ninja --version`; the pip `ninja` package's binary may not be on PATH in a venv."""
    if shutil.which("ninja"):
        return True
    try:
        import ninja  # noqa: PLC0415
    except ImportError:
        return False
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    return shutil.which("ninja") is not None


def precheck(env: dict[str, str] | None = None, flags: set[str] | None = None) -> str | None:
    """Why the extension cannot be used here, checked without compiling; None when a build may be tried."""
    env = os.environ if env is None else env
    if env.get("INFOPT_NO_EXT", "") not in ("", "0"):
        return "disabled by INFOPT_NO_EXT"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"needs an x86-64 CPU, this is {platform.machine()}"
    missing = [f for f in REQUIRED_CPU_FLAGS if f not in (cpu_flags() if flags is None else flags)]
    if missing:
        return f"CPU lacks {', '.join(missing)}"
    compiler = env.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) on PATH"
    if not _ensure_ninja_on_path():
        return "ninja not found (add the `ninja` package)"
    return None


def _build_directory() -> str | None:
    root = os.environ.get("INFOPT_EXT_DIR")
    if not root:
        return None  # torch's default extension folder
    path = Path(root) / NAME
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def _kept_library(cflags: list[str]) -> Path:
    """Where the build of these sources and flags is kept (content-addressed, so never another build's)."""
    digest = hashlib.sha256(json.dumps([cflags, LDFLAGS, torch.__version__, platform.python_version()]).encode())
    for path in SOURCES:
        digest.update(path.read_bytes())
    root = Path(os.environ.get("INFOPT_EXT_DIR") or Path.home() / ".cache" / "infopt") / "kernels"
    return root / f"{NAME}-{digest.hexdigest()[:24]}.so"


def _build() -> None:
    cflags = CFLAGS + (VNNI_CFLAGS if VNNI_CPU_FLAG in cpu_flags() else [])
    kept = _kept_library(cflags)
    if kept.is_file():
        torch.ops.load_library(str(kept))
        return
    from torch.utils import cpp_extension  # noqa: PLC0415 (imports setuptools; only when building)

    built = cpp_extension.load(name=NAME, sources=[str(path) for path in SOURCES], extra_cflags=cflags,
                               extra_ldflags=LDFLAGS, build_directory=_build_directory(), is_python_module=False,
                               verbose=False)
    try:  # keep it for the next processes: a private copy moved into place whole
        kept.parent.mkdir(parents=True, exist_ok=True)
        partial = kept.with_name(f".{kept.name}.{os.getpid()}.tmp")
        shutil.copyfile(built, partial)
        os.replace(partial, kept)
    except (OSError, TypeError):  # a read-only cache: the next process builds (or ninja-checks) again
        pass


def ops() -> object | None:
    """torch.ops.infopt_kernels once the extension is loaded, else None (see reason())."""
    if "ops" in _state:
        return _state["ops"]
    with _lock:
        if "ops" not in _state:
            _load()
    return _state["ops"]


def _load() -> None:
    reason, namespace = precheck(), None
    if reason is None:
        start = time.perf_counter()
        try:
            _build()
            namespace = torch.ops.infopt_kernels
            namespace.lut4_mm  # noqa: B018 (raises if registration failed)
        except Exception as exc:  # a compiler error, a missing header: fall back to torch
            reason, namespace = f"build failed: {type(exc).__name__}: {str(exc).strip()[:2000]}", None
            warnings.warn(f"infopt kernels unavailable, using the torch fallback ({reason})", stacklevel=3)
        _state["load_seconds"] = time.perf_counter() - start
    _state["ops"], _state["reason"] = namespace, reason


def unless_non_finite(op, *args):
    """op(*args), or None where the op refused a value that is not finite (written only under --allow-non-finite):
    its caller then takes the torch form, which handles such values as torch does."""
    try:
        return op(*args)
    except RuntimeError as exc:
        if "not finite" not in str(exc):
            raise
        return None


def available() -> bool:
    return ops() is not None


def has_vnni() -> bool:
    """Whether the loaded extension has the AVX512-VNNI int8-activation products (the CPU reports the flag)."""
    return available() and VNNI_CPU_FLAG in cpu_flags()


def reason() -> str | None:
    """Why the extension is not in use (None when it is); triggers the build on first call."""
    ops()
    return _state.get("reason")  # type: ignore[return-value]


def load_seconds() -> float | None:
    """Seconds the first load took in this process (a full compile, or loading a cached build)."""
    return _state.get("load_seconds")  # type: ignore[return-value]
