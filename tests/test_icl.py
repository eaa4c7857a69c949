"""In-context editing (mechedit.editing.icl): no weight changes, the context states each new fact and reaches the
prompt through ``handle.prompt``, apply/restore/save/load behave as for every handle, bad templates fail."""

from __future__ import annotations

import pytest
from test_finetune import TINY_REQUEST, embedded_request, same_weights, snapshot
from typer.testing import CliRunner

from mechedit.cli import app
from mechedit.data import EditRecord
from mechedit.editing import EditHandle
from mechedit.editing.icl import ICLHyperParams, context_for, icl
from mechedit.editing.methods import edit
from mechedit.errors import InputError, MecheditError
from mechedit.evaluation.counterfact import answer_nll


@pytest.fixture(scope="module")
def world_request(embedded):
    return embedded_request(embedded)


def test_context_states_the_facts_and_reaches_the_prompt(embedded, world_request):
    before = snapshot(embedded)
    seen = []
    with edit(embedded, [world_request], "icl", progress=lambda *a: seen.append(a)) as h:
        assert same_weights(embedded, before) and h.deltas == {}
        assert h.context == f"{world_request.prompt} {world_request.target_new}. "
        assert h.prompt(world_request.prompt) == h.context + world_request.prompt
        # the context makes the new answer more likely on the edit prompt (the embedded model copies weakly:
        # it rarely flips the answer, see docs/results/baselines-embedded)
        with_ctx, without = answer_nll(embedded, [(h.prompt(world_request.prompt), world_request.target_new),
                                                  (world_request.prompt, world_request.target_new)])
        assert with_ctx < without
    assert seen == [("context", 1, 1)]
    assert same_weights(embedded, before)


def test_answer_spacing_repeat_and_several_requests():
    sums = EditRecord(case_id=1, template="{}+2=", subject="2", target_new="5")
    hp = ICLHyperParams(template="New fact: {prompt}{answer}\n", repeat=2)
    assert context_for([TINY_REQUEST, sums], hp) == ("New fact: Yesterday I met Voupeis Draexmir Paris\n"
                                                     "New fact: 2+2=5\n") * 2


def test_apply_restore_save_load_round_trip(models, tmp_path):
    m = models("llama")
    before = snapshot(m)
    h = icl(m, [TINY_REQUEST])
    assert h.applied
    with pytest.raises(MecheditError, match="already applied"):
        h.apply(m)
    h.save(tmp_path / "edit")
    h.restore()
    assert not h.applied and same_weights(m, before)
    loaded = EditHandle.load(tmp_path / "edit")
    assert loaded.context == h.context and loaded.deltas == {} and loaded.method == "icl"
    with loaded.apply(m):
        assert loaded.prompt("x") == h.context + "x"
    assert same_weights(m, before)


@pytest.mark.parametrize("overrides, needle", [
    ({"template": "{prompt} {nope}. "}, "unknown field"), ({"template": "{prompt}. "}, "never states"),
    ({"template": "  "}, "non-empty"), ({"repeat": 0}, "repeat"), ({"template": "{prompt"}, "not a valid"),
])
def test_bad_hparams_fail_clearly(overrides, needle):
    with pytest.raises(InputError, match=needle):
        ICLHyperParams().with_overrides(overrides)


def test_context_longer_than_the_model_is_refused(models):
    with pytest.raises(InputError, match="context"):
        icl(models("llama"), [TINY_REQUEST], ICLHyperParams(repeat=40))


def test_cli_edit_with_icl(tiny_dir):
    res = CliRunner().invoke(app, ["edit", "--model", str(tiny_dir("llama")), "--method", "icl", "--prompt",
                                   TINY_REQUEST.prompt, "--subject", TINY_REQUEST.subject, "--target-new", "Paris",
                                   "--no-evaluate"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "Paris" in res.output
