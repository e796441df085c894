"""`infopt run`: load a checkpoint into the runtime, run one prompt or a file of them, report tokens and timings."""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from infopt.device import resolve_device
from infopt.errors import InfoptError
from infopt.models.loading import ModelDir, load_tokenizer, open_model, text_config
from infopt.runtime import kernels
from infopt.runtime.engine import Engine, SamplingParams, Sequence
from infopt.runtime.kv_cache import DEFAULT_BLOCK_SIZE, KVCache
from infopt.runtime.kv_report import summary
from infopt.runtime.model import EngineModel, load_engine_model, unsupported_reason

if TYPE_CHECKING:
    from infopt.runtime.vllm_engine import VLLMOptions

ENGINES = ("auto", "infopt", "transformers", "vllm")
DEFAULT_KV_BUDGET_MB = 512.0


@dataclass
class RunOptions:
    params: SamplingParams = field(default_factory=SamplingParams)
    dtype: torch.dtype = torch.float32
    engine: str = "auto"
    kv_budget_mb: float = DEFAULT_KV_BUDGET_MB
    block_size: int = DEFAULT_BLOCK_SIZE
    max_batch: int = 32
    backend: str | None = None  # quantized-linear backend: "ext", "ext-a8", "torch", None (ext when it builds)
    allow_pickle: bool = False
    trust_remote_code: bool = False
    draft: str | None = None  # a model folder / hub id, "self:int4", "self:int8" or "ngram"
    num_draft: int = 4
    adaptive_draft: bool = False
    baseline: bool = True  # with a draft: also decode without it, for the speedup
    device: str = "cpu"  # "auto", "cpu" or "cuda" (quantized linears through the Triton kernels there)
    vllm: "VLLMOptions | None" = None  # engine "vllm": how vLLM starts (infopt.runtime.vllm_engine)


@dataclass
class Prompt:
    text: str
    max_new_tokens: int | None = None


def read_prompts(path: Path) -> list[Prompt]:
    """One prompt per line, or JSON lines with "prompt" (and optionally "max_new_tokens")."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InfoptError(f"cannot read prompts from {path}: {exc.__class__.__name__}") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl" or line.lstrip().startswith("{"):
            try:
                item = json.loads(line)
                prompts.append(Prompt(str(item["prompt"]), item.get("max_new_tokens")))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise InfoptError(f"{path}:{number}: expected a JSON object with a \"prompt\" field") from None
        else:
            prompts.append(Prompt(line))
    if not prompts:
        raise InfoptError(f"{path} holds no prompts")
    return prompts


def make_cache(model: EngineModel, options: RunOptions) -> KVCache:
    s = model.shape
    block = KVCache.block_bytes(s.num_layers, s.num_kv_heads, s.head_dim, model.dtype, options.block_size)
    blocks = int(options.kv_budget_mb * 1e6 // block)
    if blocks < 1:
        raise InfoptError(f"--kv-budget-mb {options.kv_budget_mb} is below one KV block ({block / 1e6:.3f} MB)")
    return KVCache.for_model(model, blocks, options.block_size)


def make_engine(model: EngineModel, cache: KVCache, options: RunOptions, eos_ids: set[int], drafter=None) -> Engine:
    if drafter is None:
        return Engine(model, cache, eos_ids, options.max_batch)
    from infopt.runtime.speculative import SpeculativeEngine

    return SpeculativeEngine(model, cache, drafter, options.num_draft, options.adaptive_draft, eos_ids=eos_ids,
                             max_batch=options.max_batch)


def draft_backend(backend: str | None) -> str | None:
    """The draft's quantized-linear backend: by default int8 activations where the CPU has VNNI (a draft's numbers
    only change how many of its tokens the target keeps, never the output); an explicit --kernels is kept."""
    return "ext-a8" if backend is None and kernels.has_vnni() else backend


def make_drafter(model_dir: ModelDir, tokenizer, options: RunOptions, target: EngineModel, target_cache: KVCache):
    """The drafter --draft names; a draft model must share the target's tokenizer."""
    from infopt.runtime.speculative import ModelDrafter, NgramDrafter, draft_cache_for, self_draft

    name = options.draft
    if name == "ngram":
        return NgramDrafter()
    if name.startswith("self:"):
        draft = self_draft(model_dir, name.removeprefix("self:"), options.dtype, draft_backend(options.backend),
                           target.device.type)
    else:
        draft_dir = open_model(name, options.allow_pickle)
        reason = unsupported_reason(draft_dir.config)
        if reason:
            raise InfoptError(f"the draft model cannot run in the infopt runtime: {reason}")
        if load_tokenizer(draft_dir.path, options.trust_remote_code).get_vocab() != tokenizer.get_vocab():
            raise InfoptError(f"the draft {name} and the target use different tokenizers; speculative decoding "
                              "needs the same vocabulary")
        draft = load_engine_model(draft_dir, options.dtype, draft_backend(options.backend), target.device.type)
    if draft.shape.vocab_size != target.shape.vocab_size:
        raise InfoptError(f"the draft's vocabulary ({draft.shape.vocab_size}) differs from the target's "
                          f"({target.shape.vocab_size})")
    cache = draft_cache_for(draft, target_cache, options.max_batch, options.num_draft)
    return ModelDrafter(draft, cache, name)


def eos_ids_of(tokenizer, config: dict) -> set[int]:
    ids = text_config(config).get("eos_token_id")
    ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _encode(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=True).input_ids
    if not ids:
        raise InfoptError("the prompt is empty and the tokenizer adds no BOS token: give a --prompt")
    return ids


class TextStream:
    """Decodes one sequence's tokens incrementally and hands out only complete new text."""

    def __init__(self, tokenizer, on_text: Callable[[str], None], prompt_ids: list[int]) -> None:
        self.tokenizer, self.on_text = tokenizer, on_text
        self.tokens = list(prompt_ids)  # decoded with the prompt, so word-initial spaces survive
        self.emitted = tokenizer.decode(self.tokens, skip_special_tokens=True)

    def push(self, token: int) -> None:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.startswith(self.emitted) and not text.endswith("\ufffd"):
            self.on_text(text[len(self.emitted):])
            self.emitted = text

    def flush(self) -> None:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.startswith(self.emitted) and len(text) > len(self.emitted):
            self.on_text(text[len(self.emitted):])


def continuation(tokenizer, prompt_ids: list[int], generated: list[int]) -> str:
    """The text the generated tokens add to the prompt (decoded together, so a leading space is kept)."""
    prompt = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    full = tokenizer.decode(list(prompt_ids) + list(generated), skip_special_tokens=True)
    return full[len(prompt):] if full.startswith(prompt) else tokenizer.decode(generated, skip_special_tokens=True)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def choose_engine(model_dir: ModelDir, engine: str) -> tuple[str, str | None]:
    """("infopt" | "transformers", notice): auto falls back to transformers with a notice."""
    if engine not in ENGINES:
        raise InfoptError(f"invalid engine {engine!r}: choose one of {', '.join(ENGINES)}")
    reason = unsupported_reason(model_dir.config)
    if model_dir.config.get("auto_map") or model_dir.pickle:
        reason = reason or "custom-code or pickle checkpoints"
    if engine == "infopt" and reason:
        raise InfoptError(f"the infopt runtime does not support {reason}")
    if engine == "transformers" or reason:
        return "transformers", (f"the infopt runtime does not support {reason}; running it through transformers"
                                if reason and engine == "auto" else None)
    return "infopt", None


def run_prompts(model: str, prompts: list[Prompt], options: RunOptions,
                on_text: Callable[[str], None] | None = None,
                on_notice: Callable[[str], None] | None = None) -> dict:
    """Generate for every prompt (n samples each); `on_text` streams when there is exactly one sequence."""
    model_dir = open_model(model, options.allow_pickle)
    if options.engine == "vllm":
        return _run_vllm(model_dir, prompts, options)
    engine_name, notice = choose_engine(model_dir, options.engine)
    if notice and on_notice:
        on_notice(notice)
    tokenizer = load_tokenizer(model_dir.path, options.trust_remote_code)
    if engine_name == "transformers" and options.draft:
        raise InfoptError("speculative decoding (--draft) needs the infopt runtime, which does not run this model")
    if engine_name == "transformers":
        return _run_transformers(model_dir, tokenizer, prompts, options, on_text)
    load_start = time.perf_counter()
    lm = load_engine_model(model_dir, options.dtype, options.backend, resolve_device(options.device))
    load_seconds = time.perf_counter() - load_start
    cache = make_cache(lm, options)
    drafter = make_drafter(model_dir, tokenizer, options, lm, cache) if options.draft else None
    eos = eos_ids_of(tokenizer, model_dir.config)
    single = len(prompts) == 1 and options.params.n == 1
    requests = [(_encode(tokenizer, p.text), _params_for(p, options.params)) for p in prompts]
    stream = TextStream(tokenizer, on_text, requests[0][0]) if single and on_text else None
    engine, finished, seconds = _generate(make_engine(lm, cache, options, eos, drafter), requests, stream)
    report = _report(model_dir, tokenizer, prompts, finished, engine, seconds, load_seconds)
    if drafter is not None:
        report["speculative"] = {"draft": options.draft, "num_draft": options.num_draft,
                                 "adaptive": options.adaptive_draft, **engine.spec.as_dict()}
        if hasattr(drafter, "model"):
            report["speculative"]["draft_quantized_linears"] = linear_backends(drafter.model)
        if options.baseline:
            # every block is free again once all requests finished: the plain run reuses the same memory
            plain, plain_finished, plain_seconds = _generate(make_engine(lm, cache, options, eos), requests, None)
            report["speculative"].update(_speedup(engine, plain, finished, plain_finished, seconds, plain_seconds))
    return report


def linear_backends(model) -> dict[str, int]:
    """How many quantized linears (fused ones counted once) each backend computes: "ext", "ext-a8", "torch", ..."""
    from collections import Counter

    from infopt.runtime.qlinear import QuantLinear

    return dict(sorted(Counter(m.backend for m in model.modules() if isinstance(m, QuantLinear)).items()))


def _params_for(prompt: Prompt, params: SamplingParams) -> SamplingParams:
    if prompt.max_new_tokens is None:
        return params
    return SamplingParams(**{**params.__dict__, "max_new_tokens": int(prompt.max_new_tokens)})


def _generate(engine: Engine, requests: list[tuple[list[int], SamplingParams]],
              stream: TextStream | None) -> tuple[Engine, list[Sequence], float]:
    for ids, params in requests:
        try:
            engine.submit(ids, params)
        except ValueError as exc:
            raise InfoptError(str(exc)) from None
    start = time.perf_counter()
    finished = engine.run(on_token=(lambda seq, token: stream.push(token)) if stream else None)
    seconds = time.perf_counter() - start
    if stream:
        stream.flush()
    return engine, finished, seconds


def _speedup(spec: Engine, plain: Engine, finished: list[Sequence], plain_finished: list[Sequence],
             seconds: float, plain_seconds: float) -> dict:
    def decode_rate(engine: Engine) -> float | None:
        return engine.timings.as_dict()["decode_tokens_per_second"]

    spec_rate, plain_rate = decode_rate(spec), decode_rate(plain)
    return {"plain_seconds": plain_seconds, "plain_decode_tokens_per_second": plain_rate,
            "decode_speedup": spec_rate / plain_rate if spec_rate and plain_rate else None,
            "end_to_end_speedup": plain_seconds / seconds if seconds > 0 else None,
            "same_tokens_as_plain": [s.tokens for s in finished] == [s.tokens for s in plain_finished]}


def _report(model_dir: ModelDir, tokenizer, prompts: list[Prompt], finished: list[Sequence], engine: Engine,
            seconds: float, load_seconds: float) -> dict:
    requests = []
    for index, prompt in enumerate(prompts):
        samples = [s for s in finished if s.request_id == index]
        requests.append({"prompt": prompt.text, "prompt_tokens": samples[0].prompt_len, "samples": [
            {"text": continuation(tokenizer, s.tokens[:s.prompt_len], s.generated), "tokens": s.generated,
             "finish_reason": s.finish_reason, "preemptions": s.preemptions} for s in samples]})
    new_tokens = sum(len(s.generated) for s in finished)
    cache = engine.cache
    peak = engine.peak_map
    report = {
        "engine": "infopt", "model": str(model_dir.path), "dtype": str(engine.model.dtype).removeprefix("torch."),
        "requests": requests, "new_tokens": new_tokens, "seconds": seconds, "load_seconds": load_seconds,
        "tokens_per_second": new_tokens / seconds if seconds > 0 else None,
        "timings": engine.timings.as_dict(),
        "weight_bytes": engine.model.weight_bytes,
        "peak_rss_bytes": peak_rss_bytes(),
        "kv_cache": {"bytes": cache.nbytes, "block_size": cache.block_size,
                     "at_peak": summary(peak) if peak else None},
        "page_map": peak,
        "notes": sorted({m.note for m in engine.model.modules() if getattr(m, "note", "")}),
        "quantized_linears": linear_backends(engine.model),
    }
    if len(requests) == 1 and len(requests[0]["samples"]) == 1:  # the single-prompt shape earlier versions gave
        sample = requests[0]["samples"][0]
        report.update(prompt=prompts[0].text, text=sample["text"], tokens=sample["tokens"])
    return report


def _run_transformers(model_dir: ModelDir, tokenizer, prompts: list[Prompt], options: RunOptions,
                      on_text: Callable[[str], None] | None) -> dict:
    """The fallback: transformers' model with its own cache, one sequence at a time."""
    from infopt.models.loading import load_causal_lm
    from infopt.runtime.generate import generate

    lm = load_causal_lm(model_dir, options.dtype, trust_remote_code=options.trust_remote_code)
    p = options.params
    max_length = text_config(model_dir.config).get("max_position_embeddings")
    single = len(prompts) == 1 and p.n == 1
    requests, new_tokens, start = [], 0, time.perf_counter()
    for prompt in prompts:
        ids = _encode(tokenizer, prompt.text)
        samples = []
        for index in range(p.n):
            stream = TextStream(tokenizer, on_text, ids) if single and on_text else None
            out = generate(lm, ids, prompt.max_new_tokens or p.max_new_tokens, p.temperature, p.top_k, p.top_p,
                           p.seed + 1_000_003 * index, sorted(eos_ids_of(tokenizer, model_dir.config)), max_length,
                           stream.push if stream else None)
            if stream:
                stream.flush()
            samples.append({"text": continuation(tokenizer, ids, out), "tokens": out,
                            "finish_reason": None, "preemptions": 0})
            new_tokens += len(out)
        requests.append({"prompt": prompt.text, "prompt_tokens": len(ids), "samples": samples})
    seconds = time.perf_counter() - start
    report = {"engine": "transformers", "model": str(model_dir.path), "requests": requests, "new_tokens": new_tokens,
              "seconds": seconds, "tokens_per_second": new_tokens / seconds if seconds > 0 else None,
              "peak_rss_bytes": peak_rss_bytes()}
    if single:
        report.update(prompt=prompts[0].text, text=requests[0]["samples"][0]["text"],
                      tokens=requests[0]["samples"][0]["tokens"])
    return report


def _run_vllm(model_dir: ModelDir, prompts: list[Prompt], options: RunOptions) -> dict:
    """The prompts through vLLM, tokenized and decoded by infopt as its own engine does (same ids, same text)."""
    from infopt.runtime import vllm_engine as vllm

    if options.draft:
        raise InfoptError("--draft is infopt's speculative decoding; vLLM takes its own "
                          "(--vllm-arg speculative_config={...})")
    tokenizer = load_tokenizer(model_dir.path, options.trust_remote_code)
    p = options.params
    ids = [_encode(tokenizer, prompt.text) for prompt in prompts]
    limits = [int(prompt.max_new_tokens or p.max_new_tokens) for prompt in prompts]
    tasks = vllm.generate_task(ids, limits, p)
    vllm_options = options.vllm or vllm.VLLMOptions(seed=p.seed)
    result = vllm.run_job([{"model": str(model_dir.path), "tasks": tasks}], vllm_options)  # "index" is ours
    outcome = vllm.checked(result["models"][0], str(model_dir.path), len(tasks))
    samples, seconds = vllm.generated(outcome["tasks"], tasks, len(prompts), p.n)
    requests = [{"prompt": prompt.text, "prompt_tokens": len(prompt_ids), "samples": [
                    {"text": continuation(tokenizer, prompt_ids, tokens), "tokens": tokens, "finish_reason": None,
                     "preemptions": 0} for tokens in choices]}
                for prompt, prompt_ids, choices in zip(prompts, ids, samples)]
    new_tokens = sum(len(t) for choices in samples for t in choices)
    report = {"engine": "vllm", "model": str(model_dir.path), "requests": requests, "new_tokens": new_tokens,
              "seconds": seconds, "tokens_per_second": new_tokens / seconds if seconds > 0 else None,
              "load_seconds": outcome["load_seconds"],
              "vllm": {"version": result["vllm_version"], "platform": result["platform"],
                       "engine_args": result["engine_args"]}}
    if len(requests) == 1 and len(requests[0]["samples"]) == 1:
        sample = requests[0]["samples"][0]
        report.update(prompt=prompts[0].text, text=sample["text"], tokens=sample["tokens"])
    return report


def write_stream(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()
