import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from infopt.paths import data_dir  # noqa: E402

KNOWN_STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."


@pytest.fixture(scope="session")
def data() -> Path:
    root = data_dir()
    assert root is not None and (root / "tinyllamas-stories260K" / "stories260K.bin").is_file(), (
        "shared data not found: set INFOPT_DATA_DIR to the shared/data folder"
    )
    return root


@pytest.fixture(scope="session")
def stories_hf(data, tmp_path_factory) -> Path:
    """stories260K converted to a Hugging Face folder, once per session."""
    from infopt.workflows import convert_llama2c

    out = tmp_path_factory.mktemp("models") / "stories260K"
    folder = data / "tinyllamas-stories260K"
    convert_llama2c(folder / "stories260K.bin", folder / "tok512.model", out)
    return out


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, "-m", "infopt.cli.main", *args], capture_output=True, text=True,
                          cwd=cwd, env=full_env, timeout=600)


def pytest_terminal_summary(terminalreporter):
    """The fuzzing totals and fault scenarios (tests/test_fuzz.py, tests/test_faults.py), so CI's output shows how
    many malformed inputs were tried; with INFOPT_FUZZ_JSON they are also written there (benchmarks/run.py)."""
    fuzz, faults = sys.modules.get("tests.test_fuzz"), sys.modules.get("tests.test_faults")
    for line in (fuzz.fuzz_report() if fuzz else []):
        terminalreporter.write_line(line)
    for line in (faults.FAULTS if faults else []):
        terminalreporter.write_line(f"fault survived: {line}")
    target = os.environ.get("INFOPT_FUZZ_JSON")
    if target and fuzz:
        import json

        Path(target).write_text(json.dumps({
            "scale": fuzz.SCALE, "seconds": sum(fuzz.TIMES),
            "cases": [{"kind": k, "command": c, "distinct": seen, "refused": refused}
                      for (k, c), (seen, refused) in sorted(fuzz.STATS.items())],
            "faults": list(faults.FAULTS) if faults else []}, indent=2))
