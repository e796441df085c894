"""Per-token overhead of small models: batch-1 decode with the fused C++ step against the torch modules, and
against the runtime as it was before the fused ops (commit BEFORE, run from a `git archive` of it), plus the
stories260K draft for the bench model that this overhead decides.

    python benchmarks/run.py --only overhead

Each round runs every variant once (the old commit in a fresh process, the two current ones in this process), so a
change in the shared machine's speed hits every row alike; the table gives medians over rounds.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BEFORE = "fd5d47e"  # the last commit whose runtime ran every small op from Python
NEW_TOKENS = 128
PROMPT = list(range(5, 21))

# One decode measurement, median of `runs` tok/s after two warm-ups, with whichever infopt is first on sys.path:
# the same source runs in this process and, for the old commit, in a fresh one.
MEDIAN_RATE = f"""
def median_rate(model, runs):
    import statistics
    from infopt.runtime.engine import Engine, SamplingParams
    from infopt.runtime.kv_cache import KVCache

    def rate():
        engine = Engine(model, KVCache.for_model(model, 64), max_batch=1)
        engine.submit({PROMPT!r}, SamplingParams(max_new_tokens={NEW_TOKENS}))
        engine.run()
        return engine.timings.decode_tokens / engine.timings.decode_seconds

    rate(), rate()
    return statistics.median(rate() for _ in range(runs))
"""
TIMER = MEDIAN_RATE + """
import sys, torch
torch.set_num_threads(int(sys.argv[3]))
import infopt
from infopt.models.loading import open_model
from infopt.runtime.model import load_engine_model
assert infopt.__file__.startswith(sys.argv[4]), infopt.__file__
print(median_rate(load_engine_model(open_model(sys.argv[1])), int(sys.argv[2])))
"""


def _current_rate(model, runs: int) -> float:
    namespace: dict = {}
    exec(MEDIAN_RATE, namespace)  # noqa: S102 (this module's own source text)
    return namespace["median_rate"](model, runs)


def _old_rate(tree: Path, model_dir: Path, runs: int, threads: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree), "INFOPT_EXT_DIR": str(tree / "ext"), "HF_HUB_OFFLINE": "1"}
    # cwd: `python -c` puts the working folder first on sys.path, so it must be the old tree, not this checkout
    done = subprocess.run([sys.executable, "-c", TIMER, str(model_dir), str(runs), str(threads), str(tree)],
                          env=env, cwd=tree,
                          capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def decode_rows(models: dict[str, Path], rounds: int, runs: int, threads: int) -> list[str]:
    from infopt.models.loading import open_model
    from infopt.runtime.model import load_engine_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp)
        archive = subprocess.run(["git", "archive", BEFORE, "infopt"], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
        for label, path in models.items():
            fused = load_engine_model(open_model(str(path)))
            plain = load_engine_model(open_model(str(path)), fused_ops=False)
            rates: dict[str, list[float]] = {"before": [], "torch": [], "fused": []}
            for _ in range(rounds):
                rates["before"].append(_old_rate(tree, path, runs, threads))
                rates["torch"].append(_current_rate(plain, runs))
                rates["fused"].append(_current_rate(fused, runs))
            before, torch_ops, step = (statistics.median(rates[k]) for k in ("before", "torch", "fused"))
            rows.append(f"| {label} | {before:.0f} | {torch_ops:.0f} | {step:.0f} | **{step / before:.2f}x** | "
                        f"{step / torch_ops:.2f}x | {1e3 / step:.2f} |")
    return rows


def section(bench_model: Path, stories: Path, threads: int, rounds: int = 3, runs: int = 5) -> list[str]:
    import bench_speculative

    lines = [f"Batch-1 greedy decode of {NEW_TOKENS} tokens after a {len(PROMPT)}-token prompt, fp32, {threads} "
             f"threads; medians of {rounds} alternating rounds, each the median of {runs} runs. \"Before\" is the "
             f"runtime at commit {BEFORE} (every norm, rotary, cache write and attention a separate torch call from "
             "Python), run from a `git archive` of that commit in a fresh process; \"torch modules\" is today's "
             "runtime with `fused_ops=False` (the same modules, with the slot and layout bookkeeping already "
             "trimmed); \"fused step\" is the default: a decode step's whole forward, from the embedded tokens to "
             "the logits, is one C++ call (`decode_step` in infopt/runtime/kernels/decode_ops.cpp).", "",
             "| model | before tok/s | torch modules tok/s | fused step tok/s | fused / before | fused / torch "
             "modules | ms per token |", "|---|---|---|---|---|---|---|"]
    lines += decode_rows({"bench model (5M, 6 x 256)": bench_model, "stories260K (5 x 64)": stories}, rounds, runs,
                         threads)
    lines += ["", "Target: the 5M bench model at >= 2x the tokens per second of before. What is left per token is "
              "mostly the weights themselves (the bench model reads 19 MB of fp32 weights a token) and about 40 us of "
              "Python around the step (engine bookkeeping, sampling).", "",
              "The stories260K draft for the bench model (greedy, batch 1, 6 TinyStories openings, 128 new tokens, "
              "median of 3 alternating runs; the same pairing as the speculative section's first rows):", "",
              "| target / draft | K | plain tok/s | speculative tok/s | speedup | acceptance | tokens per target "
              "forward | same tokens |", "|---|---|---|---|---|---|---|---|"]
    from infopt.models.loading import open_model
    from infopt.runtime.model import load_engine_model
    from infopt.runtime.speculative import ModelDrafter, draft_cache_for

    prompts = bench_speculative.story_prompts(stories, 6)
    target = load_engine_model(open_model(str(bench_model)))
    draft = load_engine_model(open_model(str(stories)))
    lines += bench_speculative.pairing_rows(
        "bench model (5M, fp32) / stories260K", target,
        lambda cache, k: ModelDrafter(draft, draft_cache_for(draft, cache, 1, k)), prompts, NEW_TOKENS, 3)
    lines += ["", "Target: >= 1.0x at the best K. The draft's forward costs about a fifth of the target's now "
              "(it was half); at K = 4 and 6 its acceptance (34%, 27%) is too low to pay for the longer drafts."]
    return lines


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "benchmarks"))
    torch.set_num_threads(2)
    print("\n".join(section(Path(sys.argv[1]), Path(sys.argv[2]), 2)))
