"""The recipe schema and the method registry under it: documented recipes load, bad ones fail naming the field."""

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from infopt.cli.method_options import FLAGS, method_config
from infopt.errors import InfoptError
from infopt.quant.registry import METHODS
from infopt.release.recipe import load_recipe, parse_recipe
from tests.test_cli import assert_clean_failure
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
BASE = {"model": "some/model", "artifacts": [{"name": "a", "method": "rtn"}]}


def _documented_recipes() -> list[tuple[str, dict]]:
    found = [(str(p.relative_to(ROOT)), yaml.safe_load(p.read_text()))
             for p in [*ROOT.glob("examples/ci/recipe*.yaml"), *ROOT.glob("infopt/recipes/*.yaml")]]
    for i, block in enumerate(re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)):
        data = yaml.safe_load(block)
        if isinstance(data, dict) and "artifacts" in data:
            found.append((f"README.md yaml block {i}", data))
    return found


def test_every_documented_recipe_is_accepted():
    recipes = _documented_recipes()
    assert len(recipes) >= 3, [name for name, _ in recipes]  # the CI example, the demo's, the README's
    for name, data in recipes:
        recipe = parse_recipe(data, name)
        assert recipe.artifacts, name


def _with(path: str, value, base=None) -> dict:
    data = yaml.safe_load(yaml.safe_dump(base or BASE))
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    target = data
    for key in keys[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[keys[-1]]
    else:
        target[keys[-1]] = value
    return data


_DELETE = object()
CALIBRATED = {**BASE, "calibration": {"dataset": "tinystories"},
              "artifacts": [{"name": "a", "method": "gptq", "options": {"bits": 4}}]}


@pytest.mark.parametrize("data,words", [
    (_with("colour", "red"), "recipe: colour: unknown key"),
    (_with("artifacts.0.bits", 4), "artifacts[0].bits: unknown key"),
    (_with("calibration", {"dataset": "x", "samples": "many"}, CALIBRATED), "calibration.samples: input should be a valid integer"),
    (_with("artifacts.0.options", {"bits": "4"}), "artifacts[0].options.bits: expected int, got str"),
    (_with("artifacts.0.options", {"bits": 5}), "artifacts[0].options.bits: invalid --bits 5"),
    (_with("artifacts.0.options", {"damp": 0.1}), "artifacts[0].options.damp: not an option of method rtn"),
    (_with("artifacts.0.options", {"group_size": 64, "block_size": 64}), "block_size: not an option of method rtn"),
    (_with("artifacts.0.options", {"damp": 2.0}, CALIBRATED), "artifacts[0].options.damp: invalid --damp 2.0"),
    (_with("artifacts.0.method", "gptq"), "method gptq needs calibration data"),
    (_with("calibration", {"dataset": "tinystories"}), "calibration: no artifact uses it"),
    (_with("model", _DELETE), "model: field required"),
    (_with("artifacts", []), "artifacts: list should have at least 1 item"),
    (_with("artifacts.0.method", "awq2"), "artifacts[0].method: 'awq2' is not a method"),
    (_with("artifacts.0.format", "exl2"), "format 'exl2' is not available"),
    (_with("artifacts.0.format", "gguf"), "release artifacts are folders"),
    (_with("artifacts.0.format", "bnb"), "stores four-bit weights, not those of --method rtn"),
    (_with("artifacts.0.name", "../escape"), "artifacts[0].name: string should match pattern"),
    (_with("artifacts", [{"name": "a", "method": "rtn"}, {"name": "a", "method": "hqq"}]), "name 'a' is used twice"),
    (_with("gates", {"max_kl": 0.1}), "gates need an evaluation section"),
    (_with("gates", {"min_top1": 2}), "gates.min_top1: input should be less than or equal to 1"),
    (_with("artifacts.0.overrides", ["down_proj=9"]), "invalid bits 9"),
    (["model", "x"], "a recipe is a mapping"),
])
def test_bad_recipes_fail_with_one_line_naming_the_field(data, words):
    with pytest.raises(InfoptError) as info:
        parse_recipe(data)
    message = str(info.value)
    assert "\n" not in message
    assert words.lower() in message.lower(), message


def _foreign_options():
    """(method, option) for every option that some method has and this one lacks."""
    owned = {name: {f.name for f in dataclasses.fields(m.config)} for name, m in METHODS.items()}
    every = set().union(*owned.values())
    return [(name, option) for name, mine in owned.items() for option in sorted(every - mine)]


@pytest.mark.parametrize("method,option", _foreign_options())
def test_recipe_refuses_every_option_its_method_does_not_use(method, option):
    data = {"model": "m", "artifacts": [{"name": "a", "method": method, "options": {option: 1}}]}
    if METHODS[method].calibrated:
        data["calibration"] = {"dataset": "tinystories"}
    with pytest.raises(InfoptError, match=f"options.{option}: not an option of method {method}"):
        parse_recipe(data)


def _foreign_flags():
    owned = {name: {f.metadata["flag"] for f in dataclasses.fields(m.config)} for name, m in METHODS.items()}
    return [(name, param) for name in METHODS for param, flag in FLAGS.items() if flag.flag not in owned[name]]


@pytest.mark.parametrize("method,param", _foreign_flags())
def test_every_flag_its_method_does_not_use_is_refused(method, param):
    value = {bool: True, int: 1, float: 0.5, str: "x"}[FLAGS[param].kind]
    with pytest.raises(InfoptError, match=f"does not apply to --method {method}"):
        method_config(method, {param: value})


def test_flags_reach_the_config_fields_they_belong_to():
    config = method_config("gptq", {"opt_bits": 3, "opt_sym": False, "opt_damp": 0.05, "opt_gptq_block_size": 64,
                                    "opt_act_order": True, "opt_forward_dtype": "float32"})
    assert (config.bits, config.symmetric, config.damp, config.block_size, config.act_order) == (3, False, 0.05, 64, True)
    assert method_config("nf4", {"opt_block_size": 128}).block_size == 128
    assert method_config("awq", {}).symmetric is False and method_config("rtn", {}).symmetric is True  # each its own


def test_quantize_with_a_recipe_refuses_method_flags(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(BASE))
    result = run_cli("quantize", "--recipe", str(recipe), "--bits", "8", "--out", str(tmp_path / "o"))
    assert_clean_failure(result, "--recipe gives the model and every method option; drop --bits")
    assert not (tmp_path / "o").exists()


def test_recipe_file_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(InfoptError, match=r"not valid YAML at line \d"):
        load_recipe(bad)
    with pytest.raises(InfoptError, match="no such recipe file"):
        load_recipe(tmp_path / "missing.yaml")
    bad.write_bytes(b"\xff\xfe model")
    with pytest.raises(InfoptError, match="not UTF-8"):
        load_recipe(bad)
    two = tmp_path / "two.yaml"
    two.write_text(yaml.safe_dump({**BASE, "artifacts": [{"name": "a", "method": "rtn"}, {"name": "b", "method": "rtn"}]}))
    assert_clean_failure(run_cli("quantize", "--recipe", str(two), "--out", str(tmp_path / "o")), "use `infopt release`")
