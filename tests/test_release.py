"""`infopt release` end to end on stories260K: gates, the folder's contents, resume, shared work, reproduction."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from infopt.errors import InfoptError
from tests.conftest import run_cli
from tests.test_cli import assert_clean_failure

ROOT = Path(__file__).resolve().parents[1]


def _recipe(tmp_path: Path, model: Path, **changes) -> Path:
    data = {
        "model": str(model),
        "calibration": {"dataset": "tinystories", "samples": 8, "seq_len": 128},
        "evaluation": {"datasets": ["tinystories"], "max_windows": 4},
        "gates": {"max_ppl_delta": 0.5},
        "artifacts": [
            {"name": "int8-rtn", "method": "rtn", "options": {"bits": 8, "group_size": -1}},
            {"name": "int4-gptq", "method": "gptq", "format": "gptq",
             "options": {"bits": 4, "group_size": 32, "symmetric": False}},
        ],
    }
    data.update(changes)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_release_passes_its_gates_and_writes_the_folder(stories_hf, tmp_path):
    out = tmp_path / "release"
    result = run_cli("release", str(_recipe(tmp_path, stories_hf)), "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    release = json.loads(result.stdout)
    assert release["passed"] and release["failures"] == []
    assert [a["name"] for a in release["artifacts"]] == ["int8-rtn", "int4-gptq"]
    for row in release["artifacts"]:
        metrics = row["eval"]["tinystories"]
        assert metrics["ppl"] > 1 and 0 <= metrics["kl_mean"] and 0 < metrics["top1_agreement"] <= 1
        assert row["gates"]["failures"] == [] and row["weight_bytes"] > 0
        folder = out / row["name"]
        assert {"README.md", "config.json", "infopt-manifest.json", "infopt-recipe.yaml"} <= set(_files(folder))
        assert f"{metrics['ppl']:.4f}" in (folder / "README.md").read_text()
    int8, int4 = (r["eval"]["tinystories"] for r in release["artifacts"])
    assert int8["kl_mean"] < int4["kl_mean"]  # more bits, closer to the source
    assert release["source"]["eval"]["tinystories"]["ppl"] == pytest.approx(int8["baseline_ppl"])
    # release.json: the resolved recipe (defaults filled in), versions, and every other file's sha256
    resolved = release["recipe"]["artifacts"][1]
    assert resolved["options"]["damp"] == 0.01 and resolved["gates"]["max_ppl_delta"] == 0.5
    assert {"torch", "transformers", "python"} <= set(release["versions"])
    files = {name: hashlib.sha256(data).hexdigest() for name, data in _files(out).items() if name != "release.json"}
    assert release["files"] == files
    assert (out / "quality-vs-size.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "RELEASE.md").read_text()
    assert "| int4-gptq | gptq | gptq | int4 g32 asym |" in table and "all passed" in table
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no work folder left


def test_a_failed_gate_exits_1_naming_the_artifact_and_figure(stories_hf, tmp_path):
    recipe = _recipe(tmp_path, stories_hf)
    data = yaml.safe_load(recipe.read_text())
    data["artifacts"][1]["gates"] = {"min_top1": 0.999}
    recipe.write_text(yaml.safe_dump(data))
    out = tmp_path / "release"
    result = run_cli("release", str(recipe), "--out", str(out))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: quality gate failed: int4-gptq: tinystories: top-1 agreement"), last
    assert "min_top1" in last and "int8-rtn" not in last
    release = json.loads((out / "release.json").read_text())  # written anyway, for the pipeline to upload
    assert not release["passed"] and "FAILED" in (out / "RELEASE.md").read_text()


def test_release_refuses_to_overwrite_or_overlap_inputs(stories_hf, tmp_path):
    recipe = _recipe(tmp_path, stories_hf)
    other = tmp_path / "not-a-release"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert_clean_failure(run_cli("release", str(recipe), "--out", str(other)), "already exists")
    assert_clean_failure(run_cli("release", str(recipe), "--out", str(other), "--force"),
                         "is not an infopt output")
    assert (other / "keep.txt").read_text() == "mine"
    assert_clean_failure(run_cli("release", str(recipe), "--out", str(stories_hf / "rel")), "overlaps an input")
    assert not (stories_hf / "rel").exists()


def test_resume_keeps_finished_artifacts_and_shared_work_is_done_once(stories_hf, tmp_path, monkeypatch):
    from infopt import workflows
    from infopt.eval import perplexity
    from infopt.release.pipeline import build_release, work_dir_for

    data = yaml.safe_load(_recipe(tmp_path, stories_hf).read_text())
    data["artifacts"].append({"name": "int4-awq", "method": "awq", "options": {"bits": 4, "group_size": 32}})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    out = tmp_path / "release"
    state = {"interrupt_at": "int4-gptq", "built": [], "calibration": 0, "log_probs": 0}
    real_quantize, real_calibration, real_log_probs = workflows.quantize, workflows.calibration_set, perplexity._log_probs

    def quantize(req, progress=None):
        if not req.dry_run:
            if req.name == state["interrupt_at"]:
                raise KeyboardInterrupt
            state["built"].append(req.name)
        return real_quantize(req, progress)

    def calibration_set(*args):
        state["calibration"] += 1
        return real_calibration(*args)

    def log_probs(*args):
        state["log_probs"] += 1
        return real_log_probs(*args)

    monkeypatch.setattr(workflows, "quantize", quantize)
    monkeypatch.setattr(workflows, "calibration_set", calibration_set)
    monkeypatch.setattr(perplexity, "_log_probs", log_probs)

    def run(**kwargs):
        state.update(built=[], calibration=0, log_probs=0)
        return build_release(recipe, out, **kwargs)

    with pytest.raises(KeyboardInterrupt):
        run()
    work = work_dir_for(out)
    assert state["built"] == ["int8-rtn"] and not out.exists()
    kept = (work / "int8-rtn" / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(InfoptError, match="pass --resume"):
        run()
    state["interrupt_at"] = "int4-awq"
    with pytest.raises(KeyboardInterrupt):
        run(resume=True)
    assert state["built"] == ["int4-gptq"]  # int8-rtn kept as it was
    assert (work / "int8-rtn" / "model.safetensors").stat().st_mtime_ns == kept
    # change one entry: on resume it is rebuilt (its fingerprint no longer matches), the unchanged one kept
    data["artifacts"][0]["options"]["bits"] = 4
    recipe.write_text(yaml.safe_dump(data))
    state["interrupt_at"] = None
    release = run(resume=True)
    assert state["built"] == ["int8-rtn", "int4-awq"]
    assert [r["reused"] for r in release["artifacts"]] == [False, True, False]
    assert release["artifacts"][0]["scheme"] == "int4 per-channel sym"
    assert state["calibration"] == 1  # one set of windows for both calibrated artifacts
    # the source's log-probabilities are computed once and reused: 2 artifacts scored + the source, 1 batch each
    assert state["log_probs"] == 3
    assert not work.exists() and (out / "release.json").is_file()


def test_stored_recipes_reproduce_their_checkpoint_byte_for_byte(stories_hf, tmp_path):
    out = tmp_path / "release"
    assert run_cli("release", str(_recipe(tmp_path, stories_hf)), "--out", str(out)).returncode == 0
    for name in ("int8-rtn", "int4-gptq"):
        again = tmp_path / f"again-{name}"
        stored = yaml.safe_load((out / name / "infopt-recipe.yaml").read_text())
        # a machine (or process) with another thread count: the recipe's recorded count is computed on again
        other = "1" if stored["threads"] != 1 else "2"
        result = run_cli("quantize", "--recipe", str(out / name / "infopt-recipe.yaml"), "--out", str(again),
                         env={"OMP_NUM_THREADS": other})
        assert result.returncode == 0, result.stderr
        assert _files(again) == _files(out / name), name
    # --threads chooses the count; it is recorded (and stated in a calibrated checkpoint's card)
    chosen = tmp_path / "chosen"
    result = run_cli("quantize", "--recipe", str(out / "int4-gptq" / "infopt-recipe.yaml"), "--threads", "1",
                     "--out", str(chosen))
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load((chosen / "infopt-recipe.yaml").read_text())["threads"] == 1
    assert "| threads | 1 (" in (chosen / "README.md").read_text()
    bad = run_cli("quantize", "--recipe", str(out / "int4-gptq" / "infopt-recipe.yaml"), "--threads", "0",
                  "--out", str(tmp_path / "bad"))
    assert_clean_failure(bad, "threads: 0 is not a thread count")
    assert not (tmp_path / "bad").exists()
    # a checkpoint made with flags stores its recipe too, and that recipe makes it again
    flags = tmp_path / "flags"
    result = run_cli("quantize", str(stories_hf), "--method", "hqq", "--group-size", "32", "--hqq-iterations", "5",
                     "--override", r"mlp\.down_proj$=skip", "--eval", "tinystories", "--eval-max-windows", "2",
                     "--out", str(flags))
    assert result.returncode == 0, result.stderr
    stored = yaml.safe_load((flags / "infopt-recipe.yaml").read_text())
    assert stored["artifacts"][0]["options"] == {"bits": 4, "group_size": 32, "symmetric": False, "iterations": 5,
                                                  "lp_norm": 0.7, "beta": 10.0, "kappa": 1.01}
    again = tmp_path / "flags-again"
    assert run_cli("quantize", "--recipe", str(flags / "infopt-recipe.yaml"), "--out", str(again)).returncode == 0
    assert _files(again) == _files(flags)


def test_the_ci_examples_run_their_recipe_and_have_the_job_structure_ci_expects(stories_hf, tmp_path):
    github = yaml.safe_load((ROOT / "examples/ci/github-actions.yml").read_text())
    on = github.get("on", github.get(True))  # YAML 1.1 reads the bare key `on` as true
    assert "push" in on or "workflow_dispatch" in on
    job = github["jobs"]["release"]
    assert job["runs-on"] and isinstance(job["steps"], list)
    for step in job["steps"]:
        assert isinstance(step, dict) and ("uses" in step) != ("run" in step), step
    runs = [s["run"] for s in job["steps"] if "run" in s]
    assert any("infopt release examples/ci/recipe.yaml --out release" in r for r in runs)
    assert any("torch==2.13.0" in r for r in runs)
    upload = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["with"]["path"].rstrip("/") == "release" and upload["if"] == "always()"

    gitlab = yaml.safe_load((ROOT / "examples/ci/gitlab-ci.yml").read_text())
    assert gitlab["stages"] == ["release"]
    job = gitlab["model-release"]
    assert job["stage"] in gitlab["stages"] and isinstance(job["script"], list)
    assert any("infopt release examples/ci/recipe.yaml --out release" in line for line in job["script"])
    assert job["artifacts"]["paths"] == ["release/"] and job["artifacts"]["when"] == "always"

    # the recipe itself, on stories260K converted where the job would have it (the model path is relative)
    work = tmp_path / "job"
    work.mkdir()
    shutil.copytree(stories_hf, work / "stories260K")
    result = run_cli("release", str(ROOT / "examples/ci/recipe.yaml"), "--out", "release", cwd=work)
    assert result.returncode == 0, result.stderr
    release = json.loads((work / "release" / "release.json").read_text())
    assert release["passed"] and len(release["artifacts"]) == 3


def test_dry_run_plans_every_artifact_and_writes_nothing(stories_hf, tmp_path):
    out = tmp_path / "release"
    result = run_cli("release", str(_recipe(tmp_path, stories_hf)), "--out", str(out), "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    plans = json.loads(result.stdout)
    assert [(p["name"], p["method"], p["format"]) for p in plans] == [("int8-rtn", "rtn", "compressed-tensors"),
                                                                      ("int4-gptq", "gptq", "gptq")]
    assert all(p["expected_linear_bytes"] < p["source_linear_bytes"] for p in plans)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]
