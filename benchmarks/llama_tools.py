"""llama.cpp's own command-line tools (llama-imatrix, llama-quantize, llama-perplexity, llama-bench), built once.

The llama-cpp-python wheel holds the libraries only. The benchmarks also need the tools a llama.cpp user runs:
`llama-imatrix` to collect an importance matrix and `llama-quantize --imatrix` to use it. They are built with
cmake from the same sdist's vendored tree (the llama.cpp the wheel was built from), statically linked, into
`$INFOPT_CACHE/llama-tools-<version>/bin` (default cache ~/.cache/infopt), once per machine: about 15 minutes
on 2 cores. Later calls only check the stamp.

    python benchmarks/llama_tools.py      # builds if needed, prints the bin folder
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gguf import CACHE, LLAMA_CPP_VERSION, llama_cpp_source  # noqa: E402

TOOLS = ("llama-imatrix", "llama-quantize", "llama-perplexity", "llama-bench")
ROOT = CACHE / f"llama-tools-{LLAMA_CPP_VERSION}"
STAMP = ROOT / ".built"


def tools_dir() -> Path | None:
    """The bin folder when every tool is built here, else None (no build)."""
    return ROOT / "bin" if STAMP.is_file() and all((ROOT / "bin" / t).is_file() for t in TOOLS) else None


def ensure_tools() -> Path:
    """The bin folder holding TOOLS, built first when missing (serialised by a lock file)."""
    found = tools_dir()
    if found is not None:
        return found
    ROOT.mkdir(parents=True, exist_ok=True)
    with open(ROOT.parent / f"llama-tools-{LLAMA_CPP_VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = tools_dir()
        if found is not None:
            return found
        tree = llama_cpp_source()
        build = ROOT / "build"
        flags = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF",
                 "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                 "-DLLAMA_BUILD_TOOLS=ON", "-DGGML_NATIVE=ON"]
        if shutil.which("ninja"):
            flags += ["-G", "Ninja"]
        subprocess.run(["cmake", "-S", str(tree), "-B", str(build), *flags], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(build), "--parallel", str(os.cpu_count() or 1), "--target", *TOOLS],
                       check=True, stdout=subprocess.DEVNULL)
        bin_dir = ROOT / "bin"
        bin_dir.mkdir(exist_ok=True)
        for tool in TOOLS:
            shutil.copy2(build / "bin" / tool, bin_dir / tool)
        shutil.rmtree(build)  # the object files: ~1 GB
        STAMP.write_text(LLAMA_CPP_VERSION + "\n")
        return bin_dir


if __name__ == "__main__":
    print(ensure_tools())
