"""The persistent compilation cache: a second start of the same run loads its programs and compiles nothing."""

import json
import os

import pytest
from conftest import run_main
from shared import mlp_run_args

from mnist_flax import layout
from mnist_flax.training import compile_cache

# Two runs through main.py: in make test, not in make test-fast.
pytestmark = pytest.mark.slow


def _run(tiny_data_dir, workdir, cache: str):
    result = run_main(mlp_run_args(tiny_data_dir, workdir), env={compile_cache.ENV: cache})  # tests/shared.py's run
    assert result.returncode == 0, result.stderr[-2000:]
    with open(os.path.join(workdir, layout.FINAL_METRICS)) as f:
        return json.load(f)


def test_a_second_start_compiles_nothing_and_computes_the_same(tiny_data_dir, tmp_path, finished_mlp_run):
    cache = tmp_path / "xla"
    first = _run(tiny_data_dir, tmp_path / "first", str(cache))
    entries = sorted(os.listdir(cache))
    compiled = first["compilations"]
    assert entries and compiled["ahead_of_time"] >= 3 and compiled["from_cache"] == 0  # step, two predicts
    second = _run(tiny_data_dir, tmp_path / "second", str(cache))["compilations"]
    assert second["from_cache"] == second["ahead_of_time"] == compiled["ahead_of_time"]  # none compiled again
    assert sorted(os.listdir(cache)) == entries
    again = json.load(open(tmp_path / "second" / layout.FINAL_METRICS))
    assert again["test"] == first["test"] and again["best_validation"] == first["best_validation"]  # bit for bit
    # The same run without the cache (the tests turn it off: tests/conftest.py) computes the same numbers.
    off = json.load(open(os.path.join(finished_mlp_run, layout.FINAL_METRICS)))
    assert off["compilations"]["from_cache"] == 0 and off["test"] == first["test"]


@pytest.mark.parametrize(
    ("value", "env", "expected"),
    [
        ("auto", {}, "HOME/.cache/mnist_flax/xla"),
        ("auto", {"XDG_CACHE_HOME": "/xdg"}, "/xdg/mnist_flax/xla"),
        ("auto", {"JAX_COMPILATION_CACHE_DIR": "/jax"}, "/jax"),
        ("auto", {compile_cache.ENV: "/mine", "JAX_COMPILATION_CACHE_DIR": "/jax"}, "/mine"),
        ("auto", {compile_cache.ENV: "off"}, None),
        ("off", {compile_cache.ENV: "/mine"}, None),
        ("/some/folder", {compile_cache.ENV: "off"}, "/some/folder"),  # a folder in the config is meant
    ],
)
def test_where_the_cache_is(monkeypatch, tmp_path, value, env, expected):
    for name in (compile_cache.ENV, "JAX_COMPILATION_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    for name, setting in env.items():
        monkeypatch.setenv(name, setting)
    folder = compile_cache.location(value)
    assert folder == (expected.replace("HOME", str(tmp_path)) if expected else None)
