"""What every infopt checkpoint carries besides weights: copied side files, a model card, a manifest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from infopt import __version__
from infopt.paths import sha256_file

SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
              "added_tokens.json", "generation_config.json", "chat_template.jinja", "vocab.json", "merges.txt")
MANIFEST = "infopt-manifest.json"
RECIPE = "infopt-recipe.yaml"  # the resolved recipe the checkpoint was made with (`infopt quantize --recipe`)


def copy_side_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def write_config(dst: Path, config: dict) -> None:
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_model_card(dst: Path, info: dict, filename: str = "README.md") -> None:
    """A README.md (or `filename`, beside a single-file checkpoint) stating how the checkpoint was made (no
    timestamps: outputs stay reproducible)."""
    lines = [
        "---",
        "tags: [infopt, quantized]",
        "---",
        f"# {info['name']}",
        "",
        f"Quantized from `{info['source']}` with infopt {__version__}.",
        "",
        "| setting | value |",
        "| --- | --- |",
    ]
    lines += [f"| {key} | {value} |" for key, value in info["settings"].items()]
    if info.get("skipped"):
        lines += ["", "Left in full precision: " + ", ".join(f"`{m}`" for m in info["skipped"]) + "."]
    for row in info.get("metrics") or []:
        lines += ["", f"## Measured quality on {row['dataset']}", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {key} | {value} |" for key, value in row.items() if key != "dataset"]
    if info.get("recovery"):
        lines += ["", "## Block-wise recovery", "",
                  "Relative layer output error (sum of squared differences to the full-precision layer's output over "
                  "sum of its squares) on the calibration windows, before and after learning:", "",
                  "| layer | before | after | kept |", "| --- | ---: | ---: | --- |"]
        lines += [f"| {e['layer']} | {e['loss_before']:.4e} | {e['loss_after']:.4e} | {e['kept']} |"
                  for e in info["recovery"]]
    if info.get("recipe"):
        lines += ["", f"Made by the recipe in `{RECIPE}`: `infopt quantize --recipe {RECIPE} --out DIR` makes it "
                  "again."]
    if info.get("loader") == "gguf":
        lines += ["", "Load with llama.cpp (`llama-cli -m FILE`), llama-cpp-python or `infopt eval` / `infopt run`.",
                  ""]
    else:
        lines += ["", "Load with `transformers` (needs `compressed-tensors`) or `infopt eval` / `infopt run`.", ""]
    (dst / filename).write_text("\n".join(lines))


def write_manifest(dst: Path) -> dict:
    files = {
        p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(dst.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"infopt_version": __version__, "files": files}
    (dst / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest
