import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from infopt.calibration.sources import load_text, wikitext_rows
from infopt.calibration.windows import calibration_windows
from infopt.errors import InfoptError


def test_builtin_wikitext2_follows_the_papers_join(data):
    text = load_text("wikitext2")
    raw = (data / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    rows = wikitext_rows(raw)
    assert len(rows) == 4358
    assert text == "\n\n".join(rows)
    assert text.startswith("\n\n = Robert Boulter = \n")


def test_builtin_tinystories_is_the_shared_file(data):
    assert load_text("tinystories") == (data / "tinystories" / "tinystories_val.txt").read_text(encoding="utf-8")


def test_file_sources(tmp_path):
    (tmp_path / "a.txt").write_text("plain text\n")
    assert load_text(str(tmp_path / "a.txt")) == "plain text\n"
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"body": t, "n": 1}) for t in ["one", "two"]) + "\n")
    assert load_text(str(tmp_path / "a.jsonl"), text_field="body") == "one\n\ntwo"
    with pytest.raises(InfoptError, match="no string field 'text'"):
        load_text(str(tmp_path / "a.jsonl"))
    pq.write_table(pa.table({"content": ["x", "y", "z"]}), tmp_path / "a.parquet")
    assert load_text(str(tmp_path / "a.parquet"), text_field="content") == "x\n\ny\n\nz"
    with pytest.raises(InfoptError, match="no column"):
        load_text(str(tmp_path / "a.parquet"))
    with pytest.raises(InfoptError, match="not found"):
        load_text(str(tmp_path / "missing.txt"))


def test_hub_dataset_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InfoptError):
        load_text("hf:some-org/some-dataset-that-is-not-cached")


def test_windows_are_seeded_and_bounded():
    ids = torch.arange(1000)
    a = calibration_windows(ids, 8, 64, seed=3)
    assert a.shape == (8, 64)
    assert torch.equal(a, calibration_windows(ids, 8, 64, seed=3))
    assert not torch.equal(a, calibration_windows(ids, 8, 64, seed=4))
    assert bool(((a[:, 1:] - a[:, :-1]) == 1).all())  # contiguous text
    chunks = calibration_windows(ids, 3, 100, mode="chunks")
    assert chunks[1, 0].item() == 100
    with pytest.raises(InfoptError, match="1000 tokens"):
        calibration_windows(ids, 20, 100, mode="chunks")
    with pytest.raises(InfoptError, match="need more than 2000"):
        calibration_windows(ids, 1, 2000)
