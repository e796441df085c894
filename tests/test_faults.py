"""Faults survived: SIGKILL at random points of a GPTQ run, SIGINT and SIGTERM, a full disk.

No target folder ever appears half-written, nothing of the source changes, and an interrupted calibrated run
continued with --resume gives the bytes of an uninterrupted one."""

import hashlib
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.tiny_models import copy_tokenizer, make_tiny_model

FAULTS: list[str] = []  # scenarios survived, for the fuzz report


def _files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a background shell (CI) starts children with SIGINT ignored


def _cli(*args: str, threads: int | None = None, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    kwargs.setdefault("preexec_fn", _default_sigint)
    return subprocess.Popen([sys.executable, "-m", "infopt.cli.main", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kwargs)


@pytest.fixture(scope="module")
def source(tmp_path_factory, stories_hf) -> Path:
    path = make_tiny_model("llama", tmp_path_factory.mktemp("faults") / "src", vocab_size=512, hidden_size=256,
                           intermediate_size=512, num_hidden_layers=12)
    return copy_tokenizer(stories_hf, path)


def _gptq_args(source: Path, out: Path) -> list[str]:
    return ["quantize", str(source), "--method", "gptq", "--calib", "tinystories", "--calib-samples", "32",
            "--calib-seq-len", "256", "--group-size", "32", "--out", str(out)]


def _assert_whole_or_absent(out: Path) -> None:
    """A target folder, if there is one, is complete: its manifest lists every file with the right sha256."""
    if not out.exists():
        return
    import json

    manifest = json.loads((out / "infopt-manifest.json").read_text())["files"]
    assert {name: entry["sha256"] for name, entry in manifest.items()} == {
        k: v for k, v in _files(out).items() if k != "infopt-manifest.json"}


def _differing_tensors(a: Path, b: Path) -> list[str]:
    from safetensors.torch import load_file

    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    names = [k for k in x.keys() | y.keys() if k not in x or k not in y or not x[k].equal(y[k])]
    return sorted(names, key=lambda k: [int(part) if part.isdigit() else part for part in k.split(".")])


def _parts_done(work: Path) -> int:
    return len(list(work.glob("layer-*.safetensors"))) if work.is_dir() else 0


def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_bytes(source, tmp_path):
    """The checkpoint's last bits depend on the thread count, and a host may hand a process more or fewer CPUs
    than the one before; so the runs here are pinned to 2 threads, and each resume is started on 1 thread where
    the killed run recorded its count: the resumed run must compute on the recorded 2."""
    reference = tmp_path / "reference" / "q"  # every run writes a folder named q: the name is in its model card
    start = time.perf_counter()
    done = _cli(*_gptq_args(source, reference), threads=2)
    _, err = done.communicate(timeout=600)
    duration = time.perf_counter() - start
    assert done.returncode == 0, err
    expected = _files(reference)
    before = _files(source)
    rng = random.Random(0)
    for attempt in range(3):
        out = tmp_path / f"run{attempt}" / "q"
        out.parent.mkdir()
        process = _cli(*_gptq_args(source, out), threads=2)
        time.sleep(rng.uniform(0.3, duration * 0.95))
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
        _assert_whole_or_absent(out)
        recorded = (out.parent / ".q.work" / "state.json").is_file()
        parts = _parts_done(out.parent / ".q.work")
        resumed = _cli(*_gptq_args(source, out), "--resume", *(["--force"] if out.exists() else []),
                       threads=1 if recorded else 2)
        _, err = resumed.communicate(timeout=600)
        assert resumed.returncode == 0, err
        got = _files(out)
        assert got == expected, (f"attempt {attempt} (state recorded: {recorded}, {parts} layers done when "
                                 f"killed): resumed output differs in {_differing_tensors(reference, out)[:8]}")
        leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
        assert leftovers == [], leftovers  # the killed run's temporary folder is cleared by the next run
    assert _files(source) == before
    FAULTS.append("SIGKILL at 3 random points of a GPTQ run; --resume gave the uninterrupted bytes")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_gives_one_clean_line_and_keeps_only_resumable_work(source, tmp_path, signum):
    out = tmp_path / "out"
    work = tmp_path / ".out.work"
    process = _cli(*_gptq_args(source, out))
    deadline = time.time() + 300
    while not (work / "layer-00000.safetensors").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be interrupted"
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert process.returncode == 130, err
    assert "Traceback" not in err and lines[-1].startswith("aborted"), err
    assert "--resume" in lines[-1] and str(work) in lines[-1]
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
    resumed = _cli(*_gptq_args(source, out), "--resume")
    assert resumed.wait(timeout=600) == 0 and not work.exists()
    FAULTS.append(f"{signal.Signals(signum).name} during GPTQ: one line, exit 130, resumable")


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def _limit_file_size(limit: int):
    def apply():
        _default_sigint()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("how", ["tmpfs", "rlimit"])
def test_a_full_disk_gives_a_clear_error_and_leaves_the_source_alone(source, tmp_path, how):
    before = _files(source)
    disk = tmp_path / "disk"
    if how == "tmpfs":
        if not _mount_tmpfs(disk, "48k"):
            pytest.skip("cannot mount a tmpfs here (needs root and mount); the rlimit case injects the write error")
        kwargs = {}
    else:
        disk.mkdir()
        kwargs = {"preexec_fn": _limit_file_size(48 * 1024)}
    try:
        out = disk / "out"
        process = _cli("quantize", str(source), "--bits", "8", "--group-size", "-1", "--out", str(out), **kwargs)
        _, err = process.communicate(timeout=300)
        lines = [line for line in err.splitlines() if line.strip()]
        assert process.returncode == 2, err
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert ("No space left on device" if how == "tmpfs" else "File too large") in lines[0], err
        assert not out.exists() and list(disk.iterdir()) == []
        assert _files(source) == before
    finally:
        if how == "tmpfs":
            subprocess.run(["umount", str(disk)], capture_output=True)
    FAULTS.append(f"disk full ({how}) while writing: one error line, nothing left, source unchanged")
