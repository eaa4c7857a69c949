"""Which part of ROME's rank-one update costs SmolLM2's neighbours? One value per edit, several updates.

Issue #4 asks ROME on 100 random CounterFact records of SmolLM2 for ES >= 99 and an NS within 3 points of the
unedited model's; the pinned run (``analyses/counterfact_smollm2.py``) reached ES 97.0 and NS -8.1. ROME's update
is ``ΔW = (v* - W k*) ⊗ C⁻¹k* / (k*ᵀ C⁻¹ k*)``: the value ``v*`` (the expensive part, an optimisation) does not
depend on the key statistics ``C`` nor on which key is written, so one value per record can be put through several
updates and each scored on the same record. Variants (``--variants``, comma-separated):

* ``model-N``: ``C`` from N texts sampled by the model (64 tokens, ROME's fallback when no corpus is given;
  ``model-1000`` is the pinned run's, so that column must reproduce its scores);
* ``identity``: ``C = I`` (ROME without statistics);
* ``cf-text``: ``C`` from CounterFact itself - the sentence "prompt + true target" of every record *not* drawn
  for the study (~21,800 short factual sentences: the kind of text neighbour prompts are); ``cf-clean``: the same
  without the records whose subject is named in any drawn record's prompt, paraphrase or neighbour prompt (so
  no statistics text is about a subject the scores ask about);
* ``bare-key``: original ROME's denominator (the bare prompt's key, not the prefix-averaged one; r-ROME's fix
  undone), with ``model-1000``; ``X+bare``: the same with variant X's statistics.
* ``X+bare-u``: the bare prompt's key in both places, ``u = C⁻¹k_bare``: r-ROME's consistency with the key the
  edit prompt actually produces. Of all rank-one updates that write ``δ`` exactly at ``k_bare`` it moves keys
  distributed like ``C`` least (expected ``‖ΔW k'‖² = ‖δ‖² / k_bareᵀC⁻¹k_bare``; original ROME's ``u = C⁻¹k̄``
  pays a Cauchy-Schwarz factor ``(k̄ᵀC⁻¹k̄)(k_bareᵀC⁻¹k_bare) / (k_bareᵀC⁻¹k̄)²`` more).
* ``X+lamL`` (after any key suffix, e.g. ``cf-clean+bare-u+lam2000``): MEMIT's covariance-weighted solve for
  this one key, ``ΔW = δ (C⁻¹k)ᵀ / (λ + kᵀC⁻¹k)`` with ``λ = L``: the write is scaled by ``g / (λ + g)``,
  ``g = kᵀC⁻¹k``, so a key that looks like many ordinary keys (small ``g``) is written less.

Each record's line in ``records.jsonl`` holds every variant's scores and the value's evidence; the run resumes
from it. An update ROME refuses as degenerate (``max_update_ratio``, ``min_key_alignment``) leaves the model
unedited: that variant's scores are the unedited model's, marked ``refused``. ``--summarise`` writes
``summary.md`` / ``summary.json``: ES / PS / NS per variant with Wilson intervals, NS paired against the
unedited model on the same records (right -> wrong / wrong -> right), and the mean |Δ margin| on neighbour
prompts (how much the neighbours move, flipped or not).

    OMP_NUM_THREADS=1 python analyses/rome_update_variants.py --n 100 --out docs/results/rome-update-variants
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact.json"
KEYS = ("efficacy_success", "paraphrase_success", "neighborhood_success")
SHORT = {"efficacy_success": "ES", "paraphrase_success": "PS", "neighborhood_success": "NS"}


def variant_stats(model, name: str, layer: int, hp, cf_text: dict[str, list[str]]):
    """(LayerStats or None, which key: "mean" | "bare" | "bare-u", λ or None) for one variant name."""
    base, _, lam = name.rpartition("+lam")
    if base:
        if not lam.isdigit() or base.endswith("+bare") or base == "bare-key":
            raise SystemExit(f"variant {name!r}: +lamL takes an integer L, after a mean or bare-u key")
        return (*variant_stats(model, base, layer, hp, cf_text)[:2], float(lam))
    return (*_stats_and_key(model, name, layer, hp, cf_text), None)


def _stats_and_key(model, name: str, layer: int, hp, cf_text: dict[str, list[str]]):
    from mechedit.editing.rome.layer_stats import layer_stats

    if name == "identity":
        return None, "mean"
    if name == "bare-key":
        return _stats_and_key(model, "model-1000", layer, hp, cf_text)[0], "bare"
    for suffix in ("+bare", "+bare-u"):
        if name.endswith(suffix):
            return _stats_and_key(model, name[: -len(suffix)], layer, hp, cf_text)[0], suffix[1:]
    if name in cf_text:
        return layer_stats(model, layer, cf_text[name], len(cf_text[name]), max_tokens=hp.mom2_max_tokens), "mean"
    if name.startswith("model-"):
        return layer_stats(model, layer, "model", int(name.split("-", 1)[1]), max_tokens=hp.mom2_max_tokens,
                           seed=hp.seed, top_k=hp.prefix_top_k), "mean"
    raise SystemExit(f"unknown variant {name!r}")


def run(args) -> None:
    import counterfact_smollm2 as cf  # the pinned hyperparameters and the seeded draw of the CounterFact study
    import torch

    import mechedit
    from mechedit.data import read_counterfact
    from mechedit.editing.rome.compute_u import compute_keys, compute_u
    from mechedit.editing.rome.compute_v import compute_v
    from mechedit.editing.rome.rome_main import (
        _check_request,
        _rank_one,
        context_templates,
    )
    from mechedit.errors import InputError, MecheditError
    from mechedit.evaluation.counterfact import SCORE_KEYS, rewrite_scores

    torch.set_num_threads(args.threads)
    hp = cf.make_hp("rome", args.hp)
    layer = hp.layer
    model = mechedit.load(args.model)
    all_records = read_counterfact(args.data)
    records = cf.draw(all_records, args.n, args.seed)
    drawn = {r.case_id for r in records}
    cf_text = {"cf-text": [f"{r.prompt} {r.target_true}" for r in all_records
                           if r.case_id not in drawn and r.target_true]}
    # the same without any record whose subject is named in a drawn record's prompts (edit, paraphrase, neighbour)
    cf_text["cf-clean"] = cf.statistics_text(all_records, records)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "records.jsonl"
    done = {e["case_id"] for e in read_lines(log)}
    config = {"model": model.name, "model_fingerprint": model.fingerprint(), "data": str(args.data), "n": args.n,
              "seed": args.seed, "threads": torch.get_num_threads(), "layer": layer, "variants": variants,
              "hparams": hp.to_dict(), "cf_text_samples": {k: len(v) for k, v in cf_text.items()}}
    stats = {}
    for v in variants:
        t, c = time.perf_counter(), time.process_time()
        stats[v] = variant_stats(model, v, layer, hp, cf_text)
        s = stats[v][0]
        config.setdefault("stats", {})[v] = None if s is None else {
            "n_samples": s.n_samples, "n_tokens": s.n_tokens, "source": s.source,
            "wall_s": round(time.perf_counter() - t, 1), "cpu_s": round(time.process_time() - c, 1)}
        print(f"statistics {v}: {config['stats'][v]}", flush=True)
    (args.out / "config.json").write_text(json.dumps(config, indent=1))

    weight = model.module(layer, "mlp_out").weight
    for rec in records:
        if rec.case_id in done:
            continue
        entry = {"case_id": rec.case_id, "prompt": rec.prompt, "target_true": rec.target_true,
                 "target_new": rec.target_new}
        t, c = time.perf_counter(), time.process_time()
        entry["unedited"] = {k: v for k, v in rewrite_scores(model, rec).items() if k in SCORE_KEYS}
        try:
            _check_request(model, rec)
        except InputError as e:
            entry["skipped"] = str(e)
            append(log, entry)
            continue
        templates = context_templates(model, hp)
        keys = compute_keys(model, rec, layer, templates, hp.key_position)
        value = compute_v(model, rec, layer, templates, hp)
        entry["value"] = {"target_prob": value.target_prob, "delta_norm": float(value.delta.norm()),
                          "on_clamp": value.on_clamp(hp.clamp_norm_factor), "steps": len(value.losses)}
        entry["value_cpu_s"] = round(time.process_time() - c, 2)
        entry["variants"] = {}
        saved = weight.detach().clone()
        for v in variants:
            s, key, lam = stats[v]
            u = compute_u(keys.bare if key == "bare-u" else keys.mean, s)
            k = (keys.mean if key == "mean" else keys.bare).double().cpu()
            g = float(k @ (k if s is None else torch.linalg.solve(s.mom2.double(), k)))  # kᵀC⁻¹k
            share = 1.0 if lam is None else g / (lam + g)
            try:
                update, _, alignment, ratio = _rank_one(value.delta * share, k, u, weight, model.conv1d, layer, hp)
            except MecheditError as e:  # ROME refuses a degenerate update: the model stays as it was
                entry["variants"][v] = {"scores": entry["unedited"], "refused": str(e)}
                continue
            try:
                weight.data.add_(update)
                scores = {k2: v2 for k2, v2 in rewrite_scores(model, rec).items() if k2 in SCORE_KEYS}
            finally:
                weight.data.copy_(saved)
            entry["variants"][v] = {"scores": scores, "update_ratio": ratio, "key_alignment": alignment,
                                    "whitened_key_sq_norm": g, "share_written": share}
        if not torch.equal(weight, saved):
            raise SystemExit("the weight did not come back bit-exactly")
        entry["cpu_s"] = round(time.process_time() - c, 2)
        entry["wall_s"] = round(time.perf_counter() - t, 2)
        entry["load_average"] = os.getloadavg()[0]
        append(log, entry)
        print(json.dumps({"case_id": rec.case_id, "cpu_s": entry["cpu_s"],
                          **{v: [entry["variants"][v]["scores"][k] for k in KEYS] for v in variants}}), flush=True)
    summarise(args.out)


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def append(path: Path, entry: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(entry) + "\n")


def merge(out: Path, other: Path) -> None:
    """Add the variants of a second run over the same records (``other``) to ``out``'s records and config. The
    value is deterministic, so both runs must have optimised the same one per record (checked)."""
    extra = {e["case_id"]: e for e in read_lines(other / "records.jsonl") if "variants" in e}
    entries = read_lines(out / "records.jsonl")
    for e in entries:
        x = extra.get(e["case_id"])
        if "variants" not in e or x is None:
            continue
        if x["value"] != e["value"]:
            raise SystemExit(f"record {e['case_id']}: the two runs optimised different values")
        e["variants"].update({k: v for k, v in x["variants"].items() if k not in e["variants"]})
    (out / "records.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    config, more = json.loads((out / "config.json").read_text()), json.loads((other / "config.json").read_text())
    config["variants"] += [v for v in more["variants"] if v not in config["variants"]]
    config["stats"].update({k: v for k, v in more["stats"].items() if k not in config["stats"]})
    config["cf_text_samples"] = more["cf_text_samples"]
    (out / "config.json").write_text(json.dumps(config, indent=1))


def summarise(out: Path, sources: list[Path] | None = None) -> dict:
    """Summary of ``out``'s records, or (``sources``) of several runs' records pooled into ``out`` (a record in two
    runs counts once, as the first has it; variants: those every pooled record has)."""
    from mechedit.evaluation.stats import wilson

    dirs = sources or [out]
    entries, seen = [], set()
    for d in dirs:
        for e in read_lines(d / "records.jsonl"):
            if "variants" in e and e["case_id"] not in seen:
                seen.add(e["case_id"])
                entries.append(e)
    configs = [json.loads((d / "config.json").read_text()) for d in dirs]
    config = configs[0]
    if len({c["layer"] for c in configs}) > 1:
        raise SystemExit("the pooled runs edit different layers")
    variants = [v for v in config["variants"] if all(v in e["variants"] for e in entries)]

    def rate(values: list[float]) -> dict:
        k = sum(1 for x in values if x > 0.5)
        lo, hi = wilson(k, len(values))
        return {"value": 100 * k / len(values), "lo": 100 * lo, "hi": 100 * hi, "n": len(values)}

    def margin(scores: dict) -> float | None:
        return scores.get("neighborhood_magnitude")

    rows = {"unedited": {k: rate([e["unedited"][k] for e in entries if e["unedited"][k] is not None])
                         for k in KEYS}}
    for v in variants:
        row = {k: rate([e["variants"][v]["scores"][k] for e in entries
                        if e["variants"][v]["scores"][k] is not None]) for k in KEYS}
        pairs = [(e["unedited"]["neighborhood_success"], e["variants"][v]["scores"]["neighborhood_success"])
                 for e in entries if e["unedited"]["neighborhood_success"] is not None]
        row["ns_right_to_wrong"] = sum(1 for a, b in pairs if a > 0.5 >= b)
        row["ns_wrong_to_right"] = sum(1 for a, b in pairs if b > 0.5 >= a)
        # the paired change of NS (points) with a normal-approximation 95% interval over the discordant pairs
        b, c, n = row["ns_right_to_wrong"], row["ns_wrong_to_right"], len(pairs)
        half = 1.96 * max(b + c - (c - b) ** 2 / n, 0.0) ** 0.5 / n
        row["ns_change_interval"] = [100 * ((c - b) / n - half), 100 * ((c - b) / n + half)]
        moves = [abs(e["variants"][v]["scores"]["neighborhood_magnitude"] - e["unedited"]["neighborhood_magnitude"])
                 for e in entries if e["unedited"].get("neighborhood_magnitude") is not None]
        row["neighbour_margin_move_mean"] = sum(moves) / len(moves)
        row["es_failures"] = [e["case_id"] for e in entries if e["variants"][v]["scores"]["efficacy_success"] <= 0.5]
        row["refused"] = [e["case_id"] for e in entries if "refused" in e["variants"][v]]
        rows[v] = row
    summary = {"n_edited": len(entries), "runs": [str(d) for d in dirs], "variants": variants, "rows": rows,
               "cpu_s_median": sorted(e["cpu_s"] for e in entries)[len(entries) // 2] if entries else None}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    lines = [("| update | ES | PS | NS | NS change [95%] | neighbours right→wrong / wrong→right | mean |Δ neighbour "
              "margin| | ES failures |"), "|---|---|---|---|---|---|---|---|"]
    base_ns = rows["unedited"]["neighborhood_success"]["value"]
    for name, row in rows.items():
        cells = " | ".join(f"{row[k]['value']:.1f} [{row[k]['lo']:.0f}–{row[k]['hi']:.0f}]" for k in KEYS)
        if name == "unedited":
            lines.append(f"| unedited | {cells} | – | – | – | – |")
            continue
        lo, hi = row["ns_change_interval"]
        lines.append(f"| {name} | {cells} | {row['neighborhood_success']['value'] - base_ns:+.1f} [{lo:+.1f}, {hi:+.1f}] | "
                     f"{row['ns_right_to_wrong']} / {row['ns_wrong_to_right']} | "
                     f"{row['neighbour_margin_move_mean']:.4f} | {len(row['es_failures'])} |")
    drawn = " + ".join(f"{c['n']} drawn with seed {c['seed']}" for c in configs)
    text = (f"{len(entries)} records edited (of {drawn}{'' if sources is None else ', pooled'}); ROME at layer "
            f"{config['layer']}, one value per record put through each update.\n\n" + "\n".join(lines) + "\n")
    (out / "summary.md").write_text(text)
    print(text)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", type=Path, default=SHARED)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default="model-1000,model-4000,identity,cf-text,bare-key,cf-text+bare")
    ap.add_argument("--hp", action="append", default=[], metavar="K=V", help="ROME hyperparameter override")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("runs/rome-update-variants"))
    ap.add_argument("--summarise", action="store_true")
    ap.add_argument("--merge", type=Path, default=None, help="add the variants of another run's --out, then summarise")
    ap.add_argument("--pool", type=Path, nargs="+", default=None, metavar="DIR",
                    help="summarise the records of several runs' --out together, into --out")
    args = ap.parse_args()
    if args.pool:
        args.out.mkdir(parents=True, exist_ok=True)
        summarise(args.out, args.pool)
    elif args.merge is not None:
        merge(args.out, args.merge)
        summarise(args.out)
    elif args.summarise:
        summarise(args.out)
    else:
        run(args)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
