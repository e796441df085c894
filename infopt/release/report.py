"""A release's human-readable side: RELEASE.md's comparison table and the quality-vs-size plot."""

from __future__ import annotations

from pathlib import Path


def _mb(size: int) -> str:
    return f"{size / 1e6:.3f} MB" if size < 1e9 else f"{size / 1e9:.2f} GB"


def write_release_markdown(path: Path, release: dict) -> None:
    recipe, source = release["recipe"], release["source"]
    lines = [f"# Release of `{Path(recipe['model']).name}`", "",
             f"Built by infopt {release['infopt_version']} from the recipe in `release.yaml` "
             f"(torch {release['versions']['torch']}, transformers {release['versions']['transformers']}).", ""]
    if recipe.get("calibration"):
        c = recipe["calibration"]
        lines += [f"Calibration: {c['dataset']}, {c['samples']} windows x {c['seq_len']} tokens, seed {c['seed']}.", ""]
    datasets = list(source["eval"])
    for dataset in datasets or [None]:
        if dataset is not None:
            base = source["eval"][dataset]
            lines += [f"## {dataset} ({base['tokens']} tokens scored, windows of {base['seq_len']})", ""]
        lines += ["| artifact | method | format | scheme | size | ppl | Δ ppl | KL | top-1 | time | gates |",
                  "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        base_ppl = f"{source['eval'][dataset]['ppl']:.4f}" if dataset else ""
        lines.append(f"| source | | | full precision | {_mb(source['weight_bytes'])} | {base_ppl} | | | | | |")
        for row in release["artifacts"]:
            m = row["eval"].get(dataset) if dataset else None
            figures = ([f"{m['ppl']:.4f}", f"{m['ppl_delta_rel']:+.2%}", f"{m['kl_mean']:.5f}",
                        f"{m['top1_agreement']:.2%}"] if m else ["", "", "", ""])
            failures = (row.get("gates") or {}).get("failures")
            verdict = "" if row.get("gates") is None else ("FAIL: " + "; ".join(failures) if failures else "pass")
            time_cell = "reused" if row.get("reused") else f"{row['seconds']:.1f} s"
            lines.append(f"| {row['name']} | {row['method']} | {row['format']} | {row['scheme']} | "
                         f"{_mb(row['weight_bytes'])} | " + " | ".join(figures) + f" | {time_cell} | {verdict} |")
        lines.append("")
    lines += ["Size counts the safetensors weights; `release.json` has every figure and the sha256 of every file.", "",
              "**Gates: " + ("all passed" if release["passed"] else "FAILED — " + "; ".join(release["failures"])) + "**",
              ""]
    path.write_text("\n".join(lines))


def write_plot(path: Path, release: dict) -> None:
    """Perplexity against weight bytes, one point per artifact, the source marked (first evaluation dataset)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    source = release["source"]
    dataset = next(iter(source["eval"]), None)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    if dataset is None:
        ax.text(0.5, 0.5, "no evaluation in the recipe", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.scatter([source["weight_bytes"] / 1e6], [source["eval"][dataset]["ppl"]], marker="*", s=220,
                   color="black", label="source (full precision)", zorder=3)
        for row in release["artifacts"]:
            m = row["eval"].get(dataset)
            if m is None:
                continue
            failed = bool((row.get("gates") or {}).get("failures"))
            ax.scatter([row["weight_bytes"] / 1e6], [m["ppl"]], s=60, color="tab:red" if failed else "tab:blue",
                       zorder=3)
            ax.annotate(row["name"], (row["weight_bytes"] / 1e6, m["ppl"]), textcoords="offset points",
                        xytext=(6, 4), fontsize=8)
        ax.set_ylabel(f"perplexity on {dataset}")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("weights (MB)")
    ax.set_title(f"quality vs size: {Path(release['recipe']['model']).name} (red: failed a gate)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
