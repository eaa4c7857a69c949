"""Every editing method in the table runs from the CLI on the embedded model with its defaults, and writes a
handle that loads back as the same method and re-applies to a fresh copy of the model."""

import pytest
from typer.testing import CliRunner

from mechedit.cli import app
from mechedit.editing import EditHandle
from mechedit.editing.methods import METHODS

# Methods whose default edit of the default request makes the edit prompt answer the new target.
TAKES = {"rome", "memit", "seq-rome", "alphaedit", "seq-memit", "ia3", "ia3-unlearn-learn", "ft", "ft-l", "lora", "reg-lora"}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_edits_from_the_cli(method, tmp_path):
    import mechedit

    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["edit", "--method", method, "--no-evaluate", "--out", str(out)])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].startswith(f"{method} edit ("), lines[0]
    edit_line = next(line for line in lines if line.strip().startswith("edit "))
    before, after = edit_line.split("->")
    if method in TAKES:
        assert "architect" in after and "architect" not in before, edit_line
    handle = EditHandle.load(out / "edit")
    assert handle.method == method
    fresh = mechedit.load()
    fp = fresh.fingerprint()
    handle.apply(fresh)
    assert (fresh.fingerprint() != fp) == bool(handle.deltas)  # weights change unless in-context
    handle.restore()
    assert fresh.fingerprint() == fp


# Small settings so each method runs in about a second on a tiny random model (no world file there: ELM gets its
# concept text, ROME-family methods a few hundred statistics texts).
TINY_HP = {
    "rome": ["mom2_n_samples=200", "prefix_lengths=[[5,2]]", "layer=1"],
    "memit": ["mom2_n_samples=200", "prefix_lengths=[[5,2]]", "layers=[1]"],
    "seq-rome": ["rome.mom2_n_samples=200", "rome.prefix_lengths=[[5,2]]", "rome.layer=1"],
    "alphaedit": ["memit.mom2_n_samples=200", "memit.prefix_lengths=[[5,2]]", "memit.layers=[1]"],
    "seq-memit": ["memit.mom2_n_samples=200", "memit.prefix_lengths=[[5,2]]", "memit.layers=[1]"],
    "ia3": ["modules=[\"1.mlp_out\"]", "steps=3"],
    "ia3-unlearn-learn": ["modules=[\"1.mlp_out\"]", "steps=3", "unlearn_steps=2"],
    "ft": ["steps=3"], "ft-l": ["steps=3"], "lora": ["steps=3"],
    "reg-lora": ["steps=3", "retention=[\"The market is near the => hill\"]"], "icl": [],
    "elm": ["concept=the old river", "layers=[1]", "steps=2", "retain_source=none",
            "retain_text=[\"The market is near the hill.\"]"],
}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_from_the_cli_on_tiny_configs(method, arch, tiny_dir, tmp_path):
    assert set(TINY_HP) == set(METHODS)
    args = ["edit", "--model", str(tiny_dir(arch)), "--method", method, "--prompt", "Nomvou Datar was born in",
            "--subject", "Nomvou Datar", "--target-new", "Paris", "--target-true", "Oslo", "--no-evaluate",
            "--out", str(tmp_path / "out")]
    for hp in TINY_HP[method]:
        args += ["--hp", hp]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert EditHandle.load(tmp_path / "out" / "edit").method == method


# -- a model's own defaults (mechedit-hparams.json) --------------------------------------------------------------


def test_model_defaults_sit_under_the_callers_overrides(embedded, tmp_path):
    from mechedit.editing.methods import MODEL_HPARAMS_FILE, make_hparams, model_defaults
    from mechedit.editing.rome import ROMEHyperParams

    own = model_defaults(embedded, "rome")
    assert own and (embedded.path / MODEL_HPARAMS_FILE).is_file()  # the embedded model ships its own
    hp = make_hparams("rome", None, embedded)
    assert all(getattr(hp, k) == v for k, v in own.items()) and hp != ROMEHyperParams()
    assert make_hparams("rome", None) == ROMEHyperParams()  # no model: the class defaults
    assert make_hparams("rome", {"clamp_norm_factor": 3.0}, embedded).clamp_norm_factor == 3.0  # caller wins
    assert all(getattr(make_hparams("rome", ["layer=2"], embedded), k) == v for k, v in own.items())
    given = ROMEHyperParams(layer=1)
    assert make_hparams("rome", given, embedded) is given  # an object is used as it is
    assert model_defaults(embedded, "lora") == {}


def test_a_broken_model_defaults_file_is_one_clear_error(tmp_path):
    from types import SimpleNamespace

    from mechedit.editing.methods import MODEL_HPARAMS_FILE, make_hparams
    from mechedit.errors import DataFormatError

    model = SimpleNamespace(path=tmp_path)
    for text, match in (("{not json", "not readable"), ('{"rome": 3}', "must map"),
                        ('{"rome": {"no_such_field": 1}}', "no_such_field"),
                        ('{"rome": {"clamp_norm_factor": -1}}', "clamp_norm_factor")):
        (tmp_path / MODEL_HPARAMS_FILE).write_text(text)
        with pytest.raises(DataFormatError, match=match):
            make_hparams("rome", None, model)
