"""End-to-end jobs the CLI and the demo call: convert, quantize, evaluate, generate.

Data flows one way: source checkpoint -> plan -> quantized tensors -> format writer -> output folder.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import torch

from infopt.calibration.sources import load_text
from infopt.calibration.windows import calibration_windows, tokenize
from infopt.errors import InfoptError
from infopt.eval.perplexity import default_batch_size, default_seq_len, evaluate
from infopt.formats import artifact
from infopt.formats.writers import DEFAULT_FORMAT, FOUR_BIT_METHODS, OutputFormat, output_format
from infopt.formats.safetensors_io import ShardedWriter, check_safetensors, iter_tensors
from infopt.models import llama2c
from infopt.models.adapters import adapter_for
from infopt.models.loading import ModelDir, load_causal_lm, load_state_dict, load_tokenizer, open_model, text_config
from infopt.paths import atomic_output_dir, check_output_target
from infopt.models.streaming import LayerStream
from infopt.quant.driver import LayerResult, iter_results, load_part, part_path, prepare_work_dir, run_layers
from infopt.quant.awq import AWQConfig, AWQMethod
from infopt.quant.gptq import GPTQConfig, GPTQMethod
from infopt.quant.nf4 import quantize_4bit
from infopt.quant.precision import resolve_forward_dtype
from infopt.quant.rtn import Storage, quantize_rtn
from infopt.quant.spec import QuantPlan, QuantSpec, build_plan

Progress = Callable[[str, int, int], None]


def convert_llama2c(src: Path, tokenizer: Path | None, out: Path, force: bool = False) -> dict:
    if not src.is_file():
        raise InfoptError(f"no such file: {src}")
    if tokenizer is not None and not tokenizer.is_file():
        raise InfoptError(f"no such tokenizer file: {tokenizer}")
    with atomic_output_dir(out, force) as tmp:
        params = llama2c.convert(src, tokenizer, tmp)
    return {"out": str(out), "params": params.__dict__}


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


def _source_tensors(model: ModelDir) -> Iterator[tuple[str, torch.Tensor]]:
    if model.pickle:
        yield from sorted(load_state_dict(model).items())
    else:
        yield from iter_tensors(model.files)


METHODS = ("rtn", "gptq", "awq", "nf4", "fp4")
CALIBRATED = ("gptq", "awq")


@dataclass
class QuantizeRequest:
    model: str
    spec: QuantSpec
    out: Path | None
    fmt: str | None = None  # None: the method's usual format
    method: str = "rtn"
    ignore: list[str] = field(default_factory=list)
    overrides: list[tuple[str, QuantSpec | None]] = field(default_factory=list)
    include_lm_head: bool = False
    force: bool = False
    dry_run: bool = False
    max_shard_bytes: int = 5 * 10**9
    allow_pickle: bool = False
    eval_dataset: str | None = None
    eval_max_windows: int | None = None
    # calibrated methods
    calib: str | None = None
    calib_samples: int = 128
    calib_seq_len: int = 2048
    calib_seed: int = 0
    text_field: str = "text"
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    awq: AWQConfig = field(default_factory=AWQConfig)
    device: str = "auto"
    resume: bool = False
    offload_activations: bool = False
    activation_dtype: torch.dtype | None = None
    forward_dtype: str = "auto"  # layer forwards' matmuls: auto, float32 or bfloat16 (see resolve_forward_dtype)
    # nf4 / fp4 (bitsandbytes)
    block_size: int = 64
    double_quant: bool = False

    @property
    def format_name(self) -> str:
        return self.fmt or DEFAULT_FORMAT.get(self.method, "compressed-tensors")

    def describe(self) -> str:
        if self.method in FOUR_BIT_METHODS:
            return f"{self.method} block {self.block_size}" + (" double-quant" if self.double_quant else "")
        return self.spec.describe()


def plan_quantization(req: QuantizeRequest, model: ModelDir) -> QuantPlan:
    if model.quant_method:
        raise InfoptError(f"{model.path} is already quantized ({model.quant_method}); start from a full-precision model")
    adapter = adapter_for(text_config(model.config))
    candidates = adapter.layer_linears(model.num_layers)
    tied = bool(text_config(model.config).get("tie_word_embeddings", False))
    fmt = output_format(req.format_name, req.method)
    if req.include_lm_head:
        if fmt.decoder_layers_only:
            raise InfoptError(f"--format {fmt.name} cannot store a quantized lm_head")
        if req.method in CALIBRATED:
            raise InfoptError(f"--include-lm-head is not available with --method {req.method} (use rtn)")
        if tied:
            raise InfoptError("lm_head shares its weight with the embeddings here; it cannot be quantized alone")
        candidates.append(adapter.lm_head)
    shapes = _linear_shapes(model, candidates)
    if not shapes:
        raise InfoptError(f"{model.path}: none of the {adapter.name} linears were found in the weights")
    spec = req.spec
    if req.method in FOUR_BIT_METHODS:
        if any(o is not None for _, o in req.overrides):
            raise InfoptError(f"--method {req.method} takes only REGEX=skip overrides")
        spec = QuantSpec(4, -1, True)  # blockwise over the whole weight: every shape fits
    plan = build_plan(shapes, spec, req.ignore, req.overrides, fmt.packable)
    if not plan.quantized:
        raise InfoptError("the plan quantizes nothing: every linear is ignored or skipped")
    if fmt.uniform_spec and len({e.spec for e in plan.quantized}) > 1:
        raise InfoptError(f"--format {fmt.name} stores one scheme for the whole model; drop the --override "
                          "options that change bits/group/symmetry (or use --format compressed-tensors)")
    return plan


def _four_bit_bytes(shape: tuple[int, int], block: int, double_quant: bool) -> int:
    numel = shape[0] * shape[1]
    blocks = -(-numel // block)
    scales = blocks + 4 * -(-blocks // 256) + 4 * 256 if double_quant else 4 * blocks
    return -(-numel // 2) + scales + 4 * 16


def _expected_bytes(req: QuantizeRequest, plan: QuantPlan, dtype_bytes: int) -> int:
    if req.method not in FOUR_BIT_METHODS:
        return plan.expected_bytes(dtype_bytes)
    dense = sum(o * i * dtype_bytes for o, i in (e.shape for e in plan.skipped))
    return plan.dense_bytes + dense + sum(_four_bit_bytes(e.shape, req.block_size, req.double_quant)
                                          for e in plan.quantized)


def _streamed_items(req: QuantizeRequest, model: ModelDir, plan: QuantPlan, storage: Storage, errors: dict[str, float],
               progress: Progress | None):
    """Calibration-free methods, one weight at a time as the source is streamed."""
    specs = {e.module: e.spec for e in plan.quantized}
    done = 0
    for name, tensor in _source_tensors(model):
        module = name.removesuffix(".weight")
        spec = specs.get(module) if name.endswith(".weight") else None
        if spec is None:
            yield name, tensor
            continue
        if req.method in FOUR_BIT_METHODS:
            q = quantize_4bit(tensor, req.method, req.block_size, req.double_quant)
        else:
            q = quantize_rtn(tensor, spec, storage)
        diff = (q.dequantize().float() - tensor.float()).pow(2).sum()
        errors[module] = float(diff / tensor.float().pow(2).sum().clamp_min(1e-30))
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


def calibration_set(req: QuantizeRequest, model: ModelDir) -> torch.Tensor:
    """The [samples, seq_len] token windows a calibrated method sees (seeded, reproducible)."""
    if not req.calib:
        raise InfoptError(f"--method {req.method} needs calibration text: pass --calib (e.g. wikitext2)")
    max_len = text_config(model.config).get("max_position_embeddings")
    seq_len = min(req.calib_seq_len, max_len) if max_len else req.calib_seq_len
    tokenizer = load_tokenizer(model.path)
    ids = tokenize(tokenizer, load_text(req.calib, req.text_field))
    return calibration_windows(ids, req.calib_samples, seq_len, req.calib_seed)


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise InfoptError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise InfoptError(f"invalid --device {name!r}: auto, cpu or cuda")
    return name


def work_dir_for(out: Path) -> Path:
    return out.parent / f".{out.name}.work"


def _fingerprint(req: QuantizeRequest, model: ModelDir, plan: QuantPlan, windows: torch.Tensor,
                 storage: Storage) -> str:
    digest = hashlib.sha256()
    files = [(p.name, p.stat().st_size) for p in model.files]
    settings = {"model": str(model.path.resolve()), "files": files, "config": model.config, "method": req.method,
                "plan": [(e.module, e.spec.describe() if e.spec else None) for e in plan.entries],
                "gptq": req.gptq.__dict__, "awq": req.awq.__dict__, "storage": str(storage), "fmt": req.format_name,
                "activation_dtype": str(req.activation_dtype),
                "forward_dtype": str(resolve_forward_dtype(req.forward_dtype, req.method, resolve_device(req.device)))}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update(windows.numpy().tobytes())
    return digest.hexdigest()


def _run_calibrated(req: QuantizeRequest, model: ModelDir, plan: QuantPlan, fmt: OutputFormat,
                    progress: Progress | None) -> tuple[Path, dict]:
    windows = calibration_set(req, model)
    config = req.gptq
    if config.act_order and not fmt.supports_g_idx and not config.static_groups:
        config = replace(config, static_groups=True)
    work_dir = work_dir_for(req.out)
    done = prepare_work_dir(work_dir, _fingerprint(req, model, plan, windows, fmt.storage), req.resume, req.force)
    stream = LayerStream(model, torch.float32, resolve_device(req.device))
    if req.method == "awq":
        method = AWQMethod(stream.adapter, req.awq, fmt.storage)
    else:
        method = GPTQMethod(config, fmt.storage)
    specs = {e.module: e.spec for e in plan.quantized}
    forward_dtype = resolve_forward_dtype(req.forward_dtype, req.method, str(stream.device))
    timing = run_layers(stream, windows, specs, method, work_dir, done, req.activation_dtype,
                        req.offload_activations, progress, forward_dtype)
    info = {}
    for _, result in iter_results(work_dir, stream.num_layers):
        info.update(result.info)
    details = {"calibration": {"source": req.calib, "samples": int(windows.shape[0]), "seq_len": int(windows.shape[1]),
                               "seed": req.calib_seed},
               req.method: (config if req.method == "gptq" else req.awq).__dict__, "device": str(stream.device),
               "forward_dtype": str(forward_dtype or torch.float32).removeprefix("torch."),
               **timing, "layer_info": info, "notes": _scale_notes(info)}
    return work_dir, details


def _check_method_options(req: QuantizeRequest) -> None:
    """Refuse options the chosen method would silently ignore."""
    if req.method != "gptq" and (req.gptq.act_order or req.gptq.static_groups):
        raise InfoptError("--act-order and --static-groups apply to --method gptq only")
    if req.method not in CALIBRATED and (req.calib or req.resume):
        raise InfoptError(f"--method {req.method} needs no calibration; drop --calib/--resume")
    if req.method not in FOUR_BIT_METHODS and req.double_quant:
        raise InfoptError("--double-quant applies to --method nf4/fp4 only")
    resolve_forward_dtype(req.forward_dtype, req.method, "cpu")  # refuses an unknown choice
    if req.method not in CALIBRATED and req.forward_dtype != "auto":
        raise InfoptError(f"--forward-dtype applies to calibrated methods (gptq, awq), not {req.method}")


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
    """Plan, quantize and write a checkpoint; with dry_run only the plan is returned."""
    if req.method not in METHODS:
        raise InfoptError(f"method {req.method!r} is not available (available: {', '.join(METHODS)})")
    fmt = output_format(req.format_name, req.method)
    _check_method_options(req)
    if req.method in CALIBRATED:
        resolve_device(req.device)
    if req.out is not None and not req.dry_run:
        check_output_target(req.out, req.force)
    model = open_model(req.model, req.allow_pickle)
    plan = plan_quantization(req, model)
    dtype_bytes = _source_dtype(model).itemsize
    report = {
        "source": req.model,
        "method": req.method,
        "format": fmt.name,
        "spec": req.describe(),
        "quantized": [{"module": e.module, "shape": list(e.shape),
                       "spec": req.describe() if req.method in FOUR_BIT_METHODS else e.spec.describe()}
                      for e in plan.quantized],
        "skipped": [{"module": e.module, "reason": e.note} for e in plan.skipped],
        "warnings": plan.warnings,
        "expected_linear_bytes": _expected_bytes(req, plan, dtype_bytes),
        "source_linear_bytes": sum(o * i for o, i in (e.shape for e in plan.entries)) * dtype_bytes,
    }
    if req.dry_run:
        return report
    if req.out is None:
        raise InfoptError("--out is required unless --dry-run")
    start = time.perf_counter()
    adapter = adapter_for(text_config(model.config))
    errors: dict[str, float] = {}
    method_info = {"method": req.method, "quant_type": req.method, "double_quant": req.double_quant,
                   "compute_dtype": _source_dtype(model)}
    if req.method in CALIBRATED:
        work_dir, details = _run_calibrated(req, model, plan, fmt, progress)
        report.update(details)
        method_info.update(details[req.method])
        errors = {m: i["output_error"] for m, i in details["layer_info"].items()}
        report["error_metric"] = "rel. output MSE"
        items = _calibrated_items(model, work_dir, adapter)
    else:
        work_dir = None
        report["error_metric"] = "relative weight MSE"
        items = _streamed_items(req, model, plan, fmt.storage, errors, progress)
    with atomic_output_dir(req.out, req.force) as tmp:
        writer = ShardedWriter(tmp, req.max_shard_bytes)
        specs = fmt.write_weights(writer, items)
        files = writer.close()
        dense = [e.module for e in plan.skipped]
        if adapter.lm_head not in specs:
            dense.append(adapter.lm_head)
        config = dict(model.config)
        config["quantization_config"] = fmt.config(specs, dense, method_info)
        artifact.write_config(tmp, config)
        fmt.side_files(tmp, config["quantization_config"])
        artifact.copy_side_files(model.path, tmp)
        metrics = {}
        if req.eval_dataset:
            metrics = evaluate_checkpoint(str(tmp), req.eval_dataset, baseline=model, max_windows=req.eval_max_windows)
            report["eval"] = metrics
        settings = {"method": req.method, "format": fmt.name, "scheme": req.describe(),
                    "quantized linears": len(specs), "ignored": ", ".join(sorted(dense))}
        if "calibration" in report:
            c = report["calibration"]
            settings["calibration"] = f"{c['source']}: {c['samples']} windows x {c['seq_len']} tokens, seed {c['seed']}"
        artifact.write_model_card(tmp, {
            "name": req.out.name,
            "source": Path(req.model).name if Path(req.model).exists() else req.model,
            "settings": settings,
            "skipped": [e.module for e in plan.skipped],
            "metrics": _card_metrics(metrics, req.eval_dataset),
        })
        artifact.write_manifest(tmp)
    if work_dir is not None:
        shutil.rmtree(work_dir, ignore_errors=True)
    report.update({
        "out": str(req.out),
        "files": files,
        "seconds": time.perf_counter() - start,
        "output_bytes": sum(p.stat().st_size for p in req.out.iterdir() if p.is_file()),
        "errors": errors,
    })
    return report


def _card_metrics(metrics: dict, dataset: str | None) -> dict:
    if not metrics:
        return {}
    out = {"dataset": dataset, "perplexity": f"{metrics['ppl']:.4f}", "tokens": metrics["tokens"],
           "seq_len": metrics["seq_len"]}
    if "baseline_ppl" in metrics:
        out.update({"baseline perplexity": f"{metrics['baseline_ppl']:.4f}",
                    "relative change": f"{metrics['ppl_delta_rel']:+.4%}",
                    "KL(baseline || this)": f"{metrics['kl_mean']:.6f}",
                    "top-1 agreement": f"{metrics['top1_agreement']:.4%}"})
    return out


def _source_dtype(model: ModelDir) -> torch.dtype:
    """The checkpoint's declared float dtype (float32 unless it says float16 or bfloat16)."""
    dtype = str(text_config(model.config).get("torch_dtype") or model.config.get("dtype") or "float32")
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype.removeprefix("torch."), torch.float32)


def evaluate_checkpoint(model: str | ModelDir, dataset: str, baseline: str | ModelDir | None = None,
                        seq_len: int | None = None, stride: int | None = None, max_windows: int | None = None,
                        text_field: str = "text", allow_pickle: bool = False,
                        progress: Progress | None = None, trust_remote_code: bool = False,
                        dtype: torch.dtype = torch.float32, engine: str = "transformers",
                        kernels: str | None = None) -> dict:
    """Perplexity (and with a baseline KL and top-1 agreement). engine "transformers" dequantizes packed weights
    into transformers' model; "infopt" scores through infopt's runtime with the `kernels` backend (what `infopt
    run` computes: packed kernels, int8 activations with "ext-a8"); the baseline runs on the same engine."""
    if engine not in ("transformers", "infopt"):
        raise InfoptError(f"invalid engine {engine!r}: choose transformers or infopt")
    if kernels is not None and engine != "infopt":
        raise InfoptError("--kernels applies to --engine infopt")
    model_dir = model if isinstance(model, ModelDir) else open_model(model, allow_pickle)
    base_dir = None
    if baseline is not None:
        base_dir = baseline if isinstance(baseline, ModelDir) else open_model(baseline, allow_pickle)
    if engine == "infopt":
        for folder in (model_dir, base_dir):
            _check_engine_support(folder)
    text = load_text(dataset, text_field)
    tokenizer = load_tokenizer(model_dir.path, trust_remote_code)
    ids = tokenize(tokenizer, text)
    seq_len = seq_len or default_seq_len(model_dir.config)
    if engine == "infopt":
        load = lambda folder: _engine_scorer(folder, dtype, kernels)  # noqa: E731
    else:
        load = lambda folder: load_causal_lm(folder, dtype, trust_remote_code=trust_remote_code)  # noqa: E731
    lm = load(model_dir)
    base_lm = load(base_dir) if base_dir is not None else None
    if base_lm is not None and base_lm.config.vocab_size != lm.config.vocab_size:
        raise InfoptError("model and baseline have different vocabularies; they must share a tokenizer")
    batch = default_batch_size(seq_len, lm.config.vocab_size)
    report = evaluate(lm, ids, seq_len, stride, max_windows, base_lm, batch,
                      (lambda d, t: progress("eval", d, t)) if progress else None)
    report["dataset"] = dataset
    report["engine"] = engine
    if engine == "infopt":
        from infopt.runtime.runner import linear_backends

        report["quantized_linears"] = linear_backends(lm.model)
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

