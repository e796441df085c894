"""Where the bundled real data lives and how outputs reach disk safely."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from infopt.errors import InfoptError

DATA_DIR_ENV = "INFOPT_DATA_DIR"
_KEPT: list[Path] = []  # work folders this process keeps when interrupted, so --resume can continue


def keep_for_resume(folder: Path) -> None:
    _KEPT.append(Path(folder))


def release_for_resume(folder: Path) -> None:
    if Path(folder) in _KEPT:
        _KEPT.remove(Path(folder))


def kept_for_resume() -> list[Path]:
    return [p for p in _KEPT if p.exists()]


def data_dir() -> Path | None:
    """The shared data directory: $INFOPT_DATA_DIR, else a `shared/data` beside a parent folder."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env)
    starts = [Path.cwd(), Path(__file__).resolve().parent]
    for start in starts:
        for folder in [start, *start.parents]:
            candidate = folder.parent / "shared" / "data"
            if (candidate / "README.md").is_file():
                return candidate
    return None


def require_data_file(relative: str) -> Path:
    root = data_dir()
    path = root / relative if root else None
    if path is None or not path.is_file():
        raise InfoptError(
            f"data file {relative!r} not found; set {DATA_DIR_ENV} to the folder that holds it"
        )
    return path


OUTPUT_MARKERS = ("infopt-manifest.json", "release.json")  # what every folder infopt writes holds


def _infopt_file(path: Path) -> bool:
    """Whether a single-file output was written by infopt (a GGUF file naming infopt as its quantizer)."""
    from infopt.formats.gguf_container import read_file_header

    try:  # every shard of a split model names its writer too
        return str(read_file_header(path).metadata.get("general.quantized_by", "")).startswith("infopt")
    except InfoptError:
        return False


def check_output_target(target: Path, force: bool) -> None:
    """An output may replace only an earlier infopt output, and only with --force."""
    target = Path(target)
    if target.exists() and not force:
        raise InfoptError(f"output {target} already exists (use --force to replace it)")
    if target.exists() and target.suffix == ".gguf":
        if not target.is_file() or not _infopt_file(target):
            raise InfoptError(f"{target} exists and is not a GGUF file infopt wrote; --force replaces only what "
                              "infopt wrote, so remove it yourself or pick another --out")
    elif target.exists():
        if not target.is_dir() or not any((target / marker).is_file() for marker in OUTPUT_MARKERS):
            raise InfoptError(f"{target} exists and is not an infopt output (no {' or '.join(OUTPUT_MARKERS)}); "
                              "--force replaces only what infopt wrote, so remove it yourself or pick another --out")
    if target.parent.exists() and not target.parent.is_dir():
        raise InfoptError(f"cannot write {target}: {target.parent} is not a folder")


def inputs_overlap(out: Path, inputs: list[Path]) -> bool:
    """Whether `out` is, lies inside, or contains any of `inputs` (writing it could then destroy an input)."""
    target = Path(out).resolve()
    for item in inputs:
        source = Path(item).resolve()
        if target == source or source.is_relative_to(target) or target.is_relative_to(source):
            return True
    return False


def _remove_stale_temporaries(target: Path) -> None:
    """Temporary folders of this target left by a process that no longer runs (killed with SIGKILL, or the machine
    went down): each name carries its writer's pid, so a live writer's folder is never touched."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.tmp-(\d+)-")
    for sibling in target.parent.iterdir():
        match = pattern.match(sibling.name)
        if match and sibling.is_dir() and not _alive(int(match.group(1))):
            shutil.rmtree(sibling, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_output_dir(target: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; move it into place only if the block succeeds."""
    target = Path(target)
    check_output_target(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.chmod(tmp, 0o755)
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / "previous")
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


@contextlib.contextmanager
def atomic_output_files(target: Path, companions: list[str], force: bool = False,
                        split: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside a single-file `target`; the block writes the file under its own name (and
    the companions, e.g. a model card) there, and each is moved into place whole only if the block succeeds.

    split: the block writes the target's shards instead (NAME-00001-of-0000N.gguf for a target NAME.gguf,
    llama.cpp's split naming). Earlier outputs under the target's name, the file itself or shards of any count,
    are replaced only with --force and only when infopt wrote them: for a split output they are removed, first
    shard first, and the new shards moved in with the first one last, so no mixture of old and new shards is ever
    loadable."""
    target = Path(target)
    earlier = check_file_outputs(target, companions, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
        if not split:
            for name in companions:
                os.replace(tmp / name, target.parent / name)
            os.chmod(tmp / target.name, 0o644)
            os.replace(tmp / target.name, target)
            for path in earlier:  # a split model written under this name before
                path.unlink()
            return
        shards = _earlier_shards(tmp / target.name)
        if not shards:
            raise InfoptError(f"no shards of {target.name} were written")  # pragma: no cover - the writer's promise
        for path in ([target] if target.exists() else []) + earlier:
            path.unlink()
        for path in shards[1:]:
            os.chmod(path, 0o644)
            os.replace(path, target.parent / path.name)
        for name in companions:
            os.replace(tmp / name, target.parent / name)
        os.chmod(shards[0], 0o644)
        os.replace(shards[0], target.parent / shards[0].name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_file_outputs(target: Path, companions: list[str], force: bool) -> list[Path]:
    """What atomic_output_files checks before it writes (callers check early too, before long work): every earlier
    output under the target's name is an infopt output and --force is given. Returns the earlier shards."""
    target = Path(target)
    if target.suffix != ".gguf":
        raise InfoptError(f"--out {target}: a single-file output is named *.gguf")
    earlier = _earlier_shards(target)
    for path in [target, *earlier]:
        check_output_target(path, force)
    for name in companions:
        companion = target.parent / name
        if companion.exists() and not (force and (target.is_file() or earlier)):
            raise InfoptError(f"{companion} already exists (it is written beside {target.name}; use --force only "
                              "over an earlier infopt output)")
    return earlier


def _earlier_shards(target: Path) -> list[Path]:
    """Files beside `target` (NAME.gguf) named as shards of NAME, sorted (first shards first)."""
    from infopt.formats.gguf_container import SPLIT_NAME

    if not target.parent.is_dir():
        return []
    prefix = target.name.removesuffix(".gguf")
    found = [p for p in target.parent.iterdir() if (m := SPLIT_NAME.match(p.name)) and m["prefix"] == prefix]
    return sorted(found, key=lambda p: (SPLIT_NAME.match(p.name)["no"], p.name))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
