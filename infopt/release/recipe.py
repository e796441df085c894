"""Recipes: what to build (source, calibration, artifacts, evaluation, gates) as a validated YAML file.

A recipe says *what*; how each method runs lives with the method. The schema is pydantic's, strict and closed
(unknown keys and wrong types are refused), and each artifact's `options` are checked against its method's own
config class from the registry, so an option on the wrong method is an error naming the field.

Every checkpoint stores the resolved recipe it was made with (`infopt-recipe.yaml`: every default filled in, the
model as an absolute path); `infopt quantize --recipe` on that file makes the same checkpoint byte for byte.
Relative paths in a recipe (the model, data files) are read from the current folder, like command-line arguments.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from infopt import __version__
from infopt.errors import InfoptError
from infopt.eval.gates import QualityGates
from infopt.formats.safetensors_io import parse_size
from infopt.formats.writers import output_format
from infopt.quant.methods import build_config, config_values
from infopt.quant.recovery import RecoveryConfig
from infopt.quant.registry import METHODS, get_method
from infopt.quant.spec import parse_override

MAX_RECIPE_BYTES = 1 << 20


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class CalibrationSection(_Closed):
    dataset: str = Field(min_length=1)
    samples: int = Field(128, ge=1)
    seq_len: int = Field(2048, ge=2)
    seed: int = 0
    text_field: str = "text"


class EvaluationSection(_Closed):
    datasets: list[str] = Field(min_length=1)
    seq_len: int | None = Field(None, ge=2)
    stride: int | None = Field(None, ge=1)
    max_windows: int | None = Field(None, ge=1)
    text_field: str = "text"


class GatesSection(_Closed):
    max_ppl_delta: float | None = None
    max_kl: float | None = Field(None, ge=0)
    min_top1: float | None = Field(None, ge=0, le=1)


class ArtifactSection(_Closed):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    method: str
    format: str | None = None  # None: the method's usual format
    options: dict[str, Any] = Field(default_factory=dict)  # the method's own options (see `infopt methods`)
    recover: dict[str, Any] | None = None  # block-wise recovery on top of the method (infopt.quant.recovery options)
    ignore: list[str] = Field(default_factory=list)
    overrides: list[str] = Field(default_factory=list)  # REGEX=BITS[:GROUP][:sym|asym] or REGEX=skip
    include_lm_head: bool = False
    max_shard_size: int | str = "5GB"
    gates: GatesSection | None = None


class Recipe(_Closed):
    model: str = Field(min_length=1)  # a model folder or a hub id
    allow_pickle: bool = False
    allow_non_finite: bool = False
    # torch threads to compute on (None: the machine's). A checkpoint's last bits depend on it, so a stored recipe
    # records the count it was made with and `quantize --recipe` computes on that count again
    threads: int | None = Field(None, ge=1, le=4096)
    calibration: CalibrationSection | None = None
    evaluation: EvaluationSection | None = None
    gates: GatesSection | None = None  # for every artifact; an artifact's own gates override them
    artifacts: list[ArtifactSection] = Field(min_length=1)


def _location(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate a recipe given as parsed YAML; every problem is one line naming the field."""
    if not isinstance(data, dict):
        raise InfoptError(f"{source}: a recipe is a mapping with model and artifacts, got {type(data).__name__}")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = _location(first["loc"]) or "recipe"
        message = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise InfoptError(f"{source}: {where}: {message}{more}") from None
    _check_semantics(recipe, source)
    return recipe


def _check_semantics(recipe: Recipe, source: str) -> None:
    names = [a.name for a in recipe.artifacts]
    for name in names:
        if names.count(name) > 1:
            raise InfoptError(f"{source}: artifacts: the name {name!r} is used twice")
    calibrated = []
    for i, art in enumerate(recipe.artifacts):
        where = f"{source}: artifacts[{i}]"
        if art.method not in METHODS:
            raise InfoptError(f"{where}.method: {art.method!r} is not a method (available: {', '.join(METHODS)})")
        method = get_method(art.method)
        config = method.make_config(art.options, f"{where}.options.")
        try:
            if output_format(art.format or method.default_format, method).single_file:
                raise InfoptError(f"format {art.format!r}: release artifacts are folders; GGUF files are made with "
                                  "`infopt quantize --format gguf` or `infopt convert gguf` for now")
            for text in art.overrides:
                parse_override(text, config.spec())
            parse_size(str(art.max_shard_size))
        except InfoptError as exc:
            raise InfoptError(f"{where}: {exc}") from None
        if art.recover is not None:
            if not method.recoverable:
                raise InfoptError(f"{where}.recover: recovery does not start from method {art.method}")
            recovery_config(art, f"{where}.recover.")
        if method.calibrated or art.recover is not None:
            calibrated.append(art.name)
            if recipe.calibration is None:
                needs = f"method {art.method}" if method.calibrated else "recover"
                raise InfoptError(f"{where}: {needs} needs calibration data; add a calibration section "
                                  "(dataset, samples, seq_len, seed)")
        if (art.gates is not None or recipe.gates is not None) and recipe.evaluation is None:
            raise InfoptError(f"{where}: gates need an evaluation section (datasets to measure on)")
    if recipe.calibration is not None and not calibrated:
        raise InfoptError(f"{source}: calibration: no artifact uses it (every method here is calibration-free)")


def load_recipe(path: Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise InfoptError(f"no such recipe file: {path}")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise InfoptError(f"{path}: a recipe is at most {MAX_RECIPE_BYTES} bytes")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise InfoptError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise InfoptError(f"{path}: not valid YAML{at}: {getattr(exc, 'problem', None) or exc}") from None
    return parse_recipe(data, str(path))


def recovery_config(art: ArtifactSection, where: str = "") -> RecoveryConfig | None:
    return None if art.recover is None else build_config(RecoveryConfig, art.recover, where, "recover")


def gates_of(recipe: Recipe, art: ArtifactSection) -> QualityGates | None:
    own = QualityGates(**art.gates.model_dump()) if art.gates else None
    shared = QualityGates(**recipe.gates.model_dump()) if recipe.gates else None
    gates = own.merged_over(shared) if own else shared
    return None if gates is None or gates.empty else gates


def artifact_request(recipe: Recipe, art: ArtifactSection, out: Path | None, **run: Any):
    """The QuantizeRequest one artifact of a recipe stands for; `run` adds how to run it (force, resume, ...)."""
    from infopt.workflows import CalibrationData, EvaluationSpec, QuantizeRequest

    method = get_method(art.method)
    calibration = None
    if (method.calibrated or art.recover is not None) and recipe.calibration is not None:
        calibration = CalibrationData(**recipe.calibration.model_dump())
    evaluation = None
    if recipe.evaluation is not None:
        values = recipe.evaluation.model_dump()
        evaluation = EvaluationSpec(**{**values, "datasets": tuple(values["datasets"])})
    return QuantizeRequest(model=recipe.model, out=out, name=art.name, method=art.method, config=method.make_config(art.options),
                           fmt=art.format, ignore=list(art.ignore), overrides=list(art.overrides),
                           include_lm_head=art.include_lm_head, max_shard_bytes=parse_size(str(art.max_shard_size)),
                           allow_pickle=recipe.allow_pickle, allow_non_finite=recipe.allow_non_finite,
                           calibration=calibration, evaluation=evaluation, recovery=recovery_config(art),
                           gates=gates_of(recipe, art), **{"threads": recipe.threads, **run})


def _model_reference(model: str) -> str:
    path = Path(model)
    return str(path.resolve()) if path.exists() else model


def request_recipe(req) -> str:
    """The resolved single-artifact recipe of a QuantizeRequest, as the YAML text a checkpoint stores."""
    data: dict[str, Any] = {"model": _model_reference(req.model), "allow_pickle": req.allow_pickle,
                            "allow_non_finite": req.allow_non_finite,
                            "threads": torch.get_num_threads()}  # called while the run computes: the count it uses
    if req.calibration is not None:
        data["calibration"] = dataclasses.asdict(req.calibration)
    if req.evaluation is not None:
        data["evaluation"] = {**dataclasses.asdict(req.evaluation), "datasets": list(req.evaluation.datasets)}
    artifact = {"name": req.name or (req.out.name if req.out is not None else "artifact"), "method": req.method,
                "format": req.format_name, "options": config_values(req.config), "ignore": list(req.ignore),
                "overrides": list(req.overrides), "include_lm_head": req.include_lm_head,
                "max_shard_size": req.max_shard_bytes}
    if req.recovery is not None:
        artifact["recover"] = config_values(req.recovery)
    if req.gates is not None:
        artifact["gates"] = dataclasses.asdict(req.gates)
    data["artifacts"] = [artifact]
    parse_recipe(data, "resolved recipe")  # what is stored must load again
    header = (f"# Resolved by infopt {__version__}: every default filled in. Make this checkpoint again with\n"
              f"#   infopt quantize --recipe infopt-recipe.yaml --out DIR\n")
    return header + yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)
