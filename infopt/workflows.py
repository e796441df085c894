"""End-to-end jobs the CLI and the demo call: convert, quantize, evaluate, generate.

Data flows one way: source checkpoint -> plan -> quantized tensors -> format writer -> output folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from infopt.calibration.sources import load_text
from infopt.calibration.windows import calibration_windows, tokenize
from infopt.device import compute_threads, resolve_device
from infopt.errors import InfoptError
from infopt.eval.gates import QualityGates
from infopt.eval.perplexity import default_batch_size, default_seq_len, evaluate
from infopt.formats import artifact, gguf
from infopt.formats.writers import OutputFormat, output_format
from infopt.formats.safetensors_io import ShardedWriter, check_safetensors, iter_tensors
from infopt.models import llama2c
from infopt.models.adapters import adapter_for
from infopt.models.loading import ModelDir, load_causal_lm, load_state_dict, load_tokenizer, open_model, text_config
from infopt.paths import (atomic_output_dir, atomic_output_files, check_file_outputs, check_output_target,
                          inputs_overlap, keep_for_resume, release_for_resume)
from infopt.models.streaming import LayerStream
from infopt.quant.driver import LayerResult, iter_results, load_part, part_path, prepare_work_dir, run_layers
from infopt.quant.methods import FOUR_BIT, CalibratedRun, MethodConfig, config_values
from infopt.quant.precision import resolve_forward_dtype
from infopt.quant.recovery import PerWeight, Recovery, RecoveryConfig
from infopt.quant.registry import METHODS, get_method
from infopt.quant.spec import QuantPlan, QuantSpec, build_plan, parse_override
from infopt.quant.weights import Storage, relative_error
from infopt.runtime.vllm_engine import known_refusal, refusal_note

if TYPE_CHECKING:
    from infopt.runtime.vllm_engine import VLLMOptions

Progress = Callable[[str, int, int], None]


def convert_llama2c(src: Path, tokenizer: Path | None, out: Path, force: bool = False) -> dict:
    if not src.is_file():
        raise InfoptError(f"no such file: {src}")
    if tokenizer is not None and not tokenizer.is_file():
        raise InfoptError(f"no such tokenizer file: {tokenizer}")
    if inputs_overlap(out, [src] + ([tokenizer] if tokenizer else [])):
        raise InfoptError(f"--out {out} overlaps an input ({src}); write somewhere else")
    with atomic_output_dir(out, force) as tmp:
        params = llama2c.convert(src, tokenizer, tmp)
        artifact.write_manifest(tmp)
    return {"out": str(out), "params": params.__dict__}


def convert_gguf(src: str, out: Path, *, gguf_type: str | None = None, force: bool = False, dry_run: bool = False,
                 allow_pickle: bool = False, split_max_bytes: int | None = None) -> dict:
    """Between GGUF and the folder formats: a checkpoint folder (full precision, compressed-tensors, GPTQ, AWQ)
    -> FILE.gguf, with every quantized linear whose grid a ggml block holds written without re-rounding; a GGUF
    file -> a Hugging Face folder of dequantized safetensors with its embedded tokenizer."""
    from infopt.formats.registry import read_quantized

    model = open_model(src, allow_pickle)
    if model.quant_method == gguf.QUANT_METHOD:
        if gguf_type is not None or split_max_bytes is not None:
            raise InfoptError("--gguf-type and --split-max-size apply when writing GGUF; this converts a GGUF file "
                              "to a folder")
        return _gguf_to_folder(model, out, force, dry_run)
    if not dry_run:
        check_file_outputs(out, [out.name + ".md"], force)
        if inputs_overlap(out, [model.path, *model.files]):
            raise InfoptError(f"--out {out} overlaps the source {model.path}; write somewhere else")
    adapter = adapter_for(text_config(model.config))
    if adapter.gguf is None:
        raise InfoptError(f"GGUF export of {adapter.name} is not supported yet")
    if model.quant_method is None:
        quantized: dict = {}

        def items():
            return _checked_tensors(model, False)
    else:
        quantized, dense = read_quantized(model.files, model.config)

        def items():
            yield from dense.items()
            yield from quantized.items()
    if gguf_type is None:
        grids = [gguf._grid_type(w) for w in quantized.values()]
        counts = {g: grids.count(g) for g in set(grids) if g is not None}
        file_type = max(counts, key=counts.get) if counts else "F16"
    else:
        file_type = gguf.resolve_file_type(gguf_type)
    report = {"source": src, "out": str(out), "direction": "to gguf", "gguf_type": file_type,
              "quantized_linears": len(quantized), "dry_run": dry_run}
    if dry_run:
        rows = gguf.plan_model(items(), config=model.config, adapter=adapter, file_type=file_type)
        return {**report, "tensors": rows, "exact": sum(r["how"] == "exact" for r in rows)}
    if out.suffix != ".gguf":
        raise InfoptError(f"--out {out}: a GGUF output is one file, named *.gguf")
    name = out.name.removesuffix(".gguf")
    settings = {"converted from": model.quant_method or "full precision", "format": "gguf", "gguf type": file_type}
    with atomic_output_files(out, [out.name + ".md"], force, split=split_max_bytes is not None) as tmp:
        written = gguf.write_model(tmp / out.name, items(), config=model.config, adapter=adapter,
                                   tokenizer_dir=model.path, file_type=file_type, name=name, provenance=settings,
                                   max_shard_bytes=split_max_bytes)
        report.update(tensors=written.tensors, exact=written.count("exact"), files=written.files)
        settings["stored exactly"] = f"{report['exact']} of {len(quantized)} quantized linears"
        artifact.write_model_card(tmp, {"name": name, "source": Path(src).name if Path(src).exists() else src,
                                        "settings": settings, "loader": "gguf"}, out.name + ".md")
    report["output_bytes"] = sum((out.parent / name).stat().st_size for name in written.files)
    report["out"] = str(out.parent / written.files[0])  # a split model is loaded from its first shard
    return report


def _gguf_to_folder(model: ModelDir, out: Path, force: bool, dry_run: bool) -> dict:
    from infopt.formats.gguf_container import read_header
    from infopt.formats.registry import read_dense_state_dict

    header = read_header(model.path)
    types = gguf.tensor_type_counts(header)
    report = {"source": str(model.path), "out": str(out), "direction": "to a Hugging Face folder",
              "types": types, "dry_run": dry_run,
              "note": "every tensor dequantized to float32 (exact values of the file's grid)"}
    if dry_run:
        return report
    if inputs_overlap(out, [model.path, *model.files]):
        raise InfoptError(f"--out {out} overlaps the source {model.path}; write somewhere else")
    raw_tokenizer = header.metadata.get("tokenizer.huggingface.json")
    state = read_dense_state_dict(model.files, model.config)
    with atomic_output_dir(out, force) as tmp:
        writer = ShardedWriter(tmp, 5 * 10**9)
        for name in sorted(state):
            writer.add(name, state[name].contiguous())
        report["files"] = writer.close()
        config = {k: v for k, v in model.config.items() if k != "quantization_config"}
        config["torch_dtype"] = "float32"
        artifact.write_config(tmp, config)
        if isinstance(raw_tokenizer, str):
            (tmp / "tokenizer.json").write_text(raw_tokenizer)
            tokenizer = load_tokenizer(model.path)
            tokenizer.save_pretrained(str(tmp))
        artifact.write_model_card(tmp, {"name": out.name, "source": model.path.name,
                                        "settings": {"converted from": "gguf", "types": ", ".join(
                                            f"{k} x{v}" for k, v in types.items())}})
        artifact.write_manifest(tmp)
    return report


def _linear_shapes(model: ModelDir, names: list[str]) -> dict[str, tuple[int, int]]:
    shapes: dict[str, tuple[int, int]] = {}
    if model.pickle:
        available = {n: tuple(t.shape) for n, t in _source_tensors(model)}
    else:
        available = {}
        for file in model.files:
            available.update({n: tuple(info["shape"]) for n, info in check_safetensors(file).items() if n != "__metadata__"})
    for module in names:
        shape = available.get(f"{module}.weight")
        if shape is not None and len(shape) == 2:
            shapes[module] = shape
    return shapes


def _source_tensors(model: ModelDir, transient: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """transient: each tensor is used up before the next is taken (see iter_tensors' reuse_buffer)."""
    if model.pickle:
        yield from sorted(load_state_dict(model).items())
    else:
        yield from iter_tensors(model.files, reuse_buffer=transient)


@dataclass(frozen=True, kw_only=True)
class CalibrationData:
    """Which text calibrated methods see, and how it is cut into windows."""

    dataset: str  # wikitext2, tinystories, a .txt/.jsonl/.parquet file or hf:NAME[:CONFIG][:SPLIT]
    samples: int = 128
    seq_len: int = 2048  # capped at the model's context
    seed: int = 0
    text_field: str = "text"

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise InfoptError(f"invalid calibration samples {self.samples}: at least 1")
        if self.seq_len < 2:
            raise InfoptError(f"invalid calibration seq_len {self.seq_len}: at least 2")


@dataclass(frozen=True, kw_only=True)
class EvaluationSpec:
    """Where quality is measured against the source model (perplexity, KL, top-1)."""

    datasets: tuple[str, ...]
    seq_len: int | None = None  # default min(2048, model max)
    stride: int | None = None
    max_windows: int | None = None
    text_field: str = "text"


@dataclass(kw_only=True)
class QuantizeRequest:
    model: str
    out: Path | None = None
    name: str | None = None  # the artifact's name in its recipe and model card (default: the output folder's)
    method: str = "rtn"
    config: MethodConfig | None = None  # the method's options; None: its defaults
    fmt: str | None = None  # None: the method's usual format
    gguf_type: str | None = None  # --format gguf: llama-quantize's type name (None: from bits and symmetry)
    ignore: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)  # REGEX=BITS[:GROUP][:sym|asym] or REGEX=skip
    include_lm_head: bool = False
    force: bool = False
    dry_run: bool = False
    max_shard_bytes: int = 5 * 10**9
    split_max_bytes: int | None = None  # --format gguf: llama.cpp's split files of at most this much tensor data
    allow_pickle: bool = False
    calibration: CalibrationData | None = None  # calibrated methods only
    recovery: RecoveryConfig | None = None  # block-wise recovery on top of the method (makes the run calibrated)
    evaluation: EvaluationSpec | None = None  # measured into the model card
    gates: QualityGates | None = None  # limits on the evaluation's figures (report["gates"]; the CLI exits 1)
    resume: bool = False
    allow_non_finite: bool = False  # quantize weights holding NaN/Inf instead of refusing them
    windows: torch.Tensor | None = None  # calibration windows made already (a release shares them)
    eval_session: "EvalSession | None" = None  # a baseline already loaded and scored (a release shares it)
    threads: int | None = None  # torch threads to compute on (None: the process's); the stored recipe records it

    def __post_init__(self) -> None:
        self.entry = get_method(self.method)
        if self.config is None:
            self.config = self.entry.defaults()
        if not isinstance(self.config, self.entry.config):
            raise InfoptError(f"--method {self.method} takes {self.entry.config.__name__}, "
                              f"not {type(self.config).__name__}")
        if self.recovery is not None and not self.entry.recoverable:
            starts = ", ".join(m.name for m in METHODS.values() if m.recoverable)
            raise InfoptError(f"--recover starts from {starts}; --method {self.method} is not one of them")

    @property
    def calibrated(self) -> bool:
        """Whether the run goes through the sequential driver on calibration windows."""
        return self.entry.calibrated or self.recovery is not None

    @property
    def run_options(self) -> CalibratedRun:
        """How the driver runs (device, forward dtype, activations): the method's, or defaults for RTN + recovery."""
        return self.config if isinstance(self.config, CalibratedRun) else CalibratedRun()

    @property
    def format_name(self) -> str:
        return self.fmt or self.entry.default_format

    def describe(self) -> str:
        return f"{self.method} {self.config.describe()}" if self.entry.weights == FOUR_BIT else self.config.describe()


def make_request(*, method: str = "rtn", spec: QuantSpec | None = None, **values) -> QuantizeRequest:
    """A QuantizeRequest from flat keywords: the request's fields by name, everything else the method's options by
    field name (refused when the method has no such option); `spec` sets bits, group_size and symmetric at once."""
    fields = {f.name for f in dataclasses.fields(QuantizeRequest)}
    options = {key: values.pop(key) for key in list(values) if key not in fields}
    if spec is not None:
        options.update(bits=spec.bits, group_size=spec.group_size, symmetric=spec.symmetric)
    return QuantizeRequest(method=method, config=get_method(method).make_config(options), **values)


def plan_quantization(req: QuantizeRequest, model: ModelDir) -> QuantPlan:
    if model.quant_method:
        raise InfoptError(f"{model.path} is already quantized ({model.quant_method}); start from a full-precision model")
    adapter = adapter_for(text_config(model.config))
    candidates = adapter.layer_linears(model.num_layers)
    tied = bool(text_config(model.config).get("tie_word_embeddings", False))
    fmt = output_format(req.format_name, req.entry)
    if req.include_lm_head:
        if fmt.decoder_layers_only:
            raise InfoptError(f"--format {fmt.name} cannot store a quantized lm_head")
        if req.calibrated:
            raise InfoptError(f"--include-lm-head is not available with --method {req.method} "
                              "(calibrated methods quantize decoder layers; use a calibration-free method)")
        if tied:
            raise InfoptError("lm_head shares its weight with the embeddings here; it cannot be quantized alone")
        candidates.append(adapter.lm_head)
    shapes = _linear_shapes(model, candidates)
    if not shapes:
        raise InfoptError(f"{model.path}: none of the {adapter.name} linears were found in the weights")
    spec = req.config.spec()
    if fmt.single_file and not req.calibrated:
        spec = QuantSpec(4, 32, True)  # the GGUF writer rounds each tensor to its mixture's type; the plan lists them
    overrides = [parse_override(o, spec) for o in req.overrides]
    if req.entry.weights == FOUR_BIT and any(o is not None for _, o in overrides):
        raise InfoptError(f"--method {req.method} takes only REGEX=skip overrides")
    plan = build_plan(shapes, spec, req.ignore, overrides, fmt.packable)
    if not plan.quantized:
        raise InfoptError("the plan quantizes nothing: every linear is ignored or skipped")
    if fmt.uniform_spec and len({e.spec for e in plan.quantized}) > 1:
        raise InfoptError(f"--format {fmt.name} stores one scheme for the whole model; drop the --override "
                          "options that change bits/group/symmetry (or use --format compressed-tensors)")
    return plan


def _expected_bytes(req: QuantizeRequest, plan: QuantPlan, dtype_bytes: int) -> int:
    dense = sum(o * i * dtype_bytes for o, i in (e.shape for e in plan.skipped))
    return plan.dense_bytes + dense + sum(req.config.weight_bytes(e.spec, e.shape, dtype_bytes) for e in plan.quantized)


# A 16-bit float is NaN or Inf exactly when all its exponent bits are set (IEEE half; bfloat16 as fp32's top half)
_EXPONENT_BITS = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80}


def check_finite(name: str, tensor: torch.Tensor, model: ModelDir) -> None:
    if tensor.is_floating_point():
        # one pass: 16-bit values by their exponent bits (the largest masked value is the mask only where one is not
        # finite; 4x faster than summing them in fp32), wider ones by their sum (a NaN or Inf anywhere makes it NaN
        # or Inf); only a hit, or an fp32 overflow, pays for the count (50x slower on 2 threads)
        mask = _EXPONENT_BITS.get(tensor.dtype)
        if mask is not None and tensor.numel() and tensor.is_contiguous():
            if int((tensor.view(torch.int16) & mask).max()) != mask:
                return
        elif bool(torch.isfinite(tensor.sum())):
            return
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise InfoptError(f"{model.path}: tensor {name} holds {bad} non-finite values (NaN/Inf) of "
                              f"{tensor.numel()}; refusing to quantize it (--allow-non-finite goes on anyway)")


def _checked_tensors(model: ModelDir, allow_non_finite: bool, transient: bool = False):
    for name, tensor in _source_tensors(model, transient):
        if not allow_non_finite:
            check_finite(name, tensor, model)
        yield name, tensor


def _streamed_items(quantizer, model: ModelDir, plan: QuantPlan, errors: dict[str, float], progress: Progress | None,
                    allow_non_finite: bool = False):
    """Calibration-free methods, one weight at a time as the source is streamed."""
    specs = {e.module: e.spec for e in plan.quantized}
    done = 0
    for name, tensor in _checked_tensors(model, allow_non_finite, transient=True):  # each written before the next
        module = name.removesuffix(".weight")
        spec = specs.get(module) if name.endswith(".weight") else None
        if spec is None:
            yield name, tensor
            continue
        q = quantizer.quantize_weight(tensor, spec)
        errors[module] = relative_error(q, tensor)
        done += 1
        if progress:
            progress("quantize", done, len(specs))
        yield name, q


def _calibrated_items(model: ModelDir, work_dir: Path, adapter):
    """Source tensors with each layer's saved result substituted (parts read one layer at a time)."""
    cached: dict[int, LayerResult] = {}
    for name, tensor in _source_tensors(model):
        index = adapter.layer_index(name)
        if index is None:
            yield name, tensor
            continue
        if index not in cached:
            cached.clear()
            cached[index] = load_part(part_path(work_dir, index))
        result = cached[index]
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in result.quantized:
            yield name, result.quantized[module]
        else:
            yield name, result.dense.get(name, tensor)


def calibration_set(calibration: CalibrationData, model: ModelDir) -> torch.Tensor:
    """The [samples, seq_len] token windows a calibrated method sees (seeded, reproducible)."""
    max_len = text_config(model.config).get("max_position_embeddings")
    seq_len = min(calibration.seq_len, max_len) if max_len else calibration.seq_len
    tokenizer = load_tokenizer(model.path)
    ids = tokenize(tokenizer, load_text(calibration.dataset, calibration.text_field))
    return calibration_windows(ids, calibration.samples, seq_len, calibration.seed)


def work_dir_for(out: Path) -> Path:
    return out.parent / f".{out.name}.work"


def _fingerprint(req: QuantizeRequest, model: ModelDir, plan: QuantPlan, windows: torch.Tensor,
                 storage: Storage) -> str:
    digest = hashlib.sha256()
    files = [(p.name, p.stat().st_size) for p in model.files]
    config = req.run_options
    settings = {"model": str(model.path.resolve()), "files": files, "config": model.config, "method": req.method,
                "plan": [(e.module, e.spec.describe() if e.spec else None) for e in plan.entries],
                "options": config_values(req.config), "storage": str(storage), "fmt": req.format_name,
                "recovery": None if req.recovery is None else config_values(req.recovery),
                "forward_dtype": str(resolve_forward_dtype(config.forward_dtype, req.entry.bf16_forwards,
                                                           resolve_device(config.device)))}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update(windows.numpy().tobytes())
    return digest.hexdigest()


def _run_calibrated(req: QuantizeRequest, model: ModelDir, plan: QuantPlan, fmt: OutputFormat,
                    progress: Progress | None) -> tuple[Path, dict]:
    if not req.allow_non_finite:
        for _ in _checked_tensors(model, False, transient=True):  # one read of the weights, before any work folder
            pass
    windows = req.windows if req.windows is not None else calibration_set(req.calibration, model)
    config = req.run_options
    work_dir = work_dir_for(req.out)
    existed = work_dir.exists()
    try:
        done = prepare_work_dir(work_dir, _fingerprint(req, model, plan, windows, fmt.storage), req.resume, req.force)
    except OSError:
        if not existed:
            shutil.rmtree(work_dir, ignore_errors=True)
        raise
    keep_for_resume(work_dir)  # an interrupted run keeps its finished layers for --resume
    try:
        stream = LayerStream(model, torch.float32, resolve_device(config.device))
        method = req.entry.factory(req.config, fmt.storage, stream.adapter)
        if not req.entry.calibrated:
            method = PerWeight(method, req.method)
        if req.recovery is not None:
            seed = req.calibration.seed if req.calibration is not None else 0
            method = Recovery(method, req.recovery, fmt.storage, seed)
        specs = {e.module: e.spec for e in plan.quantized}
        forward_dtype = resolve_forward_dtype(config.forward_dtype, req.entry.bf16_forwards,
                                              str(stream.device))
        timing = run_layers(stream, windows, specs, method, work_dir, done, config.activation_torch_dtype(),
                            config.offload_activations, progress, forward_dtype)
    except (InfoptError, OSError):
        if done == 0:  # a failure (not an interruption) of a fresh run leaves nothing behind
            release_for_resume(work_dir)
            shutil.rmtree(work_dir, ignore_errors=True)
        raise
    info = {}
    for _, result in iter_results(work_dir, stream.num_layers):
        info.update(result.info)
    calibration = req.calibration
    details = {"calibration": {"source": calibration.dataset, "samples": int(windows.shape[0]),
                               "seq_len": int(windows.shape[1]), "seed": calibration.seed},
               "device": str(stream.device), "forward_dtype": str(forward_dtype or torch.float32).removeprefix("torch."),
               **timing, "layer_info": info, "notes": _scale_notes(info)}
    if req.recovery is not None:
        details["recovery"] = {"options": config_values(req.recovery), "describe": req.recovery.describe(),
                               "layers": [{"layer": name, **entry["recovery"]} for name, entry in info.items()
                                          if "recovery" in entry]}
    return work_dir, details


def _check_request(req: QuantizeRequest) -> None:
    """Refuse what the chosen method would silently ignore, or could not run without."""
    if req.calibrated:
        if req.calibration is None and req.windows is None:
            who = "--recover" if not req.entry.calibrated else f"--method {req.method}"
            raise InfoptError(f"{who} needs calibration text: pass --calib (e.g. wikitext2)")
        resolve_device(req.run_options.device)
    elif req.resume or (req.calibration is not None and req.format_name != "gguf"):
        raise InfoptError(f"--method {req.method} needs no calibration; drop --calib/--calib-*/--resume"
                          + (" (with --format gguf, --calib gives an importance matrix)" if not req.resume else ""))
    if req.gates is not None and req.evaluation is None:
        raise InfoptError("quality gates need an evaluation (datasets to measure on)")
    if req.recovery is not None and req.gguf_type is not None and gguf.resolve_file_type(req.gguf_type) in \
            gguf.K_GRID_TYPES:
        raise InfoptError(f"--recover learns integer group grids; the {req.gguf_type} K-quant grid is not one yet "
                          f"(use --gguf-type Q4_0, Q4_1 or Q8_0)")


def _scale_notes(info: dict[str, dict]) -> list[str]:
    """AWQ groups whose scale could not be folded, one line per distinct reason and linear kind."""
    reasons: dict[str, list[str]] = {}
    for module, entry in info.items():
        scale = entry.get("scale")
        if isinstance(scale, str) and scale.startswith("skipped"):
            reasons.setdefault(f"{module.split('.', 3)[-1]}: no AWQ scale ({scale.removeprefix('skipped: ')})",
                               []).append(module)
    return [f"{reason} - {len(mods)} layer(s)" for reason, mods in sorted(reasons.items())]


def quantize(req: QuantizeRequest, progress: Progress | None = None) -> dict:
    """Plan, quantize and write a checkpoint; with dry_run only the plan is returned. Runs on `req.threads` torch
    threads (None: the process's count); the stored recipe records the count, so `--recipe` computes on it again."""
    with compute_threads(req.threads):
        return _quantize(req, progress)


def _quantize(req: QuantizeRequest, progress: Progress | None) -> dict:
    from infopt.release.recipe import request_recipe

    fmt = output_format(req.format_name, req.entry)
    _check_request(req)
    gguf_type = _gguf_file_type(req) if fmt.single_file else None
    if gguf_type is not None and not req.calibrated and not req.entry.gguf_rounding:
        takes = ", ".join(m.name for m in METHODS.values() if m.gguf_rounding or m.calibrated)
        raise InfoptError(f"--method {req.method} has no GGUF form yet: GGUF files come from {takes} (calibration-"
                          "free: the writer rounds each tensor to its llama.cpp type; calibrated: their grid stored)")
    k_grid = gguf_type is not None and req.calibrated and gguf_type in gguf.K_GRID_TYPES
    if k_grid:  # the method quantizes on the K-quant grid the file stores (infopt.quant.kgrid)
        fmt = replace(fmt, storage=replace(fmt.storage, grid="Q4_K"))
    if gguf_type is not None and req.out is not None and req.out.suffix != ".gguf":
        raise InfoptError(f"--out {req.out}: a GGUF output is one file, named *.gguf")
    if req.gguf_type is not None and not fmt.single_file:
        raise InfoptError("--gguf-type applies to --format gguf only")
    if req.split_max_bytes is not None and not fmt.single_file:
        raise InfoptError("--split-max-size splits a GGUF file (--format gguf); --max-shard-size sizes safetensors "
                          "shards")
    if req.out is not None and not req.dry_run:
        if gguf_type is not None:
            check_file_outputs(req.out, [req.out.name + ".md"], req.force)
        else:
            check_output_target(req.out, req.force)
    model = open_model(req.model, req.allow_pickle)
    if req.out is not None and not req.dry_run and inputs_overlap(req.out, [model.path, *model.files]):
        raise InfoptError(f"--out {req.out} overlaps the source model {model.path}; write somewhere else")
    plan = plan_quantization(req, model)
    if k_grid:
        plan = _on_k_grid(plan, model, gguf_type)
    dtype_bytes = _source_dtype(model).itemsize
    report = {
        "source": req.model,
        "method": req.method,
        "format": fmt.name,
        "spec": req.describe(),
        "options": config_values(req.config),
        "quantized": [{"module": e.module, "shape": list(e.shape),
                       "spec": req.describe() if req.entry.weights == FOUR_BIT else e.spec.describe()}
                      for e in plan.quantized],
        "skipped": [{"module": e.module, "reason": e.note} for e in plan.skipped],
        "warnings": plan.warnings,
        "expected_linear_bytes": _expected_bytes(req, plan, dtype_bytes),
        "source_linear_bytes": sum(o * i for o, i in (e.shape for e in plan.entries)) * dtype_bytes,
    }
    if req.recovery is not None:  # the layers' errors come with the run
        report["recovery"] = {"options": config_values(req.recovery), "describe": req.recovery.describe(),
                              "layers": []}
    if gguf_type is not None:
        report["gguf_type"] = gguf_type
        if not req.calibrated:
            report["spec"] = f"GGUF {gguf_type} (each tensor rounded to its type by the writer)"
    if req.dry_run:
        return report
    if req.out is None:
        raise InfoptError("--out is required unless --dry-run")
    start = time.perf_counter()
    adapter = adapter_for(text_config(model.config))
    errors: dict[str, float] = {}
    imatrix = None
    record = replace(req.config.record(req.method, fmt.storage), compute_dtype=_source_dtype(model))
    report["record"] = {k: str(v).removeprefix("torch.") if k == "compute_dtype" else v
                        for k, v in dataclasses.asdict(record).items()}
    if req.calibrated:
        work_dir, details = _run_calibrated(req, model, plan, fmt, progress)
        report.update(details)
        errors = {m: i["output_error"] for m, i in details["layer_info"].items() if "output_error" in i}
        report["error_metric"] = "rel. output MSE"
        items = _calibrated_items(model, work_dir, adapter)
    elif gguf_type is not None:  # GGUF from full precision: the writer rounds each tensor to its mixture type
        work_dir = None
        report["error_metric"] = "relative weight MSE"
        if req.calibration is not None:
            from infopt.quant.imatrix import importance_matrix

            windows = req.windows if req.windows is not None else calibration_set(req.calibration, model)
            imatrix = importance_matrix(LayerStream(model, torch.float32, "cpu"), windows)
            c = req.calibration
            report["calibration"] = {"source": c.dataset, "samples": int(windows.shape[0]),
                                     "seq_len": int(windows.shape[1]), "seed": c.seed, "use": "importance matrix"}
        items = _checked_tensors(model, req.allow_non_finite, transient=True)  # the writer writes each in turn
    else:
        work_dir = None
        report["error_metric"] = "relative weight MSE"
        items = _streamed_items(req.entry.factory(req.config, fmt.storage, adapter), model, plan, errors, progress,
                                req.allow_non_finite)
    if gguf_type is not None:
        _write_gguf(req, model, adapter, gguf_type, items, report, progress, imatrix)
        _finish_work_dir(work_dir)
        # a split model is loaded from its first shard
        report.update({"out": str(req.out.parent / report["files"][0]), "seconds": time.perf_counter() - start,
                       "errors": errors,
                       "output_bytes": sum((req.out.parent / name).stat().st_size for name in report["files"]
                                           if name.endswith(".gguf"))})
        return report
    with atomic_output_dir(req.out, req.force) as tmp:
        files, specs, dense = _write_weights_and_config(tmp, model, fmt, items, [e.module for e in plan.skipped],
                                                        record, adapter, req.max_shard_bytes)
        metrics = {}
        if req.evaluation is not None:
            session = req.eval_session or EvalSession(model)
            e = req.evaluation
            metrics = {dataset: session.score(tmp, dataset, e.seq_len, e.stride, e.max_windows, e.text_field, progress)
                       for dataset in e.datasets}
            report["eval"] = metrics
        if req.gates is not None:
            report["gates"] = {"limits": dataclasses.asdict(req.gates), "failures": req.gates.failures(metrics)}
        settings = {"method": req.method, "format": fmt.name, "scheme": req.describe(),
                    "quantized linears": len(specs), "ignored": ", ".join(sorted(dense))}
        if "calibration" in report:
            c = report["calibration"]
            settings["calibration"] = f"{c['source']}: {c['samples']} windows x {c['seq_len']} tokens, seed {c['seed']}"
            settings["threads"] = f"{report['threads']} (the same inputs, seed and thread count give the same bytes)"
        if "recovery" in report:
            settings["recovery"] = _recovery_setting(report["recovery"])
        quantization_config = json.loads((tmp / "config.json").read_text()).get("quantization_config")
        refused = known_refusal(quantization_config)
        settings["vLLM 0.32 (CPU)"] = (f"does not load it: {refused}" if refused else
                                       "loads it (tested: int4 compressed-tensors, GPTQ symmetric, AWQ)")
        if refused:
            report["notes"] = report.get("notes", []) + [refusal_note(refused)]
        (tmp / artifact.RECIPE).write_text(request_recipe(req))
        artifact.write_model_card(tmp, {
            "name": req.name or req.out.name,
            "source": Path(req.model).name if Path(req.model).exists() else req.model,
            "settings": settings,
            "skipped": [e.module for e in plan.skipped],
            "metrics": _card_metrics(metrics),
            "recovery": report.get("recovery", {}).get("layers"),
            "recipe": True,
        })
        artifact.write_manifest(tmp)
    _finish_work_dir(work_dir)
    report.update({
        "out": str(req.out),
        "files": files,
        "seconds": time.perf_counter() - start,
        "output_bytes": sum(p.stat().st_size for p in req.out.iterdir() if p.is_file()),
        "errors": errors,
    })
    return report


def _write_weights_and_config(tmp: Path, model: ModelDir, fmt: OutputFormat, items, dense: list[str],
                              record, adapter, max_shard_bytes: int) -> tuple[list[str], dict, list[str]]:
    """A checkpoint folder's weights, config.json (with the format's quantization_config) and side files."""
    writer = ShardedWriter(tmp, max_shard_bytes)
    specs = fmt.write_weights(writer, items)
    files = writer.close()
    dense = list(dense)
    if adapter.lm_head not in specs:
        dense.append(adapter.lm_head)
    config = dict(model.config)
    config["quantization_config"] = fmt.config(specs, dense, record)
    artifact.write_config(tmp, config)
    fmt.side_files(tmp, config["quantization_config"])
    artifact.copy_side_files(model.path, tmp)
    return files, specs, dense


def _finish_work_dir(work_dir: Path | None) -> None:
    if work_dir is not None:
        release_for_resume(work_dir)
        shutil.rmtree(work_dir, ignore_errors=True)


_GGUF_BY_GRID = {(8, True): "Q8_0", (4, True): "Q4_0", (4, False): "Q4_1"}


def _on_k_grid(plan: QuantPlan, model: ModelDir, file_type: str) -> QuantPlan:
    """Leave to the writer (full precision, rounded at their own type) the linears the mixture does not give Q4_K."""
    from infopt.quant.spec import PlanEntry

    adapter = adapter_for(text_config(model.config))
    chosen = gguf.on_grid_modules([(e.module, e.shape) for e in plan.quantized], config=model.config,
                                  adapter=adapter, file_type=file_type)
    entries = [e if e.spec is None or e.module in chosen else
               PlanEntry(e.module, e.shape, None, f"the {file_type} mixture gives it more bits: written from full "
                                                  "precision at its own type")
               for e in plan.entries]
    if not any(e.spec is not None for e in entries):
        raise InfoptError("the plan quantizes nothing: no linear takes the Q4_K grid (rows must be multiples of 256)")
    return QuantPlan(entries, plan.dense_bytes, plan.warnings)


def _gguf_file_type(req: QuantizeRequest) -> str:
    """The GGUF file type of a request, checked against the method's grid before any work is done."""
    config = req.config
    grid = (getattr(config, "bits", None), getattr(config, "symmetric", None))
    if req.gguf_type is not None:
        file_type = gguf.resolve_file_type(req.gguf_type)
    elif grid in _GGUF_BY_GRID:
        file_type = _GGUF_BY_GRID[grid]
    else:
        raise InfoptError(f"int{grid[0]} {'sym' if grid[1] else 'asym'} has no GGUF block; pass --gguf-type "
                          f"({', '.join(gguf.FILE_TYPES)})")
    if req.calibrated:
        spec = gguf.grid_spec(file_type, config.group_size, req.entry.grids)
        if file_type in gguf.K_GRID_TYPES and config.group_size != spec.group_size:
            raise InfoptError(f"--gguf-type {file_type}: on the K-quant grid a group is a sub-block of 32 values "
                              f"(pass --group-size 32, not {config.group_size})")
        if (spec.bits, spec.symmetric) != grid:
            raise InfoptError(f"--gguf-type {file_type} stores int{spec.bits} {'sym' if spec.symmetric else 'asym'}; "
                              f"--method {req.method} is set to int{grid[0]} {'sym' if grid[1] else 'asym'} "
                              f"(pass --bits {spec.bits} {'--sym' if spec.symmetric else '--asym'})")
        if config.group_size != spec.group_size:
            raise InfoptError(f"GGUF blocks hold 32 values: --group-size {config.group_size} is not -1 or a multiple "
                              "of 32")
    if req.overrides:
        raise InfoptError("--override has no GGUF equivalent yet: the file type's mixture sets each tensor's type")
    return file_type


def _write_gguf(req: QuantizeRequest, model: ModelDir, adapter, file_type: str, items, report: dict,
                progress: Progress | None, imatrix: dict[str, torch.Tensor] | None = None) -> None:
    """One GGUF file and its model card (NAME.md beside it), each moved into place whole."""
    settings = {"method": req.method, "format": "gguf", "gguf type": file_type, "scheme": report["spec"]}
    if "calibration" in report:
        c = report["calibration"]
        settings["calibration"] = (f"{c['source']}: {c['samples']} windows x {c['seq_len']} tokens, seed {c['seed']}"
                                   + (" (importance matrix)" if imatrix is not None else ""))
    if "recovery" in report:
        settings["recovery"] = _recovery_setting(report["recovery"])
    name = req.name or req.out.name.removesuffix(".gguf")
    split = req.split_max_bytes is not None
    with atomic_output_files(req.out, [req.out.name + ".md"], req.force, split=split) as tmp:
        written = gguf.write_model(tmp / req.out.name, items, config=model.config, adapter=adapter,
                                   tokenizer_dir=model.path, file_type=file_type, name=name,
                                   provenance={**settings, "options": config_values(req.config)},
                                   imatrix=imatrix, max_shard_bytes=req.split_max_bytes)
        if split:
            settings["split"] = f"{len(written.files)} files (llama.cpp's split naming; load the first)"
        metrics = {}
        if req.evaluation is not None:
            session = req.eval_session or EvalSession(model)
            e = req.evaluation
            metrics = {dataset: session.score(tmp / written.files[0], dataset, e.seq_len, e.stride, e.max_windows,
                                              e.text_field, progress) for dataset in e.datasets}
            report["eval"] = metrics
        if req.gates is not None:
            report["gates"] = {"limits": dataclasses.asdict(req.gates), "failures": req.gates.failures(metrics)}
        types = written.types()
        settings["tensor types"] = ", ".join(f"{k} x{v}" for k, v in types.items())
        exact = written.count("exact")
        if req.calibrated:
            settings["stored exactly"] = f"{exact} of {len(report['quantized'])} quantized linears"
        fallbacks = [f"{t['name']}: {t['fallback']}" for t in written.tensors if "fallback" in t]
        report["gguf"] = {"tensors": written.tensors, "types": types, "fallbacks": fallbacks}
        artifact.write_model_card(tmp, {"name": name, "source": Path(req.model).name if Path(req.model).exists()
                                        else req.model, "settings": settings,
                                        "skipped": [s["module"] for s in report["skipped"]],
                                        "metrics": _card_metrics(metrics), "loader": "gguf",
                                        "recovery": report.get("recovery", {}).get("layers")}, req.out.name + ".md")
    report["files"] = [*written.files, req.out.name + ".md"]


def _recovery_setting(recovery: dict) -> str:
    layers = recovery["layers"]
    kept = sum(entry["kept"] == "recovered" for entry in layers)
    return (f"block-wise, {recovery['describe']}; learned result kept in {kept} of {len(layers)} layers "
            "(the base result where it was not better)")


def _card_metrics(metrics: dict[str, dict]) -> list[dict]:
    rows = []
    for dataset, m in metrics.items():
        row = {"dataset": dataset, "perplexity": f"{m['ppl']:.4f}", "tokens": m["tokens"], "seq_len": m["seq_len"]}
        if "baseline_ppl" in m:
            row.update({"baseline perplexity": f"{m['baseline_ppl']:.4f}",
                        "relative change": f"{m['ppl_delta_rel']:+.4%}",
                        "KL(baseline || this)": f"{m['kl_mean']:.6f}",
                        "top-1 agreement": f"{m['top1_agreement']:.4%}"})
        rows.append(row)
    return rows


def _source_dtype(model: ModelDir) -> torch.dtype:
    """The checkpoint's declared float dtype (float32 unless it says float16 or bfloat16)."""
    dtype = str(text_config(model.config).get("torch_dtype") or model.config.get("dtype") or "float32")
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype.removeprefix("torch."), torch.float32)


def window_length(model_dir: ModelDir, seq_len: int | None) -> int:
    """--seq-len checked against the model's context (default: `default_seq_len`)."""
    context = text_config(model_dir.config).get("max_position_embeddings")
    if seq_len is None:
        return default_seq_len(model_dir.config)
    if seq_len < 2:
        raise InfoptError(f"--seq-len {seq_len}: a window needs at least 2 tokens")
    if context and seq_len > context:
        raise InfoptError(f"--seq-len {seq_len} exceeds the model's context ({context} tokens, "
                          "max_position_embeddings); its scores past that would measure nothing real")
    return seq_len


class EvalSession:
    """Scores checkpoints against one baseline: the baseline is loaded once, each dataset tokenized once, and the
    baseline's log-probabilities of every window batch kept (within `cache_bytes`) for every later comparison, so
    comparing N checkpoints costs N + 1 forward passes per window, not 2N."""

    def __init__(self, baseline: ModelDir | None, loader: Callable[[ModelDir], object] | None = None,
                 tokenizer_dir: Path | None = None, trust_remote_code: bool = False, cache_bytes: int = 2**30):
        self.baseline = baseline
        self.load = loader or (lambda folder: load_causal_lm(folder, torch.float32))
        self.tokenizer_dir = tokenizer_dir or (baseline.path if baseline is not None else None)
        self.trust_remote_code = trust_remote_code
        self._base_lm = None
        self.last_model = None  # the model scored last (for reports on how it ran)
        self._ids: dict[tuple[str, str], torch.Tensor] = {}
        self._log_probs: dict[tuple, dict] = {}
        self._budget = {"left": cache_bytes}

    def token_ids(self, dataset: str, text_field: str = "text") -> torch.Tensor:
        key = (dataset, text_field)
        if key not in self._ids:
            tokenizer = load_tokenizer(self.tokenizer_dir, self.trust_remote_code)
            self._ids[key] = tokenize(tokenizer, load_text(dataset, text_field))
        return self._ids[key]

    def score(self, model: str | Path | ModelDir, dataset: str, seq_len: int | None = None, stride: int | None = None,
              max_windows: int | None = None, text_field: str = "text", progress: Progress | None = None) -> dict:
        model_dir = model if isinstance(model, ModelDir) else open_model(str(model))
        if self.tokenizer_dir is None:
            self.tokenizer_dir = model_dir.path
        ids = self.token_ids(dataset, text_field)
        seq_len = window_length(model_dir, seq_len)
        lm = self.last_model = self.load(model_dir)
        if self.baseline is not None and self._base_lm is None:
            self._base_lm = self.load(self.baseline)
        if self._base_lm is not None and self._base_lm.config.vocab_size != lm.config.vocab_size:
            raise InfoptError("model and baseline have different vocabularies; they must share a tokenizer")
        cache = None
        if self._base_lm is not None:
            cache = self._log_probs.setdefault((dataset, text_field, seq_len, stride), {"budget": self._budget})
        report = evaluate(lm, ids, seq_len, stride, max_windows, self._base_lm,
                          default_batch_size(seq_len, lm.config.vocab_size),
                          (lambda d, t: progress("eval", d, t)) if progress else None, baseline_cache=cache)
        report["dataset"] = dataset
        return report


def evaluate_checkpoint(model: str | ModelDir, dataset: str, baseline: str | ModelDir | None = None,
                        seq_len: int | None = None, stride: int | None = None, max_windows: int | None = None,
                        text_field: str = "text", allow_pickle: bool = False,
                        progress: Progress | None = None, trust_remote_code: bool = False,
                        dtype: torch.dtype = torch.float32, engine: str = "transformers",
                        kernels: str | None = None, tokenizer: Path | None = None,
                        vllm_options: "VLLMOptions | None" = None) -> dict:
    """Perplexity (and with a baseline KL and top-1 agreement). engine "transformers" dequantizes packed weights
    into transformers' model; "infopt" scores through infopt's runtime with the `kernels` backend (what `infopt
    run` computes: packed kernels, int8 activations with "ext-a8"); "vllm" scores the same windows from vLLM's
    prompt log-probabilities (no KL: it returns no full distributions); the baseline runs on the same engine."""
    if engine not in ("transformers", "infopt", "vllm"):
        raise InfoptError(f"invalid engine {engine!r}: choose transformers, infopt or vllm")
    if kernels is not None and engine != "infopt":
        raise InfoptError("--kernels applies to --engine infopt")
    if vllm_options is not None and engine != "vllm":
        raise InfoptError("the vLLM options (--tensor-parallel-size, --vllm-arg, ...) apply to --engine vllm")
    model_dir = model if isinstance(model, ModelDir) else open_model(model, allow_pickle)
    base_dir = None
    if baseline is not None:
        base_dir = baseline if isinstance(baseline, ModelDir) else open_model(baseline, allow_pickle)
    if tokenizer is not None and not Path(tokenizer).exists():
        raise InfoptError(f"--tokenizer {tokenizer}: no such folder")
    if engine == "vllm":
        return _evaluate_with_vllm(model_dir, base_dir, dataset, seq_len, stride, max_windows, text_field,
                                   tokenizer, trust_remote_code, vllm_options, progress)
    if engine == "infopt":
        for folder in (model_dir, base_dir):
            _check_engine_support(folder)
        load = lambda folder: _engine_scorer(folder, dtype, kernels)  # noqa: E731
    else:
        load = lambda folder: load_causal_lm(folder, dtype, trust_remote_code=trust_remote_code)  # noqa: E731
    session = EvalSession(base_dir, load, Path(tokenizer) if tokenizer else model_dir.path, trust_remote_code)
    report = session.score(model_dir, dataset, seq_len, stride, max_windows, text_field, progress)
    report["engine"] = engine
    if engine == "infopt":
        from infopt.runtime.runner import linear_backends

        report["quantized_linears"] = linear_backends(session.last_model.model)
    return report


def _evaluate_with_vllm(model_dir: ModelDir, base_dir: ModelDir | None, dataset: str, seq_len: int | None,
                        stride: int | None, max_windows: int | None, text_field: str, tokenizer: Path | None,
                        trust_remote_code: bool, options: "VLLMOptions | None", progress: Progress | None) -> dict:
    """The windows and protocol of `evaluate`, scored by vLLM: the model and the baseline in one vLLM process."""
    from infopt.eval.perplexity import evaluate_targets, plan_windows, window_inputs
    from infopt.runtime import vllm_engine as vllm

    options = options or vllm.VLLMOptions()
    session = EvalSession(None, None, Path(tokenizer) if tokenizer else model_dir.path, trust_remote_code)
    ids = session.token_ids(dataset, text_field)
    seq_len = window_length(model_dir, seq_len)
    windows = plan_windows(ids.numel(), seq_len, stride, max_windows)
    inputs = window_inputs(ids, windows)
    folders = [model_dir] + ([base_dir] if base_dir is not None else [])
    length = {} if "max_model_len" in options.args() else {"max_model_len": seq_len + 1}
    jobs = [{"model": str(folder.path), "tasks": [{"kind": "score", "windows": inputs}], "engine_args": length}
            for folder in folders]
    result = vllm.run_job(jobs, options, (lambda text: progress(text, 0, 1)) if progress else None, scoring=True)
    scores = [vllm.window_scores(vllm.checked(outcome, str(folder.path), 1)["tasks"][0], inputs)
              for folder, outcome in zip(folders, result["models"])]
    report = evaluate_targets(windows, scores[0], scores[1] if base_dir is not None else None, seq_len, stride)
    report.update(dataset=dataset, engine="vllm", vllm={
        "version": result["vllm_version"], "platform": result["platform"], "engine_args": result["engine_args"],
        "load_seconds": [outcome["load_seconds"] for outcome in result["models"]]})
    return report


def _check_engine_support(model_dir: ModelDir | None) -> None:
    from infopt.runtime.model import unsupported_reason

    reason = None if model_dir is None else unsupported_reason(model_dir.config)
    if reason:
        raise InfoptError(f"--engine infopt cannot score {model_dir.path}: the infopt runtime does not support {reason}")


def _engine_scorer(model_dir: ModelDir, dtype: torch.dtype, kernels: str | None):
    from infopt.runtime.model import load_engine_model
    from infopt.runtime.scoring import EngineScorer

    return EngineScorer(load_engine_model(model_dir, dtype, kernels))


def generate_text(model: str, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 1.0, seed: int = 0, allow_pickle: bool = False,
                  on_text: Callable[[str], None] | None = None, trust_remote_code: bool = False,
                  dtype: torch.dtype = torch.float32, engine: str = "auto") -> dict:
    """One prompt through `infopt.runtime.runner` (the infopt engine where it supports the model)."""
    from infopt.runtime.engine import SamplingParams
    from infopt.runtime.runner import Prompt, RunOptions, run_prompts

    params = SamplingParams(max_new_tokens, temperature, top_k, top_p, seed)
    options = RunOptions(params, dtype, engine, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    report = run_prompts(model, [Prompt(prompt)], options, on_text)
    report.pop("page_map", None)
    return report

