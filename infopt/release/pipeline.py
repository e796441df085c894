"""`infopt release`: a recipe's artifacts built, evaluated against the source, gated, and laid out as one folder.

The folder is assembled in a work folder beside the target (`.NAME.release-work`) and renamed into place when it is
complete. Work shared by artifacts is done once: the calibration windows are tokenized and cut once, and one
evaluation session loads the source, tokenizes each dataset and keeps the source's log-probabilities for every
comparison. An interrupted release keeps its work folder; `--resume` keeps every finished artifact whose resolved
recipe entry and source files are unchanged (by fingerprint) and builds the rest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
import yaml

from infopt import __version__
from infopt.device import compute_threads
from infopt.errors import InfoptError
from infopt.models.loading import ModelDir, open_model
from infopt.paths import check_output_target, inputs_overlap, keep_for_resume, release_for_resume, sha256_file
from infopt.release.recipe import Recipe, artifact_request, load_recipe, request_recipe
from infopt.release.report import write_plot, write_release_markdown
from infopt.quant.methods import config_values

Progress = Callable[[str, int, int], None]
DONE_SUFFIX = ".done.json"


def work_dir_for(out: Path) -> Path:
    return out.parent / f".{out.name}.release-work"


def _prepare_work_dir(work: Path, resume: bool, force: bool) -> None:
    if work.exists() and not resume:
        if not force:
            raise InfoptError(f"an unfinished release exists in {work}; pass --resume to continue it or --force to "
                              "start over")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)


def _source_fingerprint(model: ModelDir) -> list:
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(model.path.iterdir()) if p.is_file()]


def _fingerprint(recipe_text: str, source: list) -> str:
    payload = json.dumps({"recipe": recipe_text, "source": source, "infopt": __version__}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _weight_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def _summary(name: str, req, report: dict, folder: Path, seconds: float, reused: bool) -> dict:
    return {"name": name, "method": req.method, "format": report["format"], "scheme": report["spec"],
            "options": config_values(req.config), "weight_bytes": _weight_bytes(folder),
            "folder_bytes": _folder_bytes(folder), "seconds": seconds, "reused": reused,
            "eval": report.get("eval", {}), "gates": report.get("gates"),
            "warnings": report.get("warnings", []) + report.get("notes", [])}


def _preflight(recipe: Recipe, work: Path) -> list[dict]:
    """Every artifact's plan before anything is built, so a bad entry fails in seconds, not after the others."""
    from infopt.workflows import quantize

    plans = []
    for art in recipe.artifacts:
        try:
            plans.append({"name": art.name, **quantize(artifact_request(recipe, art, work / art.name, dry_run=True))})
        except InfoptError as exc:
            raise InfoptError(f"artifact {art.name}: {exc}") from None
    return plans


def plan_release(recipe_path: Path) -> list[dict]:
    """What `build_release` would build: each artifact's plan (modules, schemes, expected size); writes nothing."""
    recipe = load_recipe(recipe_path)
    return _preflight(recipe, Path("."))


def build_release(recipe_path: Path, out: Path, force: bool = False, resume: bool = False,
                  progress: Progress | None = None, on_artifact: Callable[[dict], None] | None = None,
                  threads: int | None = None) -> dict:
    """Build, evaluate and gate every artifact of a recipe into the folder `out`; returns release.json's content.
    Everything runs on `threads`, else the recipe's (None: the process's count); each artifact's recipe records it."""
    recipe = load_recipe(recipe_path)
    if threads is not None:
        recipe = recipe.model_copy(update={"threads": threads})
    with compute_threads(recipe.threads):
        return _build_release(recipe, Path(recipe_path), out, force, resume, progress, on_artifact)


def _build_release(recipe: Recipe, recipe_path: Path, out: Path, force: bool, resume: bool,
                   progress: Progress | None, on_artifact: Callable[[dict], None] | None) -> dict:
    from infopt.workflows import CalibrationData, EvalSession, calibration_set, quantize

    out = Path(out)
    check_output_target(out, force)
    source = open_model(recipe.model, recipe.allow_pickle)
    if inputs_overlap(out, [source.path, Path(recipe_path)]):
        raise InfoptError(f"--out {out} overlaps an input of this release (the source model or the recipe)")
    work = work_dir_for(out)
    _preflight(recipe, work)
    _prepare_work_dir(work, resume, force)
    keep_for_resume(work)
    source_files = _source_fingerprint(source)
    windows = None
    if recipe.calibration is not None:  # the recipe check guarantees a calibrated artifact uses it
        windows = calibration_set(CalibrationData(**recipe.calibration.model_dump()), source)
    session = EvalSession(source) if recipe.evaluation is not None else None
    rows, requests = [], []
    for art in recipe.artifacts:
        folder = work / art.name
        req = artifact_request(recipe, art, folder, force=True, windows=windows, eval_session=session)
        requests.append(req)
        text = request_recipe(req)
        fingerprint = _fingerprint(text, source_files)
        done_file = work / f"{art.name}{DONE_SUFFIX}"
        row = None
        if resume and done_file.is_file() and folder.is_dir():
            done = json.loads(done_file.read_text())
            if done.get("fingerprint") == fingerprint:
                row = {**done["row"], "reused": True}
        if row is None:
            done_file.unlink(missing_ok=True)
            start = time.perf_counter()
            report = quantize(req, progress)
            row = _summary(art.name, req, report, folder, time.perf_counter() - start, False)
            done_file.write_text(json.dumps({"fingerprint": fingerprint, "row": row}, indent=2, default=str) + "\n")
        rows.append(row)
        if on_artifact:
            on_artifact(row)
    baseline = _baseline_row(source, rows)
    release = {
        "infopt_version": __version__,
        "versions": _versions(),
        "recipe": _resolved_recipe(recipe, requests),
        "source": baseline,
        "artifacts": rows,
        "passed": not any((r.get("gates") or {}).get("failures") for r in rows),
        "failures": [f"{r['name']}: {f}" for r in rows for f in (r.get("gates") or {}).get("failures", [])],
    }
    for done_file in work.glob(f"*{DONE_SUFFIX}"):
        done_file.unlink()
    (work / "release.yaml").write_text(yaml.safe_dump(release["recipe"], sort_keys=False))
    write_release_markdown(work / "RELEASE.md", release)
    write_plot(work / "quality-vs-size.png", release)
    release["files"] = {str(p.relative_to(work)): sha256_file(p) for p in sorted(work.rglob("*")) if p.is_file()}
    (work / "release.json").write_text(json.dumps(release, indent=2, sort_keys=False, default=str) + "\n")
    _move_into_place(work, out)
    release_for_resume(work)
    return release


def _baseline_row(source: ModelDir, rows: list[dict]) -> dict:
    figures = {}
    for row in rows:
        for dataset, m in row["eval"].items():
            figures.setdefault(dataset, {"ppl": m["baseline_ppl"], "tokens": m["tokens"], "seq_len": m["seq_len"]})
    return {"path": str(source.path), "weight_bytes": _weight_bytes(source.path), "eval": figures}


def _resolved_recipe(recipe: Recipe, requests: list) -> dict:
    """The recipe with every artifact's format, options and gates as its request resolved them: what was built."""
    data = {**recipe.model_dump(), "threads": torch.get_num_threads()}
    for req, entry in zip(requests, data["artifacts"]):
        entry.update(format=req.format_name, options=config_values(req.config),
                     gates=None if req.gates is None else dataclasses.asdict(req.gates))
    return data


def _versions() -> dict:
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "platform": platform.platform()}


def _move_into_place(work: Path, out: Path) -> None:
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(work, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(work, out)
