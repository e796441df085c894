"""The `infopt` command: thin wrappers that parse, call the library, and print."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from infopt import __version__
from infopt.cli.output import err_console, human_bytes, out_console, print_json, progress_bar, warn
from infopt.errors import InfoptError, QualityGateError
from infopt.models.loading import parse_dtype

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Quantize, verify and run Hugging Face causal language models.")
convert_app = typer.Typer(no_args_is_help=True, help="Convert checkpoints from other tools to Hugging Face format.")
app.add_typer(convert_app, name="convert")

# Options shared by every command that loads a model.
ALLOW_PICKLE = typer.Option(False, "--allow-pickle", help="Allow pickle (.bin) weights, which can run code when loaded.")
def _split_bytes(size: Optional[str]) -> Optional[int]:
    from infopt.formats.safetensors_io import parse_size

    return None if size is None else parse_size(size)


SPLIT_MAX_SIZE = typer.Option(None, "--split-max-size", help="With a GGUF output: llama.cpp's split files "
                              "(FILE-00001-of-0000N.gguf; llama.cpp and infopt load the first) of at most this much "
                              "tensor data each, as gguf-split --split-max-size (e.g. 2G, 500M, 4GB).")
TRUST_REMOTE_CODE = typer.Option(False, "--trust-remote-code", help="Run custom model code from the model folder.")
DTYPE = typer.Option("float32", "--dtype", help="Compute dtype: float32, bfloat16 or float16.")
VLLM_PANEL = "vLLM (--engine vllm)"
TENSOR_PARALLEL = typer.Option(None, "--tensor-parallel-size", rich_help_panel=VLLM_PANEL,
                               help="GPUs vLLM splits each layer over (vLLM's tensor_parallel_size).")
VLLM_ARGS = typer.Option([], "--vllm-arg", rich_help_panel=VLLM_PANEL, help="KEY=VALUE passed to vllm.LLM as it is "
                         "(repeatable; VALUE read as JSON where it parses), e.g. pipeline_parallel_size=2, "
                         "dtype=float16, gpu_memory_utilization=0.8, max_num_seqs=64.")
VLLM_PYTHON = typer.Option(None, "--vllm-python", rich_help_panel=VLLM_PANEL, help="The Python that imports vllm "
                           "(default: $INFOPT_VLLM_PYTHON, this Python, or the venv `make vllm-env` builds).")


def _vllm_options(engine: str, tensor_parallel: Optional[int], vllm_args: list[str], vllm_python: Optional[str],
                  seed: int = 0):
    """The vLLM options, or None when the engine is another (which must then have none of them given)."""
    from infopt.runtime.vllm_engine import VLLMOptions, parse_engine_args

    if engine != "vllm":
        if tensor_parallel is not None or vllm_args or vllm_python is not None:
            raise InfoptError("--tensor-parallel-size, --vllm-arg and --vllm-python apply to --engine vllm")
        return None
    return VLLMOptions(tensor_parallel_size=tensor_parallel or 1, engine_args=parse_engine_args(vllm_args),
                       python=vllm_python, seed=seed)


def _config_option(config, name: str, panel: str, default=None):
    """A flag from a config class's field (its declared flag and help); `default` words the default shown."""
    import dataclasses

    f = next(f for f in dataclasses.fields(config) if f.name == name)
    shown = f.default if default is None else default
    return typer.Option(None, f.metadata["flag"], help=f"{f.metadata['help']} (default {shown})",
                        show_default=False, rich_help_panel=panel)


def _recovery_option(name: str):
    """A --recover-* flag from the recovery config's field (infopt.quant.recovery)."""
    from infopt.quant.recovery import RecoveryConfig

    return _config_option(RecoveryConfig, name, "Recovery options", "by optimizer" if name == "lr" else None)


def _version(value: bool) -> None:
    if value:
        out_console.print(f"infopt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version.")) -> None:
    pass


@convert_app.command("gguf")
def convert_gguf(
    src: str = typer.Argument(..., help="A checkpoint folder (full precision, compressed-tensors, GPTQ, AWQ) or a "
                              "FILE.gguf."),
    out: Path = typer.Option(..., "--out", help="FILE.gguf, or a folder when SRC is GGUF."),
    gguf_type: Optional[str] = typer.Option(None, "--gguf-type", help="Type of the tensors that are not already on "
                                            "a grid a ggml block holds (default: the grid's type, F16 for a "
                                            "full-precision source)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say, for each tensor, whether it converts exactly."),
    force: bool = typer.Option(False, "--force", help="Replace an earlier infopt output."),
    split_max_size: Optional[str] = SPLIT_MAX_SIZE,
    allow_pickle: bool = ALLOW_PICKLE,
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Convert between GGUF and the folder formats, without re-quantizing where the layout allows it."""
    from infopt.workflows import convert_gguf as run

    result = run(src, out, gguf_type=gguf_type, force=force, dry_run=dry_run, allow_pickle=allow_pickle,
                 split_max_bytes=_split_bytes(split_max_size))
    if json_out:
        print_json(result)
        return
    if "tensors" in result:
        table = Table(title=f"{src} -> gguf {result['gguf_type']}")
        for column in ("tensor", "type", "conversion"):
            table.add_column(column)
        for row in result["tensors"]:
            table.add_row(row["name"], row["type"], row["how"] + (f" ({row['fallback']})" if "fallback" in row else ""))
        out_console.print(table)
        out_console.print(f"{result['exact']} of {result['quantized_linears']} quantized linears convert exactly")
    else:
        out_console.print(f"{src}: {', '.join(f'{k} x{v}' for k, v in result['types'].items())}; {result['note']}")
    if not dry_run:
        out_console.print(f"wrote {out}")


@convert_app.command("llama2c")
def convert_llama2c(
    src: Path = typer.Argument(..., help="llama2.c checkpoint (.bin, legacy or versioned format)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="SentencePiece tokenizer .model file."),
    out: Path = typer.Option(..., "--out", help="Output folder (Hugging Face format)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Convert a llama2.c checkpoint to a Hugging Face LlamaForCausalLM folder."""
    from infopt.workflows import convert_llama2c as run

    result = run(src, tokenizer, out, force)
    if json_out:
        print_json(result)
    else:
        p = result["params"]
        out_console.print(f"wrote {out} (dim {p['dim']}, {p['n_layers']} layers, vocab {p['vocab_size']})")


def _threads_option(made: str):
    return typer.Option(None, "--threads", help="Torch threads to compute on (default: the "
                        f"machine's, or a stored recipe's). {made}'s last bits depend on it; its recipe records it.")


def _quantize(
    model: Optional[str] = typer.Argument(None, help="Model folder or hub id (or give --recipe)."),
    method: Optional[str] = typer.Option(None, "--method", help="Quantization method (default rtn): "
                                         "see `infopt methods`."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="A single-artifact recipe (YAML), e.g. a "
                                          "checkpoint's infopt-recipe.yaml: replaces MODEL and every method option."),
    ignore: list[str] = typer.Option([], "--ignore", help="Regex of modules to leave in full precision (repeatable)."),
    override: list[str] = typer.Option([], "--override", help="REGEX=BITS[:GROUP][:sym|asym] or REGEX=skip (repeatable)."),
    include_lm_head: bool = typer.Option(False, "--include-lm-head", help="Quantize lm_head too (calibration-free methods)."),
    fmt: Optional[str] = typer.Option(None, "--format", help="Output format: compressed-tensors (integer methods' default), gptq, awq, gguf (one file), or bnb (nf4/fp4 default)."),
    gguf_type: Optional[str] = typer.Option(None, "--gguf-type", help="With --format gguf: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K_S, Q4_K_M (Q4_K), Q5_K_S, Q5_K_M (Q5_K), Q6_K, F16, BF16 or F32, as llama-quantize names them (default: from --bits and --sym/--asym). Calibrated methods write Q8_0, Q4_0 or Q4_1 with their grid stored exactly."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (a FILE.gguf for --format gguf)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder (and any unfinished run)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan; write nothing."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest safetensors shard."),
    split_max_size: Optional[str] = SPLIT_MAX_SIZE,
    calib: Optional[str] = typer.Option(None, "--calib", help="Calibration text for calibrated methods: wikitext2, tinystories, a .txt/.jsonl/.parquet file or hf:NAME[:CONFIG][:SPLIT]."),
    calib_samples: Optional[int] = typer.Option(None, "--calib-samples", help="Number of calibration windows (default 128)."),
    calib_seq_len: Optional[int] = typer.Option(None, "--calib-seq-len", help="Tokens per window (default 2048, capped at the model's context)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for choosing the calibration windows (default 0)."),
    text_field: Optional[str] = typer.Option(None, "--text-field", help="Field or column for .jsonl/.parquet/hf calibration data."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its last finished layer."),
    eval_dataset: Optional[str] = typer.Option(None, "--eval", help="Measure perplexity vs the source on this dataset and record it in the model card."),
    eval_max_windows: Optional[int] = typer.Option(None, "--eval-max-windows", help="Limit the windows --eval uses."),
    allow_pickle: bool = ALLOW_PICKLE,
    allow_non_finite: bool = typer.Option(False, "--allow-non-finite", help="Quantize weights that hold NaN/Inf "
                                          "(refused by default, naming the tensor)."),
    recover: bool = typer.Option(False, "--recover", rich_help_panel="Recovery options", help="Block-wise recovery "
                                 "after the method (rtn, gptq or awq): learn each layer's rounding offsets and group "
                                 "scales/zero points against the full-precision layer's output on the calibration "
                                 "windows (AutoRound-style signed gradient descent; needs --calib)."),
    recover_steps: Optional[int] = _recovery_option("steps"),
    recover_lr: Optional[float] = _recovery_option("lr"),
    recover_batch: Optional[int] = _recovery_option("batch"),
    recover_optimizer: Optional[str] = _recovery_option("optimizer"),
    recover_learn: Optional[str] = _recovery_option("learn"),
    threads: Optional[int] = _threads_option("A checkpoint"),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    **method_options,
) -> None:
    """Quantize a model's decoder linears and write a packed checkpoint."""
    from infopt.cli.method_options import method_config
    from infopt.formats.safetensors_io import parse_size
    from infopt.quant.registry import get_method
    from infopt.workflows import CalibrationData, EvaluationSpec, QuantizeRequest, quantize as run

    recovery_given = {"steps": recover_steps, "lr": recover_lr, "batch": recover_batch,
                      "optimizer": recover_optimizer, "learn": recover_learn}
    recovery_given = {k: v for k, v in recovery_given.items() if v is not None}
    if recovery_given and not recover:
        flags = ", ".join("--recover-" + k for k in recovery_given)
        raise InfoptError(f"{flags} set the recovery phase; add --recover (or drop them)")
    if recipe is not None:
        if recover:
            raise InfoptError("--recipe gives the model and every method option; drop --recover and its options "
                              "(a recipe artifact takes a recover: section)")
        given = {"model": model, "method": method, "ignore": ignore, "override": override,
                 "include_lm_head": include_lm_head, "fmt": fmt, "gguf_type": gguf_type,
                 "max_shard_size": max_shard_size, "split_max_size": split_max_size, "calib": calib,
                 "calib_samples": calib_samples, "calib_seq_len": calib_seq_len, "seed": seed,
                 "text_field": text_field, "eval_dataset": eval_dataset, "eval_max_windows": eval_max_windows,
                 "allow_pickle": allow_pickle, "allow_non_finite": allow_non_finite}
        req = _recipe_request(recipe, out, force, dry_run, resume, given, method_options)
        if threads is not None:
            req.threads = threads
    else:
        if model is None:
            raise InfoptError("give MODEL (a folder or hub id) or --recipe FILE")
        method = method or "rtn"
        if gguf_type is not None and fmt == "gguf" and (get_method(method).calibrated or recover):
            from infopt.formats.gguf import grid_spec, resolve_file_type

            from infopt.cli.method_options import FLAGS

            file_type = resolve_file_type(gguf_type)
            grid = grid_spec(file_type, -1, get_method(method).grids)
            method_options = {**method_options}
            for name, flag in FLAGS.items():  # the file type sets the grid unless given explicitly
                value = {"--bits": grid.bits, "--sym/--asym": grid.symmetric,
                         "--group-size": grid.group_size if file_type.startswith("Q4_K") else None}.get(flag.flag)
                if value is not None and method_options.get(name) is None:
                    method_options[name] = value
        config = method_config(method, method_options)
        calib_given = {"--calib": calib, "--calib-samples": calib_samples, "--calib-seq-len": calib_seq_len,
                       "--seed": seed, "--text-field": text_field, "--resume": resume or None}
        importance = fmt == "gguf" and not resume  # --calib gives GGUF's RTN an importance matrix
        calibrated = get_method(method).calibrated or recover
        if not calibrated and not importance and any(v is not None for v in calib_given.values()):
            given = ", ".join(k for k, v in calib_given.items() if v is not None)
            raise InfoptError(f"--method {method} needs no calibration; drop {given}")
        described = {k: v for k, v in calib_given.items() if k not in ("--calib", "--resume") and v is not None}
        if calib is None and described:
            given = ", ".join(described)
            raise InfoptError(f"{given} describe calibration text; add --calib (or drop them)")
        calibration = None
        if calib is not None:
            calibration = CalibrationData(dataset=calib, samples=128 if calib_samples is None else calib_samples,
                                          seq_len=2048 if calib_seq_len is None else calib_seq_len,
                                          seed=seed or 0, text_field=text_field or "text")
        if eval_max_windows is not None and eval_dataset is None:
            raise InfoptError("--eval-max-windows needs --eval")
        evaluation = EvaluationSpec(datasets=(eval_dataset,), max_windows=eval_max_windows) if eval_dataset else None
        recovery = None
        if recover:
            from infopt.quant.methods import build_config
            from infopt.quant.recovery import RecoveryConfig

            recovery = build_config(RecoveryConfig, recovery_given, owner="recover")
        req = QuantizeRequest(model=model, out=out, method=method, config=config, fmt=fmt, gguf_type=gguf_type,
                              recovery=recovery, ignore=list(ignore),
                              overrides=list(override), include_lm_head=include_lm_head, force=force, dry_run=dry_run,
                              max_shard_bytes=parse_size(max_shard_size), allow_pickle=allow_pickle,
                              split_max_bytes=_split_bytes(split_max_size),
                              calibration=calibration, evaluation=evaluation, resume=resume,
                              allow_non_finite=allow_non_finite, threads=threads)
    if not dry_run and out is None:
        raise InfoptError("--out is required unless --dry-run")
    with progress_bar(not json_out) as progress:
        report = run(req, progress)
    failures = (report.get("gates") or {}).get("failures")
    if json_out:
        print_json(report)
    else:
        for message in report["warnings"] + report.get("notes", []):
            warn(message)
        _print_plan(report)
        if dry_run:
            return
        _print_damp_notes(report)
        _print_recovery(report)
        out_console.print(f"wrote {report['out']} ({human_bytes(report['output_bytes'])}, {report['seconds']:.1f} s)")
        for metrics in report.get("eval", {}).values():
            _print_eval(metrics)
    if failures:
        raise QualityGateError("quality gate failed: " + "; ".join(failures))


def _recipe_request(recipe: Path, out: Optional[Path], force: bool, dry_run: bool, resume: bool, given: dict,
                    method_options: dict):
    from infopt.release.recipe import artifact_request, load_recipe

    defaults = {"model": None, "method": None, "ignore": [], "override": [], "include_lm_head": False, "fmt": None,
                "gguf_type": None,
                "max_shard_size": "5GB", "split_max_size": None, "calib": None, "calib_samples": None, "calib_seq_len": None, "seed": None,
                "text_field": None, "eval_dataset": None, "eval_max_windows": None, "allow_pickle": False,
                "allow_non_finite": False}
    from infopt.cli.method_options import FLAGS

    names = {"model": "MODEL", "fmt": "--format", "override": "--override", "eval_dataset": "--eval",
             "gguf_type": "--gguf-type"}
    clashing = [names.get(n, "--" + n.replace("_", "-")) for n, default in defaults.items() if given[n] != default]
    clashing += [FLAGS[n].flag.split("/")[0] for n, value in method_options.items() if value is not None]
    if clashing:
        raise InfoptError(f"--recipe gives the model and every method option; drop {', '.join(clashing)}")
    parsed = load_recipe(recipe)
    if len(parsed.artifacts) != 1:
        raise InfoptError(f"{recipe} declares {len(parsed.artifacts)} artifacts; quantize makes one "
                          "(use `infopt release` for several)")
    return artifact_request(parsed, parsed.artifacts[0], out, force=force, dry_run=dry_run, resume=resume)


def _qat_option(name: str):
    from infopt.quant.qat import QATConfig

    return _config_option(QATConfig, name, "Training options")


@app.command()
def qat(
    model: str = typer.Argument(..., help="The full-precision source model (folder or hub id): the distillation "
                                "teacher and the weights' starting point."),
    data: str = typer.Option(..., "--data", help="Training text: wikitext2, tinystories, a .txt/.jsonl/.parquet file "
                             "or hf:NAME[:CONFIG][:SPLIT]. Its last 10% of tokens are held out for the checks."),
    out: Path = typer.Option(..., "--out", help="Output folder."),
    start: Optional[str] = typer.Option(None, "--start", help="A quantized checkpoint of MODEL to start from (e.g. "
                                        "from `infopt quantize --method gptq --recover`); default: RTN of MODEL."),
    bits: int = typer.Option(4, "--bits", help="RTN start: bits (2, 3, 4 or 8)."),
    group_size: int = typer.Option(128, "--group-size", help="RTN start: inputs per scale (-1 per channel)."),
    symmetric: bool = typer.Option(False, "--sym/--asym", help="RTN start: symmetric or with zero points."),
    fmt: Optional[str] = typer.Option(None, "--format", help="compressed-tensors, gptq or awq (default: the start's)."),
    text_field: str = typer.Option("text", "--text-field", help="Field or column for .jsonl/.parquet/hf data."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    force: bool = typer.Option(False, "--force", help="Replace an earlier output (and any unfinished run)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its last check."),
    allow_pickle: bool = ALLOW_PICKLE,
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    train: Optional[str] = _qat_option("train"),
    loss: Optional[str] = _qat_option("loss"),
    steps: Optional[int] = _qat_option("steps"),
    lr: Optional[float] = _qat_option("lr"),
    weight_lr: Optional[float] = _qat_option("weight_lr"),
    batch: Optional[int] = _qat_option("batch"),
    seq_len: Optional[int] = _qat_option("seq_len"),
    eval_every: Optional[int] = _qat_option("eval_every"),
    eval_windows: Optional[int] = _qat_option("eval_windows"),
    patience: Optional[int] = _qat_option("patience"),
    seed: Optional[int] = _qat_option("seed"),
) -> None:
    """End-to-end quantization-aware training: fine-tune a quantized model's step sizes (or its weights too) with
    its grid in the forward pass, against the full-precision model, and write it in a packed format."""
    from infopt.finetune import QATRequest, qat as run
    from infopt.quant.methods import build_config
    from infopt.quant.qat import QATConfig
    from infopt.quant.spec import QuantSpec

    given = {"train": train, "loss": loss, "steps": steps, "lr": lr, "weight_lr": weight_lr, "batch": batch,
             "seq_len": seq_len, "eval_every": eval_every, "eval_windows": eval_windows, "patience": patience,
             "seed": seed}
    config = build_config(QATConfig, {k: v for k, v in given.items() if v is not None}, owner="qat")
    if start is not None and (bits, group_size, symmetric) != (4, 128, False):
        raise InfoptError("--bits/--group-size/--sym describe the RTN start; with --start the checkpoint's grid is used")
    if fmt is not None and fmt not in ("compressed-tensors", "gptq", "awq"):
        raise InfoptError(f"--format {fmt}: qat writes compressed-tensors, gptq or awq")
    req = QATRequest(model=model, data=data, out=out, start=start, spec=QuantSpec(bits, group_size, symmetric),
                     config=config, fmt=fmt, text_field=text_field, device=device, force=force, resume=resume,
                     allow_pickle=allow_pickle)
    with progress_bar(not json_out) as progress:
        report = run(req, progress)
    if json_out:
        print_json(report)
        return
    table = Table(title=f"qat from {report['start']}: held-out perplexity")
    for column in ("step", "held-out ppl", "loss", "tokens/s"):
        table.add_column(column, justify="right")
    for h in report["history"]:
        table.add_row(str(h["step"]), f"{h['held_out_ppl']:.4f}", f"{h.get('loss', float('nan')):.4f}",
                      str(h.get("tokens_per_s", "")))
    out_console.print(table)
    if report["stopped"]:
        warn(report["stopped"])
    out_console.print(f"wrote {report['out']} (best check: step {report['best_step']}, held-out perplexity "
                      f"{report['best_ppl']:.4f} from {report['start_ppl']:.4f}; {report['seconds']:.1f} s)")


def _register_quantize() -> None:
    from infopt.cli.method_options import with_method_options

    app.command("quantize")(with_method_options(_quantize))


_register_quantize()


def _print_damp_notes(report: dict) -> None:
    base = report["options"].get("damp")
    for module, info in report.get("layer_info", {}).items():
        if base is not None and info.get("damp", base) > base:
            warn(f"{module}: Hessian not positive definite; dampening raised to {info['damp']:g}")
        if info.get("dead_columns"):
            warn(f"{module}: {info['dead_columns']} input columns never active in calibration (quantized as zero)")


def _print_recovery(report: dict) -> None:
    if not report.get("recovery", {}).get("layers"):
        return
    table = Table(title=f"block-wise recovery: {report['recovery']['describe']}")
    for column in ("layer", "output error before", "after", "kept", "seconds"):
        table.add_column(column, justify="left" if column in ("layer", "kept") else "right")
    for e in report["recovery"]["layers"]:
        table.add_row(e["layer"], f"{e['loss_before']:.3e}", f"{e['loss_after']:.3e}", e["kept"], f"{e['seconds']:.1f}")
    out_console.print(table)


def _print_gguf(report: dict) -> None:
    """A GGUF file's tensors by type (and how each got there): llama-quantize prints the same per tensor."""
    table = Table(title=f"{report['method']} -> gguf {report['gguf_type']}  ({report['spec']})")
    for column in ("type", "tensors", "how"):
        table.add_column(column)
    groups: dict[tuple[str, str], int] = {}
    for t in report["gguf"]["tensors"]:
        key = (t["type"], t["how"] + (f"; fallback: {t['fallback']}" if "fallback" in t else ""))
        groups[key] = groups.get(key, 0) + 1
    for (kind, how), count in sorted(groups.items()):
        table.add_row(kind, str(count), how)
    out_console.print(table)


def _print_plan(report: dict) -> None:
    if "gguf" in report:
        _print_gguf(report)
        return
    recover = " + block-wise recovery" if "recovery" in report else ""
    table = Table(title=f"{report['method']}{recover} -> {report['format']}  ({report['spec']})")
    for column in ("module", "shape", "scheme"):
        table.add_column(column)
    errors = report.get("errors", {})
    if errors:
        table.add_column(report.get("error_metric", "error"), justify="right")
    for e in report["quantized"]:
        row = [e["module"], "x".join(map(str, e["shape"])), e["spec"]]
        if errors:
            row.append(f"{errors.get(e['module'], float('nan')):.2e}")
        table.add_row(*row)
    for e in report["skipped"]:
        table.add_row(e["module"], "", f"[yellow]full precision[/yellow] ({e['reason']})", *([""] if errors else []))
    out_console.print(table)
    out_console.print(f"linear weights: {human_bytes(report['source_linear_bytes'])} -> "
                      f"about {human_bytes(report['expected_linear_bytes'])}")


def _print_eval(r: dict) -> None:
    table = Table(title=f"perplexity on {r.get('dataset')} ({r['windows']} windows x {r['seq_len']} tokens)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("perplexity", f"{r['ppl']:.4f}")
    table.add_row("tokens scored", str(r["tokens"]))
    if r.get("engine") == "infopt":
        used = ", ".join(f"{n} linears on {k}" for k, n in r["quantized_linears"].items())
        table.add_row("engine", f"infopt ({used or 'dense weights'})")
    if r.get("engine") == "vllm":
        v = r["vllm"]
        table.add_row("engine", f"vLLM {v['version']} on {v['platform']} ({v['engine_args'].get('dtype')})")
    if "baseline_ppl" in r:
        table.add_row("baseline perplexity", f"{r['baseline_ppl']:.4f}")
        table.add_row("relative change", f"{r['ppl_delta_rel']:+.4%}")
        if r["kl_mean"] is not None:
            table.add_row("KL(baseline || model)", f"{r['kl_mean']:.6f}")
        else:
            table.add_row("KL(baseline || model)", "n/a (the engine returns no full distributions)")
        table.add_row("top-1 agreement", f"{r['top1_agreement']:.4%}")
    out_console.print(table)


@app.command()
def release(
    recipe: Path = typer.Argument(..., help="Recipe (YAML): source, calibration, artifacts, evaluation, gates."),
    out: Path = typer.Option(..., "--out", help="Release folder to write."),
    force: bool = typer.Option(False, "--force", help="Replace an earlier release folder (and any unfinished one)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted release, keeping finished artifacts "
                                "whose recipe entry and source are unchanged."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the recipe and print every artifact's plan; "
                                 "write nothing."),
    threads: Optional[int] = _threads_option("Each artifact"),
    json_out: bool = typer.Option(False, "--json", help="Print release.json instead of the table."),
) -> None:
    """Build every artifact of a recipe, evaluate each against the source, apply the gates, write a release folder.

    Exit 0 when every gate passes, 1 when one fails (the folder is written either way), 2 on bad input."""
    from infopt.release.pipeline import build_release, plan_release

    if dry_run:
        plans = plan_release(recipe)
        if json_out:
            print_json(plans)
            return
        table = Table(title=f"release plan of {recipe}")
        for column in ("artifact", "method", "format", "scheme", "linears", "full precision", "linear weights"):
            table.add_column(column, justify="right" if column in ("linears", "full precision") else "left")
        for plan in plans:
            table.add_row(plan["name"], plan["method"], plan["format"], plan["spec"], str(len(plan["quantized"])),
                          str(len(plan["skipped"])), f"{human_bytes(plan['source_linear_bytes'])} -> "
                          f"{human_bytes(plan['expected_linear_bytes'])}")
        out_console.print(table)
        return

    def done(row: dict) -> None:
        if not json_out:
            state = "kept (unchanged)" if row["reused"] else f"built in {row['seconds']:.1f} s"
            err_console.print(f"{row['name']}: {state}", highlight=False)

    with progress_bar(not json_out) as progress:
        result = build_release(recipe, out, force, resume, progress, done, threads)
    if json_out:
        print_json(result)
    else:
        _print_release(result, out)
    if not result["passed"]:
        raise QualityGateError("quality gate failed: " + "; ".join(result["failures"]))


def _print_release(result: dict, out: Path) -> None:
    source = result["source"]
    for dataset, base in source["eval"].items() or [(None, None)]:
        table = Table(title=f"release {out}" + (f" on {dataset}" if dataset else ""))
        for column in ("artifact", "scheme", "size", "ppl", "Δ ppl", "KL", "top-1", "gates"):
            table.add_column(column, justify="left" if column in ("artifact", "scheme", "gates") else "right",
                             no_wrap=column != "scheme")
        if base:
            table.add_row("source", "full precision", human_bytes(source["weight_bytes"]), f"{base['ppl']:.4f}",
                          "", "", "", "")
        for row in result["artifacts"]:
            m = row["eval"].get(dataset) if dataset else None
            failures = (row.get("gates") or {}).get("failures")
            verdict = "" if row.get("gates") is None else ("[red]FAIL[/red]" if failures else "[green]pass[/green]")
            scheme = row["scheme"] if row["scheme"].startswith(row["method"]) else f"{row['method']} {row['scheme']}"
            table.add_row(row["name"], scheme, human_bytes(row["weight_bytes"]),
                          *([f"{m['ppl']:.4f}", f"{m['ppl_delta_rel']:+.2%}", f"{m['kl_mean']:.4f}",
                             f"{m['top1_agreement']:.1%}"] if m else ["", "", "", ""]), verdict)
        out_console.print(table)
    gated = [row for row in result["artifacts"] if row.get("gates") is not None]
    if gated:
        verdict = ("[green]all passed[/green]" if result["passed"]
                   else f"[red]{len(result['failures'])} failed[/red]")
        out_console.print(f"gates: {verdict} ({len(gated)} artifacts gated)")
    out_console.print(f"wrote {out}/ (RELEASE.md, release.json, quality-vs-size.png)")


@app.command()
def methods(json_out: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """The quantization methods, their options and defaults (what recipes and --method accept)."""
    import dataclasses

    from infopt.quant.registry import METHODS

    from infopt.quant.recovery import RecoveryConfig

    def options(config) -> dict:
        return {f.name: {"flag": f.metadata["flag"], "default": f.default, "help": f.metadata["help"]}
                for f in dataclasses.fields(config)}

    listing = {name: {"summary": m.summary, "calibrated": m.calibrated, "weights": m.weights,
                      "default_format": m.default_format, "recoverable": m.recoverable, "options": options(m.config)}
               for name, m in METHODS.items()}
    recovery = {"summary": "block-wise recovery (--recover; a recipe artifact's recover: section) on top of "
                + ", ".join(n for n, m in METHODS.items() if m.recoverable), "options": options(RecoveryConfig)}
    if json_out:
        print_json({**listing, "recover": recovery})
        return
    listing["recover"] = {**recovery, "default_format": "the method's", "calibrated": True}
    for name, m in listing.items():
        table = Table(title=f"{name}: {m['summary']} (default format {m['default_format']}"
                            f"{', needs --calib' if m['calibrated'] else ''})", title_justify="left")
        for column in ("option (recipe)", "flag", "default", "meaning"):
            table.add_column(column)
        for key, o in m["options"].items():
            table.add_row(key, o["flag"], str(o["default"]), o["help"])
        out_console.print(table)


@app.command("eval")
def eval_(
    model: str = typer.Argument(..., help="Model folder (any format infopt reads) or hub id."),
    dataset: str = typer.Option(..., "--dataset", help="wikitext2, tinystories, a .txt/.raw/.jsonl/.parquet file, or hf:NAME[:CONFIG][:SPLIT]."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="Reference model for relative perplexity, KL and top-1."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Window length (default min(2048, model max))."),
    stride: Optional[int] = typer.Option(None, "--stride", help="Sliding-window stride (default: non-overlapping)."),
    max_windows: Optional[int] = typer.Option(None, "--max-windows", help="Evaluate at most this many windows."),
    text_field: str = typer.Option("text", "--text-field", help="Field or column for .jsonl/.parquet/hf datasets."),
    max_ppl_delta: Optional[float] = typer.Option(None, "--max-ppl-delta", help="Exit 1 when the relative perplexity increase exceeds this (needs --baseline)."),
    engine: str = typer.Option("transformers", "--engine", help="transformers (packed weights dequantized into its model), infopt (the runtime's packed kernels: what infopt run computes) or vllm (vLLM's kernels, from its prompt log-probabilities; no KL)."),
    kernels: Optional[str] = typer.Option(None, "--kernels", help="With --engine infopt: ext, ext-a8 (int8 activations) or torch."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer folder, for a GGUF file that "
                                             "carries no Hugging Face tokenizer (default: the model's own)."),
    allow_pickle: bool = ALLOW_PICKLE,
    dtype: str = DTYPE,
    trust_remote_code: bool = TRUST_REMOTE_CODE,
    tensor_parallel: Optional[int] = TENSOR_PARALLEL,
    vllm_args: list[str] = VLLM_ARGS,
    vllm_python: Optional[str] = VLLM_PYTHON,
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Perplexity of a model, optionally against a baseline model."""
    from infopt.workflows import evaluate_checkpoint

    if max_ppl_delta is not None and baseline is None:
        raise InfoptError("--max-ppl-delta needs --baseline")
    compute_dtype = parse_dtype(dtype)
    vllm_options = _vllm_options(engine, tensor_parallel, vllm_args, vllm_python)
    with progress_bar(not json_out) as progress:
        report = evaluate_checkpoint(model, dataset, baseline, seq_len, stride, max_windows, text_field,
                                     allow_pickle, progress, trust_remote_code, compute_dtype, engine, kernels,
                                     tokenizer, vllm_options)
    if json_out:
        print_json(report)
    else:
        _print_eval(report)
    if max_ppl_delta is not None and report["ppl_delta_rel"] > max_ppl_delta:
        raise QualityGateError(f"relative perplexity change {report['ppl_delta_rel']:+.4%} exceeds the limit {max_ppl_delta:+.4%}")


@app.command()
def run(
    model: str = typer.Argument(..., help="Model folder (any format infopt writes) or hub id."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Prompt text (empty: start from BOS)."),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts-file", help="Many requests: one prompt per line, or JSON lines with \"prompt\" (and \"max_new_tokens\")."),
    n: int = typer.Option(1, "--n", min=1, help="Samples per prompt; they share the prompt's KV blocks."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0),
    top_k: int = typer.Option(0, "--top-k", min=0),
    seed: int = typer.Option(0, "--seed"),
    engine: str = typer.Option("auto", "--engine", help="auto (infopt's runtime where it supports the architecture), infopt, transformers, or vllm (generation through vLLM, with --tensor-parallel-size and --vllm-arg)."),
    kv_budget_mb: float = typer.Option(512.0, "--kv-budget-mb", min=0.0, help="Memory for the paged KV cache; requests wait (or are preempted and recomputed) when it is full."),
    block_size: int = typer.Option(16, "--block-size", min=1, help="Tokens per KV block."),
    max_batch: int = typer.Option(32, "--max-batch", min=1, help="Most sequences decoded together."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto: on CUDA the runtime uses the Triton int4/int8 kernels."),
    kernels: Optional[str] = typer.Option(None, "--kernels", help="Quantized-linear backend: ext (C++ kernels, exact), ext-a8 (int4 weights times int8-rounded activations on AVX512-VNNI: faster, not exact) or torch; default ext when it builds, and ext-a8 for --draft models."),
    draft: Optional[str] = typer.Option(None, "--draft", help="Speculative decoding: a draft model (same tokenizer), self:int4 / self:int8 (the target quantized on the fly), or ngram (prompt lookup)."),
    num_draft: int = typer.Option(4, "--num-draft", min=1, help="Draft tokens per speculative round (K)."),
    adaptive_draft: bool = typer.Option(False, "--adaptive-draft", help="Grow K after fully accepted drafts, shrink it after early rejections."),
    baseline: bool = typer.Option(True, "--baseline/--no-baseline", help="With --draft: also decode without the draft and report the speedup."),
    kv_report: bool = typer.Option(False, "--kv-report", help="Print the KV page map at peak use."),
    kv_report_png: Optional[Path] = typer.Option(None, "--kv-report-png", help="Draw the KV page map at peak use into a PNG."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --kv-report-png file."),
    allow_pickle: bool = ALLOW_PICKLE,
    dtype: str = DTYPE,
    trust_remote_code: bool = TRUST_REMOTE_CODE,
    tensor_parallel: Optional[int] = TENSOR_PARALLEL,
    vllm_args: list[str] = VLLM_ARGS,
    vllm_python: Optional[str] = VLLM_PYTHON,
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object (tokens, text, timings) instead of streaming text."),
) -> None:
    """Generate text: one prompt (streamed) or a file of prompts, batched continuously over a paged KV cache."""
    from infopt.runtime.engine import SamplingParams
    from infopt.runtime.runner import Prompt, RunOptions, read_prompts, run_prompts, write_stream

    if prompt is not None and prompts_file is not None:
        raise InfoptError("give --prompt or --prompts-file, not both")
    if kv_report_png is not None and kv_report_png.exists() and not force:
        raise InfoptError(f"{kv_report_png} already exists; pass --force to replace it")
    prompts = read_prompts(prompts_file) if prompts_file is not None else [Prompt(prompt or "")]
    params = SamplingParams(max_new_tokens, temperature, top_k, top_p, seed, n)
    options = RunOptions(params, parse_dtype(dtype), engine, kv_budget_mb, block_size, max_batch, kernels,
                         allow_pickle, trust_remote_code, draft, num_draft, adaptive_draft, baseline, device,
                         _vllm_options(engine, tensor_parallel, vllm_args, vllm_python, seed))
    single = len(prompts) == 1 and n == 1
    streaming = single and not json_out
    shown = {"prompt": False}

    def stream(piece: str) -> None:  # the prompt goes out with the first text, after the model has loaded
        if not shown["prompt"]:
            sys.stdout.write(prompts[0].text)
            shown["prompt"] = True
        write_stream(piece)

    report = run_prompts(model, prompts, options, stream if streaming else None,
                         lambda notice: err_console.print(f"note: {notice}", highlight=False))
    if streaming and not shown["prompt"]:
        stream(report["text"] if report["engine"] == "vllm" else "")  # vLLM's text comes whole, at the end
    page_map = report.pop("page_map", None)
    if kv_report_png is not None and page_map is not None:
        from infopt.runtime.kv_report import write_png

        write_png(page_map, kv_report_png)
    if json_out:
        print_json(report)
        return
    if streaming:
        sys.stdout.write("\n")
    else:
        for i, request in enumerate(report["requests"]):
            for j, sample in enumerate(request["samples"]):
                out_console.rule(f"request {i}" + (f", sample {j}" if len(request["samples"]) > 1 else ""))
                sys.stdout.write(request["prompt"] + sample["text"] + "\n")
    if kv_report and page_map is not None:
        from infopt.runtime.kv_report import page_table

        out_console.print(page_table(page_map))
    _print_run_summary(report)


def _print_run_summary(report: dict) -> None:
    timings = report.get("timings")
    line = f"{report['new_tokens']} tokens in {report['seconds']:.2f} s ({report['engine']} engine"
    if timings:
        prefill, decode = timings["prefill_tokens_per_second"], timings["decode_tokens_per_second"]
        line += (f"; prefill {prefill:.1f} tok/s" if prefill else "") + (f", decode {decode:.1f} tok/s" if decode else "")
        if timings["preemptions"]:
            line += f", {timings['preemptions']} preemptions"
    err_console.print(line + ")", highlight=False)
    spec = report.get("speculative")
    if spec:
        line = (f"speculative ({spec['draft']}, K={spec['num_draft']}): acceptance {spec['acceptance_rate'] or 0:.1%}, "
                f"{spec['tokens_per_target_forward'] or 0:.2f} tokens per target forward")
        if spec.get("decode_speedup"):
            line += f", decode {spec['decode_speedup']:.2f}x plain"
            line += "" if spec["same_tokens_as_plain"] else " (sampled output differs from the plain run's)"
        err_console.print(line, highlight=False)


@app.command()
def inspect(
    model: str = typer.Argument(..., help="Model folder, config.json path, or hub id (only config.json is read)."),
    context: Optional[int] = typer.Option(None, "--context", help="Tokens per sequence for the KV-cache estimate."),
    batch: int = typer.Option(1, "--batch", min=1, help="Sequences for the KV-cache estimate."),
    gpu_memory: list[float] = typer.Option([], "--gpu-memory", min=1.0, max=4096.0,
                                           help="Plan for GPUs of this many GiB instead of the common ones (repeatable)."),
    utilization: float = typer.Option(0.9, "--utilization", min=0.1, max=1.0, help="Share of each GPU for weights "
                                      "and KV cache (vLLM's default gpu_memory_utilization, 0.9)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Parameter count, weight memory per format, KV-cache size, and which GPUs the model fits on, from config.json."""
    from infopt.eval.footprint import capacity, footprint
    from infopt.models.loading import load_config_only

    config = load_config_only(model)
    if context is not None and context < 1:
        raise InfoptError(f"--context {context}: at least 1 token")
    try:
        report = footprint(config, context, batch)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise InfoptError(f"config.json lacks what the estimate needs ({exc.__class__.__name__}: {exc})") from None
    gpus = {f"{g:g} GiB": g for g in gpu_memory} or None
    report["fits"] = capacity(report, gpus, utilization)
    report["utilization"] = utilization
    if json_out:
        print_json(report)
        return
    out_console.print(f"{report['model_type']}: {report['parameters']:,} parameters, {report['layers']} layers, "
                      f"{report['attention_heads']} heads ({report['kv_heads']} KV heads, head dim {report['head_dim']})")
    table = Table(title="weights")
    table.add_column("storage")
    table.add_column("bytes", justify="right")
    for name, size in report["weight_bytes"].items():
        table.add_row(name, human_bytes(size))
    out_console.print(table)
    kv = report["kv_cache"]
    out_console.print(f"KV cache (fp16): {human_bytes(kv['bytes_per_token'])} per token; "
                      f"{human_bytes(kv['bytes'])} for {kv['context']} tokens x batch {kv['batch']}")
    if report["quantization_config"]:
        out_console.print(f"quantization_config: {report['quantization_config']}")
    _print_fits(report)


def _short(count: int) -> str:
    for unit, size in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)


def _print_fits(report: dict) -> None:
    storages = list(report["weight_bytes"])
    table = Table(title=f"GPUs needed (weights + one {report['kv_cache']['context']}-token sequence of KV within "
                        f"{report['utilization']:.0%} of each GPU) x KV tokens that fit beside the weights")
    table.add_column("gpu")
    for storage in storages:
        table.add_column(storage, justify="right")
    by_gpu: dict[str, dict[str, dict]] = {}
    for row in report["fits"]:
        by_gpu.setdefault(row["gpu"], {})[row["storage"]] = row
    for gpu, rows in by_gpu.items():
        cells = [f"{r['gpus_needed']}x {_short(r['max_kv_tokens'])}" if r["fits"] else "[red]>8[/red]"
                 for r in (rows[s] for s in storages)]
        table.add_row(gpu, *cells)
    out_console.print(table)


@app.command()
def demo(
    out: Path = typer.Option(Path("out/demo"), "--out", help="Folder for the demo's source model and release."),
    force: bool = typer.Option(True, "--force/--no-force", help="Replace earlier demo outputs."),
) -> None:
    """Convert stories260K, build a gated 4-bit release of it (RTN, HQQ, GPTQ, AWQ, NF4) and sample the best one."""
    from infopt.demo import run_demo

    def done(row: dict) -> None:
        err_console.print(f"{row['name']}: built in {row['seconds']:.1f} s", highlight=False)

    with progress_bar() as progress:
        result = run_demo(out, force, progress, done, lambda release: _print_release(release, out / "release"))
    if not result["release"]["passed"]:
        raise QualityGateError("quality gate failed: " + "; ".join(result["release"]["failures"]))


def _quiet_optional_peers() -> None:
    """transformers imports torchao when it is installed; its missing-CUDA-kernel notices are noise here."""
    import logging

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


MAX_ERROR_CHARS = 500


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def _error(text: str, code: int) -> None:
    from rich.markup import escape

    err_console.print(f"[red]error:[/red] {escape(_one_line(text))}", highlight=False, soft_wrap=True)
    sys.exit(code)


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C, so every temporary folder is removed on the way out


def main() -> None:
    import signal

    from infopt.paths import kept_for_resume

    debug = os.environ.get("INFOPT_DEBUG")
    _quiet_optional_peers()
    signal.signal(signal.SIGTERM, _terminate)
    def aborted() -> None:
        kept = kept_for_resume()
        note = f"; finished work kept in {kept[0]} (--resume continues it, --force starts over)" if kept else ""
        err_console.print(f"aborted{note}", highlight=False, soft_wrap=True)
        sys.exit(130)

    try:
        code = app(standalone_mode=False)
    except InfoptError as exc:
        _error(str(exc), exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        aborted()
    except OSError as exc:  # the disk is full or read-only, a folder cannot be written, ...
        where = f": {exc.filename}" if exc.filename else ""
        _error(f"{exc.strerror or exc.__class__.__name__}{where}", 2)
    except MemoryError:
        _error("out of memory (the model or the batch does not fit; try fewer windows or a smaller --seq-len)", 2)
    except Exception as exc:  # click usage errors and anything unforeseen
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):  # click's usage errors (typer may vendor click)
            if type(exc).__name__ != "NoArgsIsHelpError":  # help was already printed
                exc.show()
            sys.exit(exc.exit_code)
        if debug:
            raise
        from rich.markup import escape

        err_console.print(f"[red]internal error:[/red] {escape(_one_line(f'{exc.__class__.__name__}: {exc}'))} "
                          "(set INFOPT_DEBUG=1 for a traceback)", highlight=False, soft_wrap=True)
        sys.exit(3)
    if code == 130:  # typer turns a KeyboardInterrupt in a command into Exit(130), which click returns
        aborted()
    if isinstance(code, int) and code:
        sys.exit(code)


def console() -> None:
    """The console script: main(), then a process exit that skips the interpreter's teardown once the exit
    handlers have run and the output is flushed. With torch loaded that teardown costs ~0.3 s (measured
    2026-12-02: 0.32 s after `import torch`), every command; nothing of it writes a file."""
    import atexit
    import threading

    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    if sys.getprofile() or sys.gettrace() or any(
            t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)  # a profiler or tracer writing on exit, or a thread the interpreter waits for: the usual exit
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            pass
    os._exit(code)


if __name__ == "__main__":
    console()
