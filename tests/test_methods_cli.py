"""Every editing method in the table runs from the CLI on the embedded model with its defaults, and writes a
handle that loads back as the same method and re-applies to a fresh copy of the model."""

import pytest
from typer.testing import CliRunner

from mechedit.cli import app
from mechedit.editing import EditHandle
from mechedit.editing.methods import METHODS

# Methods whose default edit of the default request makes the edit prompt answer the new target.
TAKES = {"rome", "memit", "seq-rome", "alphaedit", "ia3", "ia3-unlearn-learn", "ft", "ft-l", "lora", "reg-lora"}


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
