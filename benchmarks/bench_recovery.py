"""Block-wise recovery (`--recover`) next to GPTQ, AWQ and Intel's auto-round: held-out quality and wall time.

Every tool quantizes the same model on the same calibration windows (infopt draws them; auto-round gets the exact
token tensor in its own virtual environment, benchmarks/peer_env.py) at the same bits and group, and every result
is scored by the same perplexity code on text calibration never saw. Wall times are whole commands (load,
calibrate, quantize, write), 2 threads each, run one after another.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import save_file

from infopt.models.loading import open_model
from infopt.workflows import CalibrationData, calibration_set, evaluate_checkpoint

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_gptq import _timed  # noqa: E402  (whole-command wall time, 2 threads, offline)
from peer_env import ensure_python  # noqa: E402
from synthetic import llama_config, make_synthetic_llama  # noqa: E402


@dataclass
class Subject:
    name: str
    path: Path
    calib: str  # calibration text (infopt's --calib)
    heldout: str  # scored text, disjoint from calib
    settings: list[tuple[int, int]]  # (bits, group), all asymmetric
    extra: list[str] = field(default_factory=list)  # infopt flags that match auto-round's coverage
    samples: int = 128
    seq_len: int = 512
    eval_windows: int = 128


def split_stories(work: Path) -> tuple[Path, Path]:
    """TinyStories validation text cut at a line boundary: the first half calibrates, the second is scored."""
    from infopt.paths import require_data_file

    text = require_data_file("tinystories/tinystories_val.txt").read_text(encoding="utf-8")
    middle = text.index("\n", len(text) // 2) + 1
    calib, heldout = work / "tinystories-first-half.txt", work / "tinystories-second-half.txt"
    calib.write_text(text[:middle], encoding="utf-8")
    heldout.write_text(text[middle:], encoding="utf-8")
    return calib, heldout


def _infopt(subject: Subject, method: str, bits: int, group: int, out: Path, threads: int,
            recover: bool) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "infopt.cli.main", "quantize", str(subject.path), "--method", method,
           "--bits", str(bits), "--group-size", str(group), "--asym", "--out", str(out), "--force", "--json",
           *subject.extra]
    if method != "rtn" or recover:
        cmd += ["--calib", subject.calib, "--calib-samples", str(subject.samples), "--calib-seq-len",
                str(subject.seq_len)]
    if recover:
        cmd.append("--recover")
    seconds, stdout = _timed(cmd, threads)
    return seconds, json.loads(stdout)


def _autoround(python: Path, subject: Subject, calib: Path, bits: int, group: int, out: Path,
               threads: int) -> float:
    cmd = [str(python), str(ROOT / "benchmarks" / "autoround_runner.py"), "--model", str(subject.path),
           "--calib", str(calib), "--bits", str(bits), "--group-size", str(group), "--asym", "--out", str(out),
           "--threads", str(threads)]
    return _timed(cmd, threads)[0]


def _score(model: Path, subject: Subject) -> dict:
    return evaluate_checkpoint(str(model), subject.heldout, baseline=str(subject.path),
                               max_windows=subject.eval_windows)


def subject_rows(subject: Subject, work: Path, threads: int, python: Path) -> tuple[list[str], list[str]]:
    windows = calibration_set(CalibrationData(dataset=subject.calib, samples=subject.samples,
                                              seq_len=subject.seq_len), open_model(str(subject.path)))
    calib = work / f"calib-{subject.name}.safetensors"
    save_file({"input_ids": windows.contiguous()}, str(calib))
    base = evaluate_checkpoint(str(subject.path), subject.heldout, max_windows=subject.eval_windows)
    rows = [f"| {subject.name} | fp32 | | {base['ppl']:.4f} | | | | |"]
    verdicts = []
    runs = [("GPTQ", "gptq", False), ("GPTQ + recover", "gptq", True), ("RTN + recover", "rtn", True),
            ("AWQ", "awq", False)]
    for bits, group in subject.settings:
        label = f"W{bits} g{group}"
        scores = {}
        for name, method, recover in runs:
            out = work / f"{subject.name}-{method}{'-rec' if recover else ''}-w{bits}g{group}"
            seconds, report = _infopt(subject, method, bits, group, out, threads, recover)
            scores[name] = (_score(out, subject), seconds, report)
        out = work / f"{subject.name}-autoround-w{bits}g{group}"
        seconds = _autoround(python, subject, calib, bits, group, out, threads)
        scores["auto-round 0.16.1"] = (_score(out, subject), seconds, None)
        gptq_gap = scores["GPTQ"][0]["ppl"] - base["ppl"]
        for name, (r, seconds, report) in scores.items():
            removed = "" if name == "GPTQ" else f"{(gptq_gap - (r['ppl'] - base['ppl'])) / gptq_gap:+.0%}"
            kept = ""
            if report and "recovery" in report:
                layers = report["recovery"]["layers"]
                kept = f" ({sum(e['kept'] == 'recovered' for e in layers)}/{len(layers)} layers learned)"
            rows.append(f"| {subject.name} | {label} {name}{kept} | {seconds:.0f} | {r['ppl']:.4f} | "
                        f"{r['ppl_delta_rel']:+.2%} | {removed} | {r['kl_mean']:.4f} | {r['top1_agreement']:.2%} |")
        theirs = scores["auto-round 0.16.1"]
        for start in ("GPTQ + recover", "RTN + recover"):
            ours = scores[start]
            verdicts.append(f"{subject.name} {label}: {start} {ours[0]['ppl']:.4f} vs auto-round "
                            f"{theirs[0]['ppl']:.4f} ({'no worse' if ours[0]['ppl'] <= theirs[0]['ppl'] else 'WORSE'}),"
                            f" {ours[1]:.0f} s vs {theirs[1]:.0f} s ({'no slower' if ours[1] <= theirs[1] else 'SLOWER'})")
    return rows, verdicts


def memory_rows(work: Path, threads: int) -> list[str]:
    """Peak RSS of GPTQ + recover on 4- and 32-layer synthetic Llamas of one width (as the memory section)."""
    peaks = {}
    for layers in (4, 32):
        model = make_synthetic_llama(work / f"synthetic-{layers}", llama_config(layers, 1024, 2816, 8, 8))
        cmd = [sys.executable, str(ROOT / "benchmarks" / "peak_rss.py"), sys.executable, "-m", "infopt.cli.main",
               "quantize", str(model), "--method", "gptq", "--calib", "wikitext2", "--calib-samples", "8",
               "--calib-seq-len", "256", "--recover", "--recover-steps", "10", "--out",
               str(work / f"q-recover-{layers}"), "--force", "--json"]
        seconds, stdout = _timed(cmd, threads)
        peaks[layers] = (int(stdout.strip().splitlines()[-1].split("=")[1]), seconds)
    ratio = peaks[32][0] / peaks[4][0]
    return [f"| {layers} | {peak / 2**20:,.0f} MiB | {seconds:.0f} |" for layers, (peak, seconds) in peaks.items()
            ] + ["", f"Peak RSS ratio, 32 layers / 4 layers: **{ratio:.2f}** (target <= 1.3)."]


def section(bench_model: Path, stories: Path, work: Path, threads: int = 2) -> list[str]:
    from infopt.paths import require_data_file

    python = ensure_python("autoround")
    calib, heldout = split_stories(work)
    subjects = [
        Subject("bench-llama", bench_model, str(require_data_file("wikitext-2-tokens/valid.txt")), "wikitext2",
                [(4, 128), (3, 128), (2, 64)]),
        # auto-round leaves linears whose width is not a multiple of 32 (this MLP's 172) unquantized;
        # infopt is told to do the same so both quantize the same attention linears
        Subject("stories260K", stories, str(calib), str(heldout), [(4, 64), (3, 64), (2, 64)],
                extra=["--ignore", "mlp"], seq_len=256, eval_windows=256),
    ]
    table = ["| model | scheme / tool | wall s | held-out perplexity | vs fp32 | GPTQ's gap removed | KL | top-1 |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    verdicts = []
    for subject in subjects:
        rows, found = subject_rows(subject, work, threads, python)
        table += rows
        verdicts += found
    memory = ["| layers | peak RSS | wall s |", "| ---: | ---: | ---: |", *memory_rows(work, threads)]
    return [
        "All asymmetric. Calibration: 128 seeded windows (bench model: 512 tokens of WikiText-2 valid; stories260K:",
        "256 tokens of the first half of the TinyStories validation file), the same token tensor for auto-round.",
        "**Held-out scoring**: bench model on wiki.test.raw, stories260K on the second half of the TinyStories file;",
        "calibration never saw either. Bench-model windows: 128 x 1024 tokens; stories260K: 256 x 512.",
        "infopt `--recover` defaults: 200 signed-gradient steps (lr 1/200, linear decay) of 8 windows per layer,",
        "learning rounding offsets and group range factors against the full-precision model's activations, bf16",
        "autocast; the better of 2 scored checkpoints (half-way, end) is kept, and the base result where learning",
        "did not beat it. auto-round: its defaults (SignRound, 200 iterations, batch 8, lr 1/200; bf16 on this",
        "CPU), scored from the exact",
        "(q - zp) * scale weights it stores (benchmarks/autoround_runner.py). stories260K: attention linears only, by",
        "both (auto-round skips the 172-wide MLP); group 64, the largest that fits them.",
        "",
        *table,
        "",
        "Targets (issue 15): recovery no worse than auto-round, in no more wall time:",
        "",
        *[f"- {v}" for v in verdicts],
        "",
        "### Peak memory of GPTQ + recover against depth",
        "",
        "Synthetic Llamas (hidden 1024, intermediate 2816, 8 heads), 8 windows x 256 tokens, `--recover-steps 10`:",
        "",
        *memory,
    ]


if __name__ == "__main__":
    import argparse
    import tempfile

    from train_bench_model import ensure_bench_model

    parser = argparse.ArgumentParser()
    parser.add_argument("--stories", type=Path, required=True, help="stories260K as a Hugging Face folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print("\n".join(section(ensure_bench_model(2), args.stories, Path(tmp))))


def qat_section(bench_model: Path, work: Path, threads: int = 2) -> list[str]:
    """`infopt qat` on top of GPTQ + recover at W2 g64 on the bench model: held-out perplexity and time."""
    from infopt.paths import require_data_file

    subject = Subject("bench-llama", bench_model, str(require_data_file("wikitext-2-tokens/valid.txt")),
                      "wikitext2", [(2, 64)])
    base = evaluate_checkpoint(str(bench_model), subject.heldout, max_windows=subject.eval_windows)
    start = work / "qat-start"
    seconds, _ = _infopt(subject, "gptq", 2, 64, start, threads, recover=True)
    rows = [f"| fp32 | | {base['ppl']:.4f} | | | |"]
    r = _score(start, subject)
    rows.append(f"| GPTQ + recover (the start) | {seconds:.0f} | {r['ppl']:.4f} | {r['ppl_delta_rel']:+.2%} | "
                f"{r['kl_mean']:.4f} | {r['top1_agreement']:.2%} |")
    for train in ("scales", "all"):
        out = work / f"qat-{train}"
        cmd = [sys.executable, "-m", "infopt.cli.main", "qat", str(bench_model), "--data", subject.calib,
               "--start", str(start), "--train", train, "--out", str(out), "--force", "--json"]
        seconds, stdout = _timed(cmd, threads)
        report = json.loads(stdout)
        r = _score(out, subject)
        rows.append(f"| + `infopt qat --train {train}` (best check: step {report['best_step']}) | {seconds:.0f} | "
                    f"{r['ppl']:.4f} | {r['ppl_delta_rel']:+.2%} | {r['kl_mean']:.4f} | {r['top1_agreement']:.2%} |")
    return [
        "The bench model at W2 g64 asym: GPTQ + recover (the defaults above), then end-to-end QAT on WikiText-2",
        "valid text (`infopt qat` defaults: 200 AdamW steps of 4 x 512 tokens, KL to the full-precision model's",
        "logits, a held-out check on the text's last 10% every 50 steps, the best check kept). Scored on",
        "wiki.test.raw (128 x 1024-token windows), which neither phase saw. Wall s: each whole command, 2 threads.",
        "",
        "| model | wall s | held-out perplexity | vs fp32 | KL | top-1 |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *rows,
    ]
