"""analyses/rome_update_variants.py: variant names parse into (statistics, key, λ), and a pooled summary counts
each record once with the paired NS interval. The run itself needs SmolLM2 and is not tested here."""

from __future__ import annotations

import json

import pytest

import mechedit.editing  # noqa: F401  (importing mechedit.evaluation first hits a circular import in the library)


@pytest.fixture(scope="module")
def rv(analysis_script):
    return analysis_script("rome_update_variants")


def test_variant_names(rv):
    assert rv.variant_stats(None, "identity", 6, None, {}) == (None, "mean", None)
    assert rv.variant_stats(None, "identity+bare", 6, None, {}) == (None, "bare", None)
    assert rv.variant_stats(None, "identity+bare-u+lam500", 6, None, {}) == (None, "bare-u", 500.0)
    for bad in ("identity+bare+lam5", "identity+lamx", "nonsense"):
        with pytest.raises(SystemExit):
            rv.variant_stats(None, bad, 6, None, {})


def _run(path, seed, records):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"n": len(records), "seed": seed, "layer": 6, "variants": ["v"]}))
    lines = []
    for case_id, before, after in records:  # NS before / after; ES, PS always succeed
        s = lambda ns: {"efficacy_success": 1.0, "paraphrase_success": 1.0, "neighborhood_success": ns,  # noqa: E731
                        "neighborhood_magnitude": ns - 0.5}
        lines.append({"case_id": case_id, "unedited": s(before), "variants": {"v": {"scores": s(after)}},
                      "cpu_s": 1.0})
    (path / "records.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))


def test_pool_counts_a_shared_record_once_and_pairs_the_ns_change(rv, tmp_path):
    _run(tmp_path / "a", 0, [(1, 1.0, 0.0), (2, 1.0, 1.0), (3, 0.0, 1.0)])
    _run(tmp_path / "b", 1, [(3, 0.0, 1.0), (4, 1.0, 0.0), (5, 1.0, 1.0)])  # record 3 is in both runs
    out = tmp_path / "pooled"
    out.mkdir()
    summary = rv.summarise(out, [tmp_path / "a", tmp_path / "b"])
    row = summary["rows"]["v"]
    assert summary["n_edited"] == 5
    assert (row["ns_right_to_wrong"], row["ns_wrong_to_right"]) == (2, 1)
    b, c, n = 2, 1, 5
    half = 1.96 * (b + c - (c - b) ** 2 / n) ** 0.5 / n
    assert row["ns_change_interval"] == pytest.approx([100 * ((c - b) / n - half), 100 * ((c - b) / n + half)])
    assert row["neighborhood_success"]["value"] - summary["rows"]["unedited"]["neighborhood_success"]["value"] == \
        pytest.approx(100 * (c - b) / n)
    assert "pooled" in (out / "summary.md").read_text()
