"""A separate virtual environment holding llm-compressor, for side-by-side benchmarks.

llm-compressor pins its own transformers and compressed-tensors, so it never shares infopt's venv.
`ensure_llmc_python()` builds `$INFOPT_BENCH_CACHE/llmc-venv` once (default cache
`~/.cache/infopt/bench/`) and returns its python; later calls only check a stamp file.

CLI: `python benchmarks/llmc_env.py` prints that python's path (building the venv if needed).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

CACHE_ENV = "INFOPT_BENCH_CACHE"
DEFAULT_CACHE = Path("~/.cache/infopt/bench")
VENV_NAME = "llmc-venv"
STAMP_NAME = ".infopt-llmc-stamp"

# torch first, alone: with no torch present, llmcompressor's bare `torch` requirement would pull
# a multi-GB CUDA build. The other pins keep pip on the versions llmcompressor 0.14 imports with.
TORCH_PIN = "torch==2.13.0"
LLMC_PINS = (
    "llmcompressor==0.14.*",
    "transformers<=5.17",
    "compressed-tensors==0.19.0",
    "datasets",
    "safetensors",
)


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def _stamp_text() -> str:
    """What the stamp file records: the pins, so changing them rebuilds the venv."""
    spec = "\n".join((TORCH_PIN, *LLMC_PINS))
    return hashlib.sha256(spec.encode()).hexdigest() + "\n" + spec + "\n"


def _python_in(venv: Path) -> Path:
    return venv / "bin" / "python"  # POSIX only, like the fcntl lock


def _base_python() -> str:
    """The interpreter to create the venv from (the base one when we run inside another venv)."""
    return getattr(sys, "_base_executable", None) or sys.executable


def _pip(python: Path, *args: str) -> None:
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *args],
                   check=True)


def _build(venv: Path) -> None:
    """Create the venv from scratch (in place: pip's scripts hold absolute paths to it)."""
    shutil.rmtree(venv, ignore_errors=True)  # a half-built venv from an interrupted run
    subprocess.run([_base_python(), "-m", "venv", str(venv)], check=True)
    python = _python_in(venv)
    _pip(python, "--upgrade", "pip")
    _pip(python, TORCH_PIN)
    _pip(python, TORCH_PIN, *LLMC_PINS)  # restating torch keeps the resolver from swapping it
    subprocess.run([str(python), "-c", "import llmcompressor"], check=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path`, so concurrent callers build the venv only once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _ready(venv: Path) -> bool:
    stamp = venv / STAMP_NAME
    return _python_in(venv).exists() and stamp.is_file() and stamp.read_text() == _stamp_text()


def ensure_llmc_python() -> Path:
    """The llm-compressor venv's python, building the venv first if it is missing or stale."""
    venv = cache_dir() / VENV_NAME
    if _ready(venv):  # the stamp is written last, so its presence means a complete build
        return _python_in(venv)
    with _locked(venv.with_name(VENV_NAME + ".lock")):
        if not _ready(venv):  # another process may have built it while we waited
            start = time.perf_counter()
            print(f"building llm-compressor venv at {venv} (one time)", file=sys.stderr)
            _build(venv)
            (venv / STAMP_NAME).write_text(_stamp_text())
            print(f"llm-compressor venv ready in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return _python_in(venv)


if __name__ == "__main__":
    print(ensure_llmc_python())
