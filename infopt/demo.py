"""The bundled demo: stories260K from the shared data, end to end, in well under two minutes."""

from __future__ import annotations

import time
from pathlib import Path

from rich.table import Table

from infopt.cli.output import err_console, human_bytes, out_console, progress_bar, warn
from infopt.paths import require_data_file
from infopt.quant.spec import QuantSpec
from infopt.workflows import QuantizeRequest, convert_llama2c, evaluate_checkpoint, generate_text, quantize

VARIANTS = {
    "int8": QuantSpec(8, -1, True),
    "int4": QuantSpec(4, -1, False),
}


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def run_demo(out: Path, max_windows: int | None = None, force: bool = True) -> dict:
    checkpoint = require_data_file("tinyllamas-stories260K/stories260K.bin")
    tokenizer = require_data_file("tinyllamas-stories260K/tok512.model")
    require_data_file("tinystories/tinystories_val.txt")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    fp_dir = out / "stories260K"
    err_console.print(f"converting {checkpoint.name} -> {fp_dir}")
    convert_llama2c(checkpoint, tokenizer, fp_dir, force=force)

    rows = []
    with progress_bar() as progress:
        base = evaluate_checkpoint(str(fp_dir), "tinystories", max_windows=max_windows, progress=progress)
        rows.append({"model": "fp32 (source)", "path": fp_dir, "ppl": base["ppl"], "seconds": None})
        for name, spec in VARIANTS.items():
            target = out / f"stories260K-{name}"
            t0 = time.perf_counter()
            report = quantize(QuantizeRequest(model=str(fp_dir), spec=spec, out=target, force=force), progress)
            seconds = time.perf_counter() - t0
            for message in report["warnings"]:
                warn(message)
            metrics = evaluate_checkpoint(str(target), "tinystories", baseline=str(fp_dir), max_windows=max_windows,
                                          progress=progress)
            rows.append({"model": spec.describe(), "path": target, "seconds": seconds, **metrics})

    table = Table(title=f"stories260K on TinyStories validation ({base['windows']} windows x {base['seq_len']} tokens)")
    for column in ("model", "weights", "ppl", "vs fp32", "KL", "top-1", "quant s"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in rows:
        quantized = "ppl_delta_rel" in row
        table.add_row(row["model"], human_bytes(_dir_bytes(row["path"])), f"{row['ppl']:.4f}",
                      f"{row['ppl_delta_rel']:+.2%}" if quantized else "",
                      f"{row['kl_mean']:.5f}" if quantized else "",
                      f"{row['top1_agreement']:.2%}" if quantized else "",
                      f"{row['seconds']:.2f}" if row["seconds"] is not None else "")
    out_console.print(table)

    sample_dir = out / "stories260K-int8"
    sample = generate_text(str(sample_dir), "", max_new_tokens=64)
    out_console.print(f"[bold]greedy sample from {sample_dir.name}:[/bold] {sample['text']}", highlight=False)
    out_console.print(f"demo finished in {time.perf_counter() - start:.1f} s; checkpoints under {out}/")
    return {"rows": rows, "sample": sample["text"]}
