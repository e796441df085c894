"""The `infopt qat` job: data, the training loop's bookkeeping (held-out checks, checkpoints, resume, early stop)
and the export of the trained grid. The algorithm itself is infopt.quant.qat.

Training windows are drawn at random from the first 90% of the text's tokens (each step's windows from a
generator seeded by the seed and the step, so a resumed run draws the same ones); the held-out perplexity is
measured on consecutive windows of the last 10%, which training never sees. A check every `eval_every` steps
writes a checkpoint (trainable tensors, AdamW's moments, the best tensors so far, as safetensors plus a JSON
state) into the work folder beside the output; `resume` continues from it with the same bytes as an
uninterrupted run on the same thread count. The result is the best check's parameters.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from infopt.calibration.sources import load_text
from infopt.calibration.windows import tokenize
from infopt.device import fast_bf16, resolve_device
from infopt.errors import InfoptError
from infopt.eval.perplexity import evaluate
from infopt.formats import artifact
from infopt.formats.registry import read_quantized
from infopt.formats.safetensors_io import iter_tensors
from infopt.formats.writers import output_format
from infopt.models.adapters import adapter_for
from infopt.models.loading import ModelDir, load_causal_lm, load_tokenizer, open_model, text_config
from infopt.paths import atomic_output_dir, check_output_target, inputs_overlap, keep_for_resume, release_for_resume
from infopt.quant.methods import config_values
from infopt.quant.qat import QATConfig, QATLinear, attach, loss_of
from infopt.quant.rtn import quantize_rtn
from infopt.quant.spec import QuantSpec
from infopt.quant.weights import MethodRecord, QuantizedWeight

STATE, TENSORS = "qat-state.json", "qat-state.safetensors"
HELD_OUT = 0.1  # the text's last tenth is held out


@dataclass(kw_only=True)
class QATRequest:
    model: str  # the full-precision source (the distillation teacher)
    data: str  # training text: wikitext2, tinystories, a .txt/.jsonl/.parquet file or hf:NAME
    out: Path
    start: str | None = None  # a quantized checkpoint to start from; None: RTN of the source at `spec`
    spec: QuantSpec = field(default_factory=lambda: QuantSpec(4, 128, False))
    config: QATConfig = field(default_factory=QATConfig)
    fmt: str | None = None  # None: the starting checkpoint's format (compressed-tensors for an RTN start)
    text_field: str = "text"
    device: str = "auto"
    force: bool = False
    resume: bool = False
    allow_pickle: bool = False


def _start_weights(req: QATRequest, source: ModelDir, fmt) -> tuple[dict[str, QuantizedWeight], str]:
    if req.start is None:
        from infopt.workflows import make_request, plan_quantization

        plan = plan_quantization(make_request(model=req.model, method="rtn", spec=req.spec, fmt=fmt.name), source)
        state = {}
        wanted = {e.module: e.spec for e in plan.quantized}
        for name, tensor in iter_tensors(source.files):
            module = name.removesuffix(".weight")
            if name.endswith(".weight") and module in wanted:
                state[module] = quantize_rtn(tensor, wanted[module], fmt.storage)
        return state, f"RTN {req.spec.describe()} of the source"
    start = open_model(req.start, req.allow_pickle)
    if not start.quant_method:
        raise InfoptError(f"--start {req.start}: not a quantized checkpoint (give one infopt reads, or drop --start "
                          "to start from RTN)")
    for key in ("hidden_size", "num_hidden_layers", "vocab_size", "model_type"):
        if text_config(start.config).get(key) != text_config(source.config).get(key):
            raise InfoptError(f"--start {req.start} is not a quantization of {req.model} ({key} differs)")
    quantized, _ = read_quantized(start.files, start.config)  # keyed by tensor name (module + ".weight")
    blocks = sorted(name for name, w in quantized.items() if not isinstance(w, QuantizedWeight))
    if blocks:  # GGUF's Q4_1 / Q5_x / K-quant blocks: float offsets and 6-bit sub-scales, not integer groups
        more = f" (and {len(blocks) - 1} more)" if len(blocks) > 1 else ""
        raise InfoptError(f"--start {req.start}: {blocks[0]}{more} is on a GGUF block grid (Q4_1, Q5_x or a "
                          "K-quant), which QAT does not train; start from integer groups (compressed-tensors, GPTQ, "
                          "AWQ, or GGUF Q4_0 / Q8_0)")
    return ({name.removesuffix(".weight"): w for name, w in quantized.items()},
            f"{start.quant_method} checkpoint {start.path.name}")


def _fingerprint(req: QATRequest, source: ModelDir, start_note: str) -> str:
    settings = {"model": str(source.path.resolve()), "files": [(p.name, p.stat().st_size) for p in source.files],
                "start": start_note, "start_path": str(Path(req.start).resolve()) if req.start else None,
                "spec": req.spec.describe(), "config": config_values(req.config), "data": req.data,
                "fmt": req.fmt, "text_field": req.text_field}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def _tensors(modules: dict[str, QATLinear]) -> dict[str, torch.Tensor]:
    out = {}
    for name, module in modules.items():
        out[f"{name}.factor"] = module.factor
        if module.weight is not None:
            out[f"{name}.weight"] = module.weight
    return out


def _optimized(modules: dict[str, QATLinear], optimizer) -> list[tuple[str, torch.Tensor]]:
    """(name, parameter) in the optimizer's order."""
    names = {id(t): name for name, t in _tensors(modules).items()}
    return [(names[id(p)], p) for group in optimizer.param_groups for p in group["params"]]


def _save(work: Path, state: dict, modules: dict[str, QATLinear], optimizer, best: dict[str, torch.Tensor]) -> None:
    tensors = {f"param::{k}": v.detach() for k, v in _tensors(modules).items()}
    tensors.update({f"best::{k}": v for k, v in best.items()})
    for name, param in _optimized(modules, optimizer):
        moments = optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in moments:
                tensors[f"adam::{name}::{key}"] = moments[key]
        if "step" in moments:
            state.setdefault("adam_steps", {})[name] = float(moments["step"])
    tmp = work / (TENSORS + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in sorted(tensors.items())}, str(tmp))
    tmp.rename(work / TENSORS)
    tmp = work / (STATE + ".tmp")
    tmp.write_text(json.dumps(state, sort_keys=True) + "\n")
    tmp.rename(work / STATE)


def _load(work: Path, fingerprint: str, modules: dict[str, QATLinear], optimizer) -> tuple[dict, dict]:
    try:
        state = json.loads((work / STATE).read_text())
        tensors = load_file(str(work / TENSORS))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InfoptError(f"{work}: the checkpoint cannot be read ({exc.__class__.__name__}); rerun with --force "
                          "to start over") from None
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
        raise InfoptError(f"{work} holds a run with other inputs or settings; rerun without --resume and with "
                          "--force to start over")
    own = _tensors(modules)
    for name, param in own.items():
        saved = tensors.get(f"param::{name}")
        if saved is None or saved.shape != param.shape:
            raise InfoptError(f"{work}: the checkpoint does not hold {name}; rerun with --force")
        param.data.copy_(saved)
    for name, param in _optimized(modules, optimizer):
        key = f"adam::{name}::exp_avg"
        if key in tensors:
            optimizer.state[param] = {"step": torch.tensor(state["adam_steps"][name]),
                                      "exp_avg": tensors[key].to(param.device),
                                      "exp_avg_sq": tensors[f"adam::{name}::exp_avg_sq"].to(param.device)}
    best = {k.removeprefix("best::"): v for k, v in tensors.items() if k.startswith("best::")}
    if state.get("threads") and state["threads"] != torch.get_num_threads():
        torch.set_num_threads(int(state["threads"]))
    return state, best


def _windows(ids: torch.Tensor, count: int, seq_len: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (count,), generator=generator)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def qat(req: QATRequest, progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Train the quantization end to end and write the result; returns the report."""
    from infopt.workflows import _source_dtype, _source_tensors, _write_weights_and_config, work_dir_for

    start_time = time.perf_counter()
    config = req.config
    check_output_target(req.out, req.force)
    source = open_model(req.model, req.allow_pickle)
    if source.quant_method:
        raise InfoptError(f"{source.path} is already quantized; MODEL is the full-precision source (pass the "
                          "quantized checkpoint as --start)")
    inputs = [source.path] + ([Path(req.start)] if req.start else [])
    if inputs_overlap(req.out, inputs):
        raise InfoptError(f"--out {req.out} overlaps an input; write somewhere else")
    start_format = None
    if req.start is not None:
        start_format = open_model(req.start, req.allow_pickle).quant_method
    from infopt.quant.registry import get_method

    fmt = output_format(req.fmt or (start_format if start_format in ("gptq", "awq") else "compressed-tensors"),
                        get_method("rtn"))
    if fmt.single_file:
        raise InfoptError("--format gguf: `infopt qat` writes folders; convert the result with `infopt convert gguf`")
    device = torch.device(resolve_device(req.device))
    start, start_note = _start_weights(req, source, fmt)
    if not start:
        raise InfoptError("nothing to train: the starting point quantizes no linear")
    for name, weight in start.items():  # refused now, not after the training
        reason = fmt.packable(weight.shape, weight.spec)
        if reason is not None:
            raise InfoptError(f"--format {fmt.name} cannot store {name} ({weight.spec.describe()}): {reason}")
    if fmt.uniform_spec and len({w.spec for w in start.values()}) > 1:
        raise InfoptError(f"--format {fmt.name} stores one scheme for the whole model; the start mixes several")
    if any(w.g_idx is not None for w in start.values()) and fmt.name != "gptq":
        raise InfoptError(f"the start holds act-order group indices (g_idx); --format {fmt.name} cannot store them")
    max_len = text_config(source.config).get("max_position_embeddings") or config.seq_len
    seq_len = min(config.seq_len, int(max_len))
    ids = tokenize(load_tokenizer(source.path), load_text(req.data, req.text_field))
    cut = int(ids.numel() * (1 - HELD_OUT))
    train_ids, held_out = ids[:cut], ids[cut:]
    if train_ids.numel() <= seq_len or held_out.numel() <= seq_len:
        raise InfoptError(f"{req.data}: {ids.numel()} tokens are too few for windows of {seq_len} (training takes "
                          f"the first {1 - HELD_OUT:.0%}, the held-out check the rest)")

    teacher = load_causal_lm(source).to(device).eval() if config.loss == "kl" else None
    student = load_causal_lm(source).to(device).eval()
    modules = attach(student, start, config.train == "all")
    factors = [m.factor for m in modules.values()]
    weights = [m.weight for m in modules.values() if m.weight is not None]
    groups = [{"params": factors, "lr": config.lr, "base_lr": config.lr}]
    if weights:
        groups.append({"params": weights, "lr": config.weight_lr, "base_lr": config.weight_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    autocast = torch.bfloat16 if fast_bf16(str(device)) else None

    work = work_dir_for(req.out)
    fingerprint = _fingerprint(req, source, start_note)
    if work.exists() and not req.resume:
        if not req.force:
            raise InfoptError(f"an unfinished run exists in {work}; pass --resume to continue it or --force to start "
                              "over")
        shutil.rmtree(work)
    eval_windows = min(config.eval_windows, held_out.numel() // seq_len)

    def held_out_ppl() -> float:
        return evaluate(student, held_out, seq_len, max_windows=eval_windows)["ppl"]

    if req.resume and (work / STATE).is_file():
        state, best = _load(work, fingerprint, modules, optimizer)
    else:
        work.mkdir(parents=True, exist_ok=True)
        start_ppl = held_out_ppl()
        state = {"fingerprint": fingerprint, "threads": torch.get_num_threads(), "step": 0, "best_ppl": start_ppl,
                 "best_step": 0, "checks_without_gain": 0, "history": [{"step": 0, "held_out_ppl": start_ppl}]}
        best = {k: v.detach().clone() for k, v in _tensors(modules).items()}
        _save(work, state, modules, optimizer, best)
    keep_for_resume(work)
    seen = 0
    tick = time.perf_counter()
    step = state["step"]
    stopped = state.get("stopped")
    while step < config.steps and not stopped:
        batch = _windows(train_ids, config.batch, seq_len, config.seed * 1_000_003 + step).to(device)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * (1 - step / config.steps)
        context = torch.autocast(device.type, dtype=autocast) if autocast else torch.autocast(device.type,
                                                                                               enabled=False)
        with context:
            teacher_logits = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(batch).logits
            loss = loss_of(student(batch).logits, batch, teacher_logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for module in modules.values():
            module.clamp_()
        step += 1
        seen += batch.numel()
        if progress:
            progress("qat steps", step, config.steps)
        if step % config.eval_every == 0 or step == config.steps:
            ppl = held_out_ppl()
            rate = seen / (time.perf_counter() - tick)
            seen, tick = 0, time.perf_counter()
            state["history"].append({"step": step, "held_out_ppl": ppl, "loss": loss.item(),
                                     "tokens_per_s": round(rate, 1)})
            if ppl < state["best_ppl"]:
                state.update(best_ppl=ppl, best_step=step, checks_without_gain=0)
                best = {k: v.detach().clone() for k, v in _tensors(modules).items()}
            else:
                state["checks_without_gain"] += 1
                if config.patience and state["checks_without_gain"] >= config.patience:
                    stopped = f"early stop at step {step}: no better held-out perplexity in {config.patience} checks"
                    state["stopped"] = stopped
            state["step"] = step
            _save(work, state, modules, optimizer, best)
            if progress:
                progress(f"step {step}: loss {loss.item():.4f}, held-out ppl {ppl:.4f} (best {state['best_ppl']:.4f}"
                         f" at {state['best_step']}), {rate:.0f} tok/s", 1, 1)

    own = _tensors(modules)
    with torch.no_grad():
        for name, tensor in best.items():
            own[name].copy_(tensor)
    result = {name: module.export() for name, module in modules.items()}

    def items():
        for name, tensor in _source_tensors(source):
            module = name.removesuffix(".weight")
            yield name, result[module] if name.endswith(".weight") and module in result else tensor

    adapter = adapter_for(text_config(source.config))
    record = MethodRecord(method="qat", compute_dtype=_source_dtype(source))
    history = state["history"]
    with atomic_output_dir(req.out, req.force) as tmp:
        files, _, _ = _write_weights_and_config(tmp, source, fmt, items(), [], record, adapter, 5 * 10**9)
        artifact.write_model_card(tmp, {
            "name": req.out.name, "source": source.path.name,
            "settings": {"method": f"end-to-end QAT ({config.describe()})", "start": start_note,
                         "format": fmt.name, "data": f"{req.data}: first {1 - HELD_OUT:.0%} of its tokens trained "
                         f"on, the rest held out", "seed": str(config.seed),
                         "threads": f"{state['threads']} (the same inputs, seed and thread count give the same bytes)",
                         "result": f"the best check: step {state['best_step']}, held-out perplexity "
                                   f"{state['best_ppl']:.4f} (start {history[0]['held_out_ppl']:.4f})"
                         + (f"; {state['stopped']}" if state.get("stopped") else "")},
            "metrics": [{"dataset": f"held-out {req.data} ({eval_windows} windows x {seq_len} tokens)",
                         **{f"step {h['step']}": f"{h['held_out_ppl']:.4f}" for h in history}}],
        })
        artifact.write_manifest(tmp)
    release_for_resume(work)
    shutil.rmtree(work, ignore_errors=True)
    return {"out": str(req.out), "files": files, "start": start_note, "format": fmt.name,
            "options": config_values(config), "seq_len": seq_len, "history": history, "best_step": state["best_step"],
            "best_ppl": state["best_ppl"], "start_ppl": history[0]["held_out_ppl"], "stopped": state.get("stopped"),
            "quantized_linears": len(result), "seconds": time.perf_counter() - start_time,
            "threads": state["threads"]}
