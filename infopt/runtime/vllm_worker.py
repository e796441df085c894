"""Runs inside a Python that imports vLLM (its own virtual environment: vLLM pins its own transformers), driven by
`infopt.runtime.vllm_engine`. Standard library and vLLM only: infopt is not installed there.

    python vllm_worker.py JOB.json RESULT.json [LOG]   (LOG: where its output goes, read back for root causes)

JOB: {"engine_args": {...}, "models": [{"model": PATH, "engine_args": {...}, "tasks": [TASK, ...]}, ...]}
TASK: {"kind": "score", "windows": [[ids], ...]}
      -> {"target_logprobs": [[lp of token 1, ...], ...], "top1": [[id predicted at 1, ...], ...]}
      {"kind": "generate", "prompts": [[ids] | "text", ...], "max_tokens": N, "temperature": T, "top_p": P,
       "top_k": K, "seed": S, "n": N}
      -> {"outputs": [[{"token_ids": [...], "text": "..."}, ...], ...], "seconds": S}
Models load one after another in this one process (vLLM's start is the slow part). A model that fails to load or
run gets {"error": "..."}; the others still run. The result file is written whole when every model is done.
"""

import gc
import json
import os
import re
import sys
import time
import traceback

# run as a script, its folder (infopt/runtime: engine.py, kernels/, ...) would come first on sys.path and shadow
# what vLLM imports; worker processes vLLM spawns inherit this sys.path
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)


def _score(llm, task):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    # prompt_logprobs=1: each position's entry holds the actual token and the rank-1 token
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1, detokenize=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=list(w)) for w in task["windows"]], params,
                           use_tqdm=False)
    target_logprobs, top1 = [], []
    for window, out in zip(task["windows"], outputs):
        lps, tops = [], []
        for position, entry in enumerate(out.prompt_logprobs[1:], start=1):
            lps.append(entry[window[position]].logprob)
            tops.append(next(token for token, lp in entry.items() if lp.rank == 1))
        target_logprobs.append(lps)
        top1.append(tops)
    return {"target_logprobs": target_logprobs, "top1": top1}


def _generate(llm, task):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(n=task.get("n", 1), max_tokens=task["max_tokens"], temperature=task.get("temperature", 0.0),
                            top_p=task.get("top_p", 1.0), top_k=task.get("top_k", 0), seed=task.get("seed"),
                            ignore_eos=task.get("ignore_eos", False))
    prompts = [p if isinstance(p, str) else TokensPrompt(prompt_token_ids=list(p)) for p in task["prompts"]]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    result = [[{"token_ids": list(c.token_ids), "text": c.text} for c in out.outputs] for out in outputs]
    return {"outputs": result, "seconds": seconds}


def _one_model(entry, shared_args):
    from vllm import LLM

    args = {**shared_args, **entry.get("engine_args", {})}
    start = time.perf_counter()
    llm = LLM(model=entry["model"], **args)
    done = {"load_seconds": time.perf_counter() - start, "tasks": []}
    try:
        for task in entry["tasks"]:
            run = {"score": _score, "generate": _generate}[task["kind"]]
            done["tasks"].append(run(llm, task))
    finally:
        del llm
        gc.collect()
    return done


def root_cause(log):
    """vLLM reports a failed start as "see root cause above"; the cause is the last other exception its processes
    logged. A kernel-selection failure lists its reasons on the lines after it. "" when the log holds none."""
    prefix = re.compile(r"^(\([^)]*\) )?(ERROR|WARNING|INFO|DEBUG) [0-9-]+ [0-9:.]+ \[[^\]]*\] ?")
    messages = [prefix.sub("", line).strip() for line in log.splitlines()]
    found = None
    for index, message in enumerate(messages):
        if re.match(r"^[A-Za-z_.]*(Error|Exception): ", message) and "root cause" not in message:
            found = index
    if found is None:
        return ""
    cause = messages[found].split(": ", 1)[1].strip()
    if cause.endswith("Reasons:"):
        reasons = []
        for message in messages[found + 1:]:
            if not message or message.startswith(("Traceback", "[shutdown]", "EngineCore")):
                break
            reasons.append(message)
        cause = cause + " " + "; ".join(reasons)
    return cause


def _error_line(exc):
    """The root cause in one line: vLLM wraps worker failures in 'see root cause above'."""
    text = f"{type(exc).__name__}: {exc}".strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if line.startswith("Value error,"):
            return line.removeprefix("Value error,").split(" [type=")[0].strip()
    return lines[0] if lines else type(exc).__name__


def _platform_defaults(args):
    """On the CPU backend: dtype "auto" means bfloat16 (its int4 kernel takes 16-bit activations only); eager
    unless told otherwise (torch.compile would add minutes to every start on a small CPU); and without a
    gpu_memory_utilization it reserves half of the memory free now (its 0.92 default fails beside anything else).
    Elsewhere vLLM's own defaults stand (CUDA graphs on a GPU)."""
    import vllm
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        if args.get("dtype", "auto") == "auto":
            args["dtype"] = "bfloat16"
        args.setdefault("enforce_eager", True)
        if args.get("gpu_memory_utilization") is None:
            import psutil

            memory = psutil.virtual_memory()
            args["gpu_memory_utilization"] = round(0.5 * memory.available / memory.total, 3)
    return {"platform": "cpu" if current_platform.is_cpu() else str(current_platform.device_name),
            "vllm_version": vllm.__version__}


def main():
    job_path, result_path = sys.argv[1], sys.argv[2]
    with open(job_path, encoding="utf-8") as f:
        job = json.load(f)
    args = dict(job.get("engine_args", {}))
    about = _platform_defaults(args)
    results = []
    log_path = sys.argv[3] if len(sys.argv) > 3 else None
    for entry in job["models"]:
        start = os.path.getsize(log_path) if log_path else 0
        try:
            results.append(_one_model(entry, args))
        except Exception as exc:  # noqa: BLE001 - reported to infopt, which says it in one line
            traceback.print_exc()
            sys.stderr.flush()
            message = _error_line(exc)
            if log_path and "root cause" in message:
                with open(log_path, encoding="utf-8", errors="replace") as f:
                    f.seek(start)
                    message = root_cause(f.read()) or message
            results.append({"error": message})
    with open(result_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"models": results, **about, "engine_args": args}, f)
    os.replace(result_path + ".tmp", result_path)


if __name__ == "__main__":  # vLLM's CPU engine spawns worker processes that import this module again
    main()
