"""The bundled demo: a gated 4-bit release of stories260K from the shared data, end to end, in about a minute."""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

import yaml

from infopt.cli.output import err_console, out_console
from infopt.paths import require_data_file
from infopt.release.pipeline import build_release
from infopt.workflows import convert_llama2c, generate_text

RECIPE = "stories260k-4bit.yaml"


def bundled_recipe() -> dict:
    return yaml.safe_load(resources.files("infopt.recipes").joinpath(RECIPE).read_text())


def run_demo(out: Path, force: bool = True, progress=None, on_artifact=None, show_release=None) -> dict:
    checkpoint = require_data_file("tinyllamas-stories260K/stories260K.bin")
    tokenizer = require_data_file("tinyllamas-stories260K/tok512.model")
    require_data_file("tinystories/tinystories_val.txt")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    fp_dir = out / "stories260K"
    err_console.print(f"converting {checkpoint.name} -> {fp_dir}")
    convert_llama2c(checkpoint, tokenizer, fp_dir, force=force)
    recipe = bundled_recipe()
    recipe["model"] = str(fp_dir)
    recipe_path = out / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    err_console.print(f"building the release in {RECIPE} (infopt release {recipe_path} --out {out / 'release'})")
    release = build_release(recipe_path, out / "release", force=force, progress=progress, on_artifact=on_artifact)
    if show_release:
        show_release(release)
    dataset = recipe["evaluation"]["datasets"][0]
    best = min(release["artifacts"], key=lambda row: row["eval"][dataset]["ppl"])
    sample = generate_text(str(out / "release" / best["name"]), "", max_new_tokens=64)
    decode = (sample.get("timings") or {}).get("decode_tokens_per_second")
    out_console.print(f"[bold]greedy sample from {best['name']}[/bold] (lowest perplexity at 4 bits"
                      + (f", decode {decode:.0f} tok/s" if decode else "") + f"): {sample['text']}", highlight=False)
    out_console.print(f"demo finished in {time.perf_counter() - start:.1f} s; release under {out / 'release'}/ "
                      "(RELEASE.md, release.json, quality-vs-size.png)")
    return {"release": release, "best": best["name"], "sample": sample["text"], "decode_tokens_per_second": decode}
