"""Text sources: files (.txt/.raw, .jsonl, .parquet), Hugging Face datasets, and built-in names.

Every source becomes one string: its documents joined with "\\n\\n", the protocol of the GPTQ and
AWQ papers' perplexity code (`"\\n\\n".join(dataset["text"])`).
"""

from __future__ import annotations

import json
from pathlib import Path

from infopt.errors import InfoptError
from infopt.paths import data_dir

# Built-in names: (file under the data dir, how to read it, hub fallback)
BUILTINS = {
    "wikitext2": ("wikitext-2-raw/wiki.test.raw", "wikitext-lines", "hf:wikitext:wikitext-2-raw-v1:test"),
    "tinystories": ("tinystories/tinystories_val.txt", "plain", "hf:roneneldan/TinyStories::validation"),
}


def wikitext_rows(raw: str) -> list[str]:
    """Rows as the HF `wikitext` dataset yields them: each line with its newline, blank lines empty."""
    return [line if line.strip() else "" for line in raw.splitlines(keepends=True)]


def load_text(source: str, text_field: str = "text") -> str:
    if source in BUILTINS:
        relative, kind, fallback = BUILTINS[source]
        root = data_dir()
        if root is not None and (root / relative).is_file():
            raw = _read_file(root / relative)
            return "\n\n".join(wikitext_rows(raw)) if kind == "wikitext-lines" else raw
        return load_text(fallback, text_field)
    if source.startswith("hf:"):
        return "\n\n".join(_hf_rows(source, text_field))
    path = Path(source).expanduser()
    if not path.exists():
        raise InfoptError(f"dataset not found: {source} (a file, hf:NAME[:CONFIG][:SPLIT], or one of {', '.join(BUILTINS)})")
    if path.is_dir():
        raise InfoptError(f"dataset {source} is a directory; pass a .txt, .raw, .jsonl or .parquet file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return "\n\n".join(_jsonl_rows(path, text_field))
    if suffix == ".parquet":
        return "\n\n".join(_parquet_rows(path, text_field))
    if suffix in (".json", ".csv", ".arrow"):
        raise InfoptError(f"dataset format {suffix} is not supported; use .txt/.raw, .jsonl or .parquet")
    return _read_file(path)


MAX_TEXT_BYTES = 4 * 2**30  # a text source past this is not calibration or evaluation text


def _read_file(path: Path) -> str:
    try:
        if path.stat().st_size > MAX_TEXT_BYTES:
            raise InfoptError(f"{path} is {path.stat().st_size} bytes; text sources are read whole, at most "
                              f"{MAX_TEXT_BYTES} bytes")
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InfoptError(f"{path} is not UTF-8 text") from None
    except OSError as exc:
        raise InfoptError(f"cannot read {path}: {exc.strerror}") from None


def _jsonl_rows(path: Path, field: str) -> list[str]:
    rows = []
    for number, line in enumerate(_read_file(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise InfoptError(f"{path}:{number}: not valid JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise InfoptError(f"{path}:{number}: no string field {field!r} (set --text-field)")
        rows.append(record[field])
    return rows


def _parquet_rows(path: Path, field: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InfoptError("reading .parquet needs pyarrow: pip install pyarrow") from None
    try:
        schema = pq.read_schema(path)
    except (ValueError, OSError) as exc:
        raise InfoptError(f"{path} is not a readable parquet file ({str(exc).splitlines()[0][:120]})") from None
    if field not in schema.names:
        raise InfoptError(f"{path}: no column {field!r} (columns: {', '.join(schema.names[:10])}; set --text-field)")
    try:
        table = pq.read_table(path, columns=[field])
    except (ValueError, OSError) as exc:
        raise InfoptError(f"{path} is not a readable parquet file ({str(exc).splitlines()[0][:120]})") from None
    return [value for value in table.column(field).to_pylist() if isinstance(value, str)]


def _hf_rows(source: str, field: str) -> list[str]:
    parts = source[3:].split(":")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    try:
        import datasets
    except ImportError:
        raise InfoptError(f"{source} needs the 'datasets' package: pip install 'infopt[hub]'") from None
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # datasets raises many types for offline/missing data
        raise InfoptError(f"cannot load dataset {source}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if field not in dataset.column_names:
        raise InfoptError(f"dataset {source} has no column {field!r} (columns: {', '.join(dataset.column_names)})")
    return list(dataset[field])
