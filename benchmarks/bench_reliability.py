"""The reliability table: the fuzzing harness and the fault tests at scale, as BENCHMARKS.md's reliability section.

`make fuzz` runs tests/test_fuzz.py (INFOPT_FUZZ_SCALE times the suite's counts) and tests/test_faults.py, and
turns their recorded outcome (written by tests/conftest.py) into the table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def section(scale: int) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        record = Path(tmp) / "fuzz.json"
        env = {**os.environ, "INFOPT_FUZZ_SCALE": str(scale), "INFOPT_FUZZ_JSON": str(record), "HF_HUB_OFFLINE": "1"}
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_fuzz.py",
                                 "tests/test_faults.py"], cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if result.returncode != 0:
            raise SystemExit("the fuzz run failed:\n" + result.stdout[-4000:])
        data = json.loads(record.read_text())
    cases = data["cases"]
    total = sum(c["distinct"] for c in cases)
    by_kind: dict[str, dict[str, int]] = {}
    for case in cases:
        by_kind.setdefault(case["kind"], {})[case["command"]] = case["distinct"]
    commands = sorted({c["command"] for c in cases})
    rows = ["| input kind | " + " | ".join(commands) + " | total |", "| --- |" + " ---: |" * (len(commands) + 1)]
    for kind, counts in sorted(by_kind.items()):
        rows.append(f"| {kind} | " + " | ".join(str(counts.get(c, "")) for c in commands)
                    + f" | {sum(counts.values())} |")
    per_command = {c: sum(x["distinct"] for x in cases if x["command"] == c) for c in commands}
    rows.append("| **all** | " + " | ".join(f"**{per_command[c]}**" for c in commands) + f" | **{total}** |")
    return [
        f"`INFOPT_FUZZ_SCALE={scale} pytest tests/test_fuzz.py tests/test_faults.py` (`make fuzz`); the test suite "
        "runs the same harness at scale 1 on every CI run.",
        "",
        "Distinct malformed inputs per input kind and command. Every one was expected to fail, and every one did: "
        "exit code 2, exactly one `error:` line as the last line of stderr, no traceback, no output or temporary "
        "folder left, and the input files byte-identical afterwards (checked by sha256).",
        "",
        *rows,
        "",
        f"All {total} refused as expected; the commands took {data['seconds']:.1f} s in all "
        f"(the whole run, with the fault tests, {wall:.0f} s).",
        "",
        "Fault scenarios survived:",
        "",
        *[f"- {fault}" for fault in data["faults"]],
    ]
