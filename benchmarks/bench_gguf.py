"""GGUF against llama.cpp's own quantizer, scored by llama.cpp and by infopt on the same windows.

llama.cpp side: its convert_hf_to_gguf.py (from the llama-cpp-python 0.3.36 sdist, cached outside the repo) writes
an F32 file, then llama.cpp's quantizer (llama_model_quantize, what llama-quantize calls) writes each type. infopt
side: `infopt quantize --format gguf --gguf-type T` from the same source (RTN on a searched grid), and GPTQ into
Q4_0 with its grid stored as it is. Every file is scored twice on the same token windows: by llama.cpp (its logits
through llama-cpp-python) and by `infopt eval` (infopt's reader and transformers).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
LLAMA_CPP_VERSION = "0.3.36"
CACHE = Path(os.environ.get("INFOPT_CACHE", Path.home() / ".cache" / "infopt"))


def llama_cpp_source() -> Path:
    """The llama.cpp tree vendored in the llama-cpp-python sdist (its converter and gguf-py), fetched once."""
    root = CACHE / f"llama-cpp-python-{LLAMA_CPP_VERSION}"
    tree = root / f"llama_cpp_python-{LLAMA_CPP_VERSION}" / "vendor" / "llama.cpp"
    if (tree / "convert_hf_to_gguf.py").is_file():
        return tree
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={LLAMA_CPP_VERSION}", "-d", str(root)], check=True)
    with tarfile.open(next(root.glob("llama_cpp_python-*.tar.gz"))) as archive:
        archive.extractall(root, filter="data")
    return tree


def convert_with_llama_cpp(model: Path, out: Path) -> Path:
    if not out.exists():
        tree = llama_cpp_source()
        subprocess.run([sys.executable, str(tree / "convert_hf_to_gguf.py"), str(model), "--outfile", str(out),
                        "--outtype", "f32"], check=True, capture_output=True, cwd=tree)
    return out


_LLAMA_TYPES = {"Q8_0": 7, "Q4_0": 2, "Q4_1": 3, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}


def quantize_with_llama_cpp(source: Path, out: Path, file_type: str, threads: int) -> float:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _LLAMA_TYPES[file_type]
    params.nthread = threads
    start = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize {file_type} failed ({rc})")
    return time.perf_counter() - start


def load_llama(path: Path, threads: int, n_ctx: int, logits_all: bool = False):
    """llama-cpp-python's Llama without llama.cpp's CPU weight repacking (its AMX/AVX-512 "extra buffers"), which
    crashes in decode on this CPU: on stories260K's shapes (its own converter's files too) and on the 706M
    synthetic Llama's Q4_0/Q8_0/Q4_K_M files; F16 runs either way."""
    import llama_cpp
    import llama_cpp.llama as module

    default = llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    module.llama_cpp.llama_model_default_params = params
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                               logits_all=logits_all, verbose=False, n_threads=threads, n_threads_batch=threads)
    finally:
        module.llama_cpp.llama_model_default_params = default


class LlamaCppModel:
    """llama.cpp behind the `model(ids).logits` call infopt's evaluator makes (one window at a time)."""

    def __init__(self, path: Path, threads: int, n_ctx: int):
        self.llm = load_llama(path, threads, n_ctx, logits_all=True)

    def __call__(self, ids: torch.Tensor):
        rows = []
        for window in ids.tolist():
            self.llm.reset()
            self.llm.eval(window)
            rows.append(torch.from_numpy(np.array(self.llm.scores[: len(window)], dtype=np.float32)))
        return type("Output", (), {"logits": torch.stack(rows)})()

    def decode_speed(self, prompt: list[int], tokens: int) -> float:
        """Greedy batch-1 decode, tokens per second after the prompt."""
        self.llm.reset()
        self.llm.eval(prompt)
        start = time.perf_counter()
        for _ in range(tokens):
            self.llm.eval([int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))])
        return tokens / (time.perf_counter() - start)

    def close(self):
        self.llm.close()


def _window_ids(source: Path, dataset: str) -> torch.Tensor:
    from infopt.calibration.sources import load_text
    from infopt.calibration.windows import tokenize
    from infopt.models.loading import load_tokenizer

    return tokenize(load_tokenizer(source), load_text(dataset))


def _score(file: Path, ids: torch.Tensor, seq_len: int, windows: int, threads: int) -> tuple[float, float]:
    from infopt.eval.perplexity import evaluate
    from infopt.models.loading import load_causal_lm

    llm = LlamaCppModel(file, threads, seq_len)
    theirs = evaluate(llm, ids, seq_len, max_windows=windows)["ppl"]
    llm.close()
    ours = evaluate(load_causal_lm(str(file)), ids, seq_len, max_windows=windows, batch_size=8)["ppl"]
    return theirs, ours


def _infopt(source: Path, out: Path, *args: str) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "infopt.cli.main", "quantize", str(source), "--format", "gguf",
                    "--out", str(out), "--force", *args], check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def subject_rows(name: str, source: Path, dataset: str, calib: str, types: list[str], work: Path,
                 threads: int, windows: int, seq_len: int) -> tuple[list[str], list[str]]:
    work.mkdir(parents=True, exist_ok=True)
    ids = _window_ids(source, dataset)
    f32 = convert_with_llama_cpp(source, work / f"{name}-llama-f32.gguf")
    base_theirs, base_ours = _score(f32, ids, seq_len, windows, threads)
    quality = [f"| {name} | F32 (llama.cpp convert) | {f32.stat().st_size:,} | {base_theirs:.4f} | {base_ours:.4f} |"]
    timing = []
    for file_type in types:
        theirs_file, ours_file = work / f"{name}-llama-{file_type}.gguf", work / f"{name}-infopt-{file_type}.gguf"
        t_theirs, t_ours = [], []
        for _ in range(2):  # alternating runs, medians
            t_theirs.append(quantize_with_llama_cpp(f32, theirs_file, file_type, threads))
            t_ours.append(_infopt(source, ours_file, "--gguf-type", file_type))
        rows = [("llama.cpp quantize", theirs_file), ("infopt RTN (searched scales)", ours_file)]
        if file_type in ("Q4_0", "Q8_0", "Q4_K_M"):
            gptq_file = work / f"{name}-infopt-gptq-{file_type}.gguf"
            _infopt(source, gptq_file, "--method", "gptq", "--calib", calib, "--calib-samples", "128",
                    "--calib-seq-len", str(seq_len), "--group-size", "32", "--gguf-type", file_type)
            # (K mixtures: GPTQ on the Q4_K grid; the mixture's Q6_K tensors written from full precision)
            rows.append(("infopt GPTQ on the file's grid", gptq_file))
        for label, file in rows:
            theirs, ours = _score(file, ids, seq_len, windows, threads)
            quality.append(f"| {name} | {file_type}: {label} | {file.stat().st_size:,} | {theirs:.4f} | "
                           f"{ours:.4f} |")
        o, t = statistics.median(t_ours), statistics.median(t_theirs)
        timing.append(f"| {name} | {file_type} | {o:.2f} | {t:.2f} | **{o / t:.2f}x** |")
    return quality, timing


def decode_rows(name: str, files: dict[str, Path], threads: int, new_tokens: int = 64) -> list[str]:
    """Batch-1 greedy decode of the same file in llama.cpp and in `infopt run`, alternating, medians of 3."""
    rows = []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    for label, file in files.items():
        theirs, ours = [], []
        for _ in range(3):
            llm = LlamaCppModel(file, threads, 512)
            theirs.append(llm.decode_speed([1, 403, 407, 261, 378], new_tokens))
            llm.close()
            done = subprocess.run([sys.executable, "-m", "infopt.cli.main", "run", str(file), "--prompt",
                                   "Once upon a time", "--max-new-tokens", str(new_tokens), "--json"],
                                  check=True, capture_output=True, text=True, env=env)
            ours.append(json.loads(done.stdout)["timings"]["decode_tokens_per_second"])
        t, o = statistics.median(theirs), statistics.median(ours)
        rows.append(f"| {name} | {label} | {t:.0f} | {o:.0f} | **{o / t:.2f}x** |")
    return rows


def section(stories: Path, bench_model: Path, work: Path, threads: int = 2) -> list[str]:
    quality = ["| model | type: quantizer | file bytes | ppl by llama.cpp | ppl by infopt eval |",
               "| --- | --- | ---: | ---: | ---: |"]
    timing = ["| model | type | infopt s (whole command) | llama.cpp quantize s (from F32 GGUF) | ratio |",
              "| --- | --- | ---: | ---: | ---: |"]
    subjects = [("stories260K", stories, "tinystories", "tinystories", ["Q8_0", "Q4_0"], 64, 256),
                ("bench-llama", bench_model, "wikitext2", str(ROOT.parent / "shared/data/wikitext-2-tokens/valid.txt"),
                 ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0"], 32, 512)]
    for name, source, dataset, calib, types, windows, seq_len in subjects:
        q, t = subject_rows(name, source, dataset, calib, types, work / f"gguf-{name}", threads, windows, seq_len)
        quality += q
        timing += t
    bench_dir = work / "gguf-bench-llama"
    decode = ["| model | file | llama.cpp tok/s | infopt run tok/s | ratio |", "| --- | --- | ---: | ---: | ---: |"]
    decode += decode_rows("bench-llama", {"Q8_0 (infopt RTN)": bench_dir / "bench-llama-infopt-Q8_0.gguf",
                                          "Q4_0 (infopt GPTQ)": bench_dir / "bench-llama-infopt-gptq-Q4_0.gguf",
                                          "Q4_K_M (infopt RTN)": bench_dir / "bench-llama-infopt-Q4_K_M.gguf"},
                          threads)
    import bench_engines  # noqa: PLC0415 (the engines section's 706M Llama and its GGUF files, cached)

    large = bench_engines.checkpoints()
    decode += decode_rows("synthetic 706M", {f"{t} (infopt RTN)": large[t] for t in ("Q8_0", "Q4_0", "Q4_K_M")},
                          threads)
    return [
        f"{threads} threads everywhere. llama.cpp {LLAMA_CPP_VERSION} (llama-cpp-python's vendored tree): its",
        "converter writes F32, its quantizer (`llama_model_quantize`, what `llama-quantize` runs) each type, without",
        "an importance matrix (the imatrix section has both sides with one). infopt writes each type",
        "from the source folder in one command. The bench model's linears are all 256-multiples, so its K-quant rows",
        "are real K-quants; stories260K (64-wide) takes only the 32-blocks, its 172-column ffn_down falls back to F16",
        "on both sides. Perplexity: the same windows scored by llama.cpp's own logits and by `infopt eval`'s reader;",
        "the two columns agreeing is the check that both read the file the same way. GPTQ calibrates on text the",
        "scored windows do not contain for the bench model (WikiText-2 valid vs test); for stories260K the only",
        "stories text is also the scored one. infopt's files are about 20 KB larger: they embed the original",
        "tokenizer.json and the source config. Where infopt loses: Q4_0 on the bench model (GPTQ's symmetric scale",
        "absmax / 7.5 against ggml's signed maximum / -8, which puts the largest value on a level; infopt's searched",
        "RTN scale lowers the weight MSE yet not this model's perplexity), the time to write (a whole Python command",
        "against an in-process call on an already converted file) and batch-1 decode of the 5M bench model (its",
        "per-token overhead; on the 706M model infopt decodes the same files faster).",
        "",
        *quality,
        "",
        "### Time to write each type",
        "",
        "Medians of 2 alternating runs. infopt's time is the whole command (load, round, write); llama.cpp's starts",
        "from its F32 file (conversion not counted). Ratio < 1: infopt is faster.",
        "",
        *timing,
        "",
        "### Decode speed of the same file, batch 1",
        "",
        f"Greedy, 64 new tokens after a 5-token prompt, {threads} threads, medians of 3 alternating runs; llama.cpp",
        "without its CPU weight repacking, which crashes on these files here (see the engines section). infopt",
        "computes from every block type packed: Q4_0 / Q8_0 as int4 / int8 groups of 32, Q4_K as 4-bit codes with a",
        "step and a float offset per 32 values, Q6_K as int8 codes with a step per 16. The 706M rows are the engines",
        "section's files. Ratio > 1: infopt is faster.",
        "",
        *decode,
    ]


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from run import _stories  # noqa: E402
    from train_bench_model import ensure_bench_model  # noqa: E402

    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/bench-gguf")
    torch.set_num_threads(2)
    print("\n".join(section(_stories(work), ensure_bench_model(2), work)))
    print(json.dumps({"done": True}))


def _llama_quantize(tools: Path, source: Path, out: Path, file_type: str, threads: int,
                    imatrix: Path | None = None) -> None:
    """llama.cpp's `llama-quantize` CLI, with `--imatrix` when given one."""
    extra = ["--imatrix", str(imatrix)] if imatrix is not None else []
    subprocess.run([str(tools / "llama-quantize"), *extra, str(source), str(out), file_type, str(threads)],
                   check=True, capture_output=True)


def _llama_imatrix(tools: Path, source: Path, text: Path, out: Path, chunks: int, seq_len: int, threads: int) -> Path:
    """llama.cpp's `llama-imatrix`: mean x^2 per input column of every matrix over `chunks` windows of the text."""
    subprocess.run([str(tools / "llama-imatrix"), "-m", str(source), "-f", str(text), "-o", str(out), "-c",
                    str(seq_len), "-b", str(seq_len), "--chunks", str(chunks), "-t", str(threads)],
                   check=True, capture_output=True)
    return out


def imatrix_section(stories: Path, bench_model: Path, work: Path, threads: int = 2) -> list[str]:
    """Both quantizers with and without an importance matrix from the same calibration text, scored on held-out
    text by llama.cpp's logits and by `infopt eval`."""
    from bench_recovery import split_stories  # noqa: PLC0415
    from llama_tools import ensure_tools  # noqa: PLC0415

    tools = ensure_tools()
    work.mkdir(parents=True, exist_ok=True)
    stories_calib, stories_heldout = split_stories(work)
    wiki_calib = ROOT.parent / "shared/data/wikitext-2-tokens/valid.txt"
    samples = 128
    subjects = [("bench-llama", bench_model, wiki_calib, "wikitext2", ["Q4_0", "Q4_K_M", "Q6_K"], 32, 512),
                ("stories260K", stories, stories_calib, str(stories_heldout), ["Q4_0"], 64, 256)]
    table = ["| model | type | quantizer | file bytes | ppl by llama.cpp | ppl by infopt eval |",
             "| --- | --- | --- | ---: | ---: | ---: |"]
    verdicts = []
    for name, source, calib, heldout, types, windows, seq_len in subjects:
        ids = _window_ids(source, heldout)
        f32 = convert_with_llama_cpp(source, work / f"{name}-im-f32.gguf")
        base = _score(f32, ids, seq_len, windows, threads)
        table.append(f"| {name} | F32 | llama.cpp convert | {f32.stat().st_size:,} | {base[0]:.4f} | {base[1]:.4f} |")
        imatrix = _llama_imatrix(tools, f32, calib, work / f"{name}-imatrix.gguf", samples, seq_len, threads)
        calib_args = ["--calib", str(calib), "--calib-samples", str(samples), "--calib-seq-len", str(seq_len)]
        for file_type in types:
            files = {}
            files["llama.cpp quantize"] = work / f"{name}-llama-{file_type}.gguf"
            _llama_quantize(tools, f32, files["llama.cpp quantize"], file_type, threads)
            files["llama.cpp quantize --imatrix"] = work / f"{name}-llama-im-{file_type}.gguf"
            _llama_quantize(tools, f32, files["llama.cpp quantize --imatrix"], file_type, threads, imatrix)
            files["infopt RTN"] = work / f"{name}-infopt-{file_type}.gguf"
            _infopt(source, files["infopt RTN"], "--gguf-type", file_type)
            files["infopt RTN + imatrix (--calib)"] = work / f"{name}-infopt-im-{file_type}.gguf"
            _infopt(source, files["infopt RTN + imatrix (--calib)"], "--gguf-type", file_type, *calib_args)
            if file_type != "Q6_K":  # GPTQ has no 6-bit grid (refused)
                files["infopt GPTQ on the file's grid"] = work / f"{name}-infopt-gptq-{file_type}.gguf"
                _infopt(source, files["infopt GPTQ on the file's grid"], "--method", "gptq", "--group-size", "32",
                        "--gguf-type", file_type, *calib_args)
            scores = {}
            for label, file in files.items():
                scores[label] = _score(file, ids, seq_len, windows, threads)
                table.append(f"| {name} | {file_type} | {label} | {file.stat().st_size:,} | "
                             f"{scores[label][0]:.4f} | {scores[label][1]:.4f} |")
            theirs = scores["llama.cpp quantize --imatrix"][0]
            best_label = min((k for k in scores if k.startswith("infopt")), key=lambda k: scores[k][0])
            ours = scores[best_label][0]
            verdicts.append(f"{name} {file_type}: infopt's best ({best_label}) {ours:.4f} vs llama.cpp --imatrix "
                            f"{theirs:.4f}: {'met' if ours <= theirs else 'NOT met'}")
            if "infopt GPTQ on the file's grid" in scores and file_type == "Q4_K_M":
                gptq = scores["infopt GPTQ on the file's grid"][0]
                for label in ("llama.cpp quantize", "llama.cpp quantize --imatrix"):
                    gap = scores[label][0] - base[0]
                    closed = (scores[label][0] - gptq) / gap if gap > 0 else float("nan")
                    verdicts.append(f"{name} Q4_K_M: GPTQ on the grid closes {closed:.0%} of the gap between "
                                    f"{label} ({scores[label][0]:.4f}) and F32 ({base[0]:.4f}) (target >= 50%: "
                                    f"{'met' if closed >= 0.5 else 'NOT met'})")
    return [
        f"{threads} threads. llama.cpp {LLAMA_CPP_VERSION}'s own CLI tools, built from the llama-cpp-python sdist's",
        "vendored tree (benchmarks/llama_tools.py, `make llama-tools`): `llama-imatrix` collects the importance",
        f"matrix on {samples} consecutive windows of the calibration text (bench model: 512 tokens of",
        "WikiText-2 valid; stories260K: 256 tokens of the first half of the TinyStories validation file), then",
        "`llama-quantize [--imatrix]` writes each type from llama.cpp's own F32 conversion. infopt calibrates on",
        f"{samples} seeded windows of the same length drawn from the same text file (`--calib FILE`): the same",
        "text and token count, not the same windows. Perplexity on held-out text neither side calibrated on",
        "(bench model: wiki.test.raw, 32 x 512-token windows; stories260K: the file's second half, 64 x 256),",
        "scored by llama.cpp's logits (llama-cpp-python) and by `infopt eval`'s reader. GPTQ runs on the file's",
        "own grid (Q4_0's scales; for Q4_K_M the Q4_K sub-block grid, its Q6_K tensors written from full",
        "precision); it has no Q6_K grid.",
        "",
        *table,
        "",
        "Targets (issue 14): infopt's perplexity <= llama.cpp's at the same type with an importance matrix on both",
        "sides; GPTQ on the Q4_K_M grid closes at least half of the gap between llama.cpp's Q4_K_M and F32:",
        "",
        *[f"- {v}" for v in verdicts],
    ]
