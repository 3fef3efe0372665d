"""Recipes: built-ins load, files in three syntaxes load, and every bad key or type is named."""

from __future__ import annotations

import json

import pytest

from qpass.errors import ConfigError
from qpass.qconfig import ActGranularity
from qpass.recipe import Recipe, builtin_names, get_recipe


def test_builtins_load_and_round_trip(tmp_path):
    names = builtin_names()
    assert {"w8a8", "w8a8-smooth"} <= set(names)
    for name in names:
        recipe = get_recipe(name)
        path = tmp_path / f"{name}.yaml"
        path.write_text(recipe.to_yaml())
        assert get_recipe(str(path)) == recipe


def test_passes_only_recipe():
    r = get_recipe({"passes": [{"smooth_quant": {"alpha": 0.7}}], "weights": None, "activations": None})
    assert not r.quantizes
    assert r.passes[0].config.alpha == 0.7


def test_json_and_toml_files(tmp_path):
    data = {
        "passes": [{"smooth_quant": {"alpha": "auto"}}],
        "activations": {"granularity": "per_token", "dynamic": True},
    }
    (tmp_path / "r.json").write_text(json.dumps(data))
    r = get_recipe(str(tmp_path / "r.json"))
    assert r.activations.granularity is ActGranularity.PER_TOKEN
    (tmp_path / "r.toml").write_text('[[passes]]\nsmooth_quant = {alpha = 0.5}\n[weights]\nformat = "int8"\n')
    assert get_recipe(str(tmp_path / "r.toml")).weights.format == "int8"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"pases": []}, "recipe key 'pases' is unknown"),
        ({"weights": {"bits": 4}}, "recipe key 'weights.bits' is unknown"),
        ({"weights": {"format": "int9"}}, "weights.format.*not supported yet"),
        ({"weights": {"symmetric": "yes"}}, "weights.symmetric': expected bool, got str"),
        (
            {"activations": {"granularity": "per_row"}},
            "activations.granularity': expected 'per_tensor' \\| 'per_token'",
        ),
        ({"activations": {"granularity": "per_token"}}, "per_token activation scales must be dynamic"),
        ({"passes": [{"smooth_quant": {"alpha": 2}}]}, "smooth_quant.alpha': 2.0 is outside"),
        ({"passes": [{"smooth_quant": {"beta": 1}}]}, "smooth_quant.beta' is unknown"),
        ({"passes": ["smooth_quant", {"a": 1, "b": 2}]}, r"passes\[1\]': expected \{pass_name"),
        ({"target": "tensorrt"}, "recipe key 'target'"),
        ({"weights": {"clip_objective": "output"}}, "clip_objective': 'output' needs 'clip_search: true'"),
        ({"weights": {"clip_search": True, "clip_objective": "layer"}}, "clip_objective': expected"),
        (
            {"weights": {"clip_search": True, "clip_objective": "output", "algo": "gptq"}},
            "clip_objective': 'output' is an RTN option",
        ),
    ],
)
def test_bad_recipes_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        Recipe.from_dict(data)


def test_unknown_name_and_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown recipe 'w9a9'.*built-in recipes: .*w8a8"):
        get_recipe("w9a9")
    with pytest.raises(ConfigError, match="cannot read recipe"):
        get_recipe(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("passes: [smooth_quant: {alpha: 0.5}\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid yaml"):
        get_recipe(str(bad))
