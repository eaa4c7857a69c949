"""Sequential editing on the embedded model (or SmolLM2 with CounterFact): plain sequential ROME vs AlphaEdit vs
sequential MEMIT, measured as edits pile up.

The first N of ``world_records(embedded_world(), n=POOL, seed)`` (POOL 1,000: a short run edits the start of the
long one) are edited one after another with ``seq-rome``, ``alphaedit`` and/or ``seq-memit`` (``--methods``; the
last two take ``batch_size`` requests per step, 1 by default: fully sequential, and share their MEMIT settings).
At each checkpoint k the model holding the first k edits is scored on those k records with ROME's CounterFact
scores (:func:`mechedit.evaluation.counterfact.rewrite_scores`), each with its Wilson 95% interval:

* ES: efficacy success, p(new) > p(true) on the edit prompt (mean over records, in %);
* PS: the same on the held-out paraphrase;
* NS: neighbourhood success, another subject's true answer still beats the new object; compared with NS of
  the same records on the unedited model (the issue's target: ES >= 95 and an NS drop <= 5 points at 1,000 edits).

* ES right after: each edit's ES on the model right after the step that made it (does it take at all?).

At the last checkpoint a diagnosis splits ES by age (edits made after it), by whether a later edit had the same
subject and by whether an earlier edit's subject ends in the same name piece, and NS by whether the neighbour's
name ends in an edited subject's name piece; ``--key-report`` adds the overlap of the edit keys (cosines, null
space rank, projected cosines). The JSON keeps the editor's per-step evidence (``steps``: for AlphaEdit and
seq-memit each batch's value optimisation, how much of the asked residual the weights carry, update sizes). A
method whose time budget runs out stops at its last checkpoint (reported as
such). Writes
``sequential_edits.json``, ``sequential_edits.md`` (table) and ``sequential_edits.html`` (plotly) to ``--out``;
while a method runs, ``partial-<method>.json`` there holds its checkpoints so far (removed at the end).

    OMP_NUM_THREADS=1 .venv/bin/python analyses/sequential_edits.py --n 1000 --budget 720
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling analyses (counterfact_smollm2's draw)

COUNTERFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact.json"


class _OutOfTime(Exception):
    pass


KEYS = {"ES": "efficacy_success", "PS": "paraphrase_success", "NS": "neighborhood_success"}


def score(model, records) -> dict:
    """Per-record ES/PS/NS (0/1; None where a record has nothing to measure) on ``model`` as it is now."""
    from mechedit.evaluation.counterfact import rewrite_scores

    rows = [rewrite_scores(model, r) for r in records]
    return {short: [r[key] for r in rows] for short, key in KEYS.items()}


def pct(values) -> list[float]:
    """[mean, lo, hi] in %, Wilson 95% interval (the values are 0/1 per record)."""
    from mechedit.evaluation.stats import interval

    return [round(100.0 * x, 2) for x in interval([v for v in values if v is not None], (0.0, 1.0))]


def last_piece(model, subject: str) -> str:
    return model.tokenizer.decode([model.encode(subject)[-1]])


def diagnose(model, records, per_record: dict, immediate: list) -> dict:
    """Why edits fail, on the model holding ``len(per_record["ES"])`` edits: each edit's ES right after it was made
    (does it take?) against now, by age (edits made after it), by whether a later edit had the same subject, and
    by whether an earlier edit's subject ends in the same name piece (the key at the subject's last token)."""
    n = len(per_record["ES"])
    recs = records[:n]
    es = per_record["ES"]
    later_same = [any(recs[j].subject == recs[i].subject for j in range(i + 1, n)) for i in range(n)]
    pieces = [last_piece(model, r.subject) for r in recs]
    earlier_piece = [any(pieces[j] == pieces[i] and recs[j].subject != recs[i].subject for j in range(i))
                     for i in range(n)]
    ages = [n - 1 - i for i in range(n)]
    bins = [(0, 9), (10, 99), (100, 499), (500, 10 ** 9)]
    out = {"immediate_ES": pct(immediate[:n]), "ES_now": pct(es), "by_age": [], "splits": []}
    for lo, hi in bins:
        idx = [i for i in range(n) if lo <= ages[i] <= hi]
        if idx:
            out["by_age"].append({"age": f"{lo}-{hi}" if hi < 10 ** 9 else f"{lo}+", "n": len(idx),
                                  "ES_immediate": pct([immediate[i] for i in idx]), "ES_now": pct([es[i] for i in idx])})
    for name, flag in (("a later edit has the same subject", later_same),
                       ("an earlier edit's subject ends in the same name piece", earlier_piece)):
        for value in (True, False):
            idx = [i for i in range(n) if flag[i] == value]
            if idx:
                out["splits"].append({"split": name, "value": value, "n": len(idx),
                                      "ES_immediate": pct([immediate[i] for i in idx]),
                                      "ES_now": pct([es[i] for i in idx]),
                                      "NS_now": pct([per_record["NS"][i] for i in idx])})
    # neighbours: does the neighbour's subject end in the name piece of some edited subject? (Whether the
    # neighbour's person was edited is split at every checkpoint: ns_by_neighbour_subject.)
    edited_pieces = set(pieces)
    nb_subjects = [_neighbour_subject(r) if r.neighborhood else None for r in recs]
    nb = [last_piece(model, s) if s else None for s in nb_subjects]
    out["NS_by_neighbour_piece"] = []
    for value in (True, False):
        idx = [i for i in range(n) if nb[i] is not None and (nb[i] in edited_pieces) == value]
        if idx:
            out["NS_by_neighbour_piece"].append({"neighbour_subject_ends_in_an_edited_piece": value, "n": len(idx),
                                                 "NS_now": pct([per_record["NS"][i] for i in idx])})
    return out


def ns_by_neighbour_subject(records, ns: list, ns_before: list) -> dict:
    """NS now and before, split by whether the neighbour's subject (another person) has had one of its *other*
    facts edited by ``records`` (the model holds all of them). Editing a subject's key moves all its facts
    (study 4: ROME keeps 38-45% of the same person's other facts on the embedded model), so a neighbour whose
    person was edited asks something else of an editor than one whose person was not. Empty where the neighbour
    prompts do not name their subject through the record's template (CounterFact)."""
    edited = {r.subject for r in records}
    subjects = [_neighbour_subject(r) if r.neighborhood else None for r in records]
    flag = [None if s is None else s in edited for s in subjects]
    out = {}
    for value, name in ((True, "nb_person_edited"), (False, "nb_person_unedited")):
        idx = [i for i, f in enumerate(flag) if f is value]
        if idx:
            out[name] = {"n": len(idx), "NS": pct([ns[i] for i in idx]), "NS_before": pct([ns_before[i] for i in idx])}
    return out


def _neighbour_subject(record) -> str | None:
    """The neighbour prompt's subject, where the neighbour prompt is the record's template filled with another
    subject (the embedded world's records); None otherwise (CounterFact's neighbour prompts have templates of
    their own)."""
    prompt = record.neighborhood[0][0]
    before, _, after = record.template.partition("{}")
    if prompt.startswith(before) and prompt.endswith(after) and len(prompt) > len(before) + len(after):
        return prompt[len(before):len(prompt) - len(after)]
    return None


def key_report(model, records, hparams) -> dict:
    """How the edit keys overlap (AlphaEdit's MEMIT layers, the unedited model): cosine of two prompts of one
    subject, of two subjects ending in the same name piece, of other subjects; the null space's rank and the
    share of each edit key's norm inside it; the cosine of null-space-projected subject keys."""
    import itertools

    from mechedit.editing.memit.compute_ks import prepare, read_keys
    from mechedit.editing.memit.memit_main import layer_statistics
    from mechedit.editing.rome.rome_main import context_templates
    from mechedit.editing.sequential import null_space

    mh = hparams.memit
    stats = layer_statistics(model, mh.layers, mh, None, None)
    prep = prepare(model, records, context_templates(model, mh), mh.key_position)
    subjects = sorted({r.subject for r in records})
    idx = {s: [i for i, r in enumerate(records) if r.subject == s] for s in subjects}
    piece = {s: last_piece(model, s) for s in subjects}
    out = {"n_subjects": len(subjects), "n_last_pieces": len(set(piece.values())), "layers": []}
    for layer in mh.layers:
        K = read_keys(model, prep, layer)  # (n, d_mlp) float64
        ns = null_space(stats[layer].mom2, hparams.nullspace_energy)
        S = torch.stack([K[idx[s]].mean(0) for s in subjects])
        Sn = S / S.norm(dim=1, keepdim=True)
        PS = S @ ns.P
        PSn = PS / PS.norm(dim=1, keepdim=True)
        same = [float(K[i] @ K[j] / (K[i].norm() * K[j].norm())) for s in subjects
                for i, j in itertools.combinations(idx[s], 2)]
        shared, other, shared_p, other_p = [], [], [], []
        for a, b in itertools.combinations(range(len(subjects)), 2):
            c, cp = float(Sn[a] @ Sn[b]), float(PSn[a] @ PSn[b])
            if piece[subjects[a]] == piece[subjects[b]]:
                shared.append(c); shared_p.append(cp)
            else:
                other.append(c); other_p.append(cp)
        mean = lambda x: round(sum(x) / len(x), 4) if x else None  # noqa: E731
        frac = (K @ ns.P).norm(dim=1) / K.norm(dim=1)
        out["layers"].append({
            "layer": layer, "d_mlp": model.d_mlp, **ns.describe(),
            "key_in_null_space_median": round(float(frac.median()), 4),
            "key_sq_norm_mean": round(float((K ** 2).sum(1).mean()), 3),
            # kᵀC⁻¹k: an edit key's squared norm in the statistics' whitened coordinates, to compare with MEMIT's λ
            "whitened_key_sq_norm_median": round(float((K.T * torch.linalg.solve(stats[layer].mom2.double(),
                                                                                  K.T)).sum(0).median()), 1),
            "null_key_sq_norm_mean": round(float(((K @ ns.P) ** 2).sum(1).mean()), 3),
            "cos_same_subject": mean(same), "cos_shared_last_piece": mean(shared), "n_shared_pairs": len(shared),
            "cos_other_subjects": mean(other),
            "cos_null_shared_last_piece": mean(shared_p), "cos_null_other_subjects": mean(other_p)})
    return out


def unedited_neighbours(world, records, seed: int) -> list:
    """``records`` with each neighbour prompt re-drawn from facts that none of ``records`` edits.

    ``world_records`` draws a record's neighbour from all of the world's facts of its relation (another person,
    the same true object where possible). Edited one after another, 1,000 of the world's 1,440 facts include most
    of those neighbours' own facts (706 of the 1,000 neighbours are themselves edited by the end; 167 of the first
    500): such a neighbour *should* change, so scoring it as neighbourhood damage measures the benchmark, not the
    edit. Here the neighbour is drawn (seeded per record) from the same relation's facts outside the edited set,
    of another person, with the same true object where possible, in the record's own template."""
    from dataclasses import replace

    edited = {(r.subject, r.relation_id) for r in records}
    by_relation: dict[str, list] = {}
    for f in world.facts:
        if (f.subject, f.relation) not in edited:
            by_relation.setdefault(f.relation, []).append(f)
    out = []
    for r in records:
        rng = random.Random(f"{seed}/{r.case_id}/unedited-neighbour")
        others = [f for f in by_relation.get(r.relation_id, []) if f.subject != r.subject]
        sharing = [f for f in others if f.object == r.target_true]
        nb = rng.choice(sharing or others) if others else None
        out.append(replace(r, neighborhood=((r.template.replace("{}", nb.subject), nb.object),) if nb else ()))
    return out


def run_method(model, name, records, hparams, checkpoints, budget, base_ns, partial: Path | None = None) -> dict:
    """Edit ``records`` with method ``name``, scoring at each checkpoint. With ``partial``, the points so far are
    rewritten there after each checkpoint (``{"method", "hparams", "points"}``), so a run cut off keeps them."""
    from mechedit.editing.methods import edit

    started = time.perf_counter()
    cpu0 = time.process_time()
    points = []
    immediate: list = []  # each edit's ES right after the step that made it
    last = {}

    def progress(stage, done, total):
        if stage != "edit":
            return
        t0 = time.perf_counter()
        immediate.extend(score(model, records[len(immediate):done])["ES"])
        if done not in checkpoints:
            points_eval[0] += time.perf_counter() - t0
            return
        edit_seconds = time.perf_counter() - started - points_eval[0]
        s = score(model, records[:done])
        last["scores"] = s
        point = {"edits": done, **{k: pct(v) for k, v in s.items()}, "NS_before": pct(base_ns[:done]),
                 "immediate_ES": pct(immediate[:done]), "edit_seconds": round(edit_seconds, 1),
                 "cpu_seconds": round(time.process_time() - cpu0, 1)}
        point["NS_drop"] = round(point["NS_before"][0] - point["NS"][0], 2)
        point.update(ns_by_neighbour_subject(records[:done], s["NS"], base_ns[:done]))
        points.append(point)
        if partial is not None:
            partial.write_text(json.dumps({"method": name, "hparams": hparams.to_dict(), "points": points}, indent=1))
        points_eval[0] += time.perf_counter() - t0
        print(f"  {name} {done:5d} edits: ES {point['ES'][0]:.1f}  PS {point['PS'][0]:.1f}  NS {point['NS'][0]:.1f} "
              f"(before {point['NS_before'][0]:.1f}); ES right after each edit {point['immediate_ES'][0]:.1f}; "
              f"{edit_seconds:.0f}s editing", flush=True)
        if time.perf_counter() - started > budget and done < total:
            raise _OutOfTime

    points_eval = [0.0]  # wall seconds spent scoring (excluded from editing time)
    stopped = None
    steps = None
    try:
        handle = edit(model, records, name, hparams, progress)
        handle.restore()
        steps = handle.evidence.get("steps")  # per step: value optimisation and update sizes
    except _OutOfTime:  # the editor restored the original weights before this propagated
        stopped = f"time budget of {budget:.0f} s reached after {points[-1]['edits']} edits"
    diagnosis = diagnose(model, records, last["scores"], immediate) if last else None
    return {"method": name, "hparams": hparams.to_dict(), "points": points, "stopped": stopped,
            "diagnosis": diagnosis, "immediate_ES": immediate, "steps": steps,
            "seconds": round(time.perf_counter() - started, 1), "cpu_seconds": round(time.process_time() - cpu0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--checkpoints", default="10,25,50,100,150,200,300,400,500,750,1000")
    ap.add_argument("--methods", default="seq-rome,alphaedit")
    ap.add_argument("--budget", type=float, default=720.0, help="seconds per method (editing + scoring)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool", type=int, default=1000, help="the first --n of world_records(n=POOL, seed=SEED) "
                    "are edited, so a short run edits the start of the long one (same subjects, same order)")
    ap.add_argument("--out", default="docs/results/sequential-edits")
    ap.add_argument("--alphaedit-hp", nargs="*", default=[], help="overrides of AlphaEdit's SequentialHyperParams "
                    "(name=value, dotted for nested: memit.v_lr=0.2)")
    ap.add_argument("--seq-rome-hp", nargs="*", default=[], help="overrides of seq-rome's SequentialHyperParams")
    ap.add_argument("--seq-memit-hp", nargs="*", default=[], help="overrides of seq-memit's SequentialHyperParams")
    ap.add_argument("--key-report", action="store_true", help="also measure how the edit keys overlap")
    ap.add_argument("--neighbours", choices=("unedited", "world-records"), default="unedited",
                    help="neighbour prompts: re-drawn from facts no record edits (default), or world_records' own "
                         "(most of which are edited themselves by 1,000 edits)")
    ap.add_argument("--counterfact", nargs="?", const=str(COUNTERFACT), default=None, metavar="FILE",
                    help="edit random CounterFact records (seeded draw of analyses/counterfact_smollm2.py; default "
                         "file ../shared/data/counterfact.json) on --model instead of the embedded world's facts; "
                         "each record keeps its own neighbour prompt")
    ap.add_argument("--model", default=None, help="model to edit (with --counterfact; default smollm2-135m)")
    ap.add_argument("--stats-text", choices=("sampled", "cf-clean"), default="sampled",
                    help="with --counterfact, the key statistics' text: 1,000 texts sampled from the model (the "
                         "pinned study's), or cf-clean: the CounterFact sentences about no subject the drawn records "
                         "ask about (analyses/counterfact_smollm2.statistics_text), the kind of text neighbour "
                         "prompts are")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import mechedit
    from mechedit.editing.sequential import SequentialHyperParams

    if args.n > args.pool:
        raise SystemExit(f"--n {args.n} is more than --pool {args.pool}")
    if args.counterfact:
        import counterfact_smollm2 as cf  # the seeded draw and SmolLM2's pinned ROME / MEMIT hyperparameters
        from mechedit.data import read_counterfact

        model = mechedit.load(args.model or "smollm2-135m")
        records = cf.draw(read_counterfact(args.counterfact), args.pool, args.seed)[:args.n]
        # ROME and MEMIT as the CounterFact study pins them (ROME at layer 8, MEMIT over 7-9, statistics from
        # 1,000 model-sampled texts); seq-rome with MEMIT's 5 prefixes of 10 tokens, as on the embedded model.
        rome_hp, memit_hp = dict(cf.HPARAMS["rome"]), dict(cf.HPARAMS["memit"])
        if args.stats_text == "cf-clean":
            all_records = read_counterfact(args.counterfact)  # cleaned against the whole pool: any --n shares it
            path, n_text = cf.statistics_file(all_records, cf.draw(all_records, args.pool, args.seed), args.seed)
            for hp in (rome_hp, memit_hp):
                hp.update(mom2_source=str(path), mom2_n_samples=n_text)
            print(f"statistics text: {n_text} CounterFact sentences ({path})", flush=True)
        hparams = {"seq-rome": SequentialHyperParams(rome={**rome_hp, "prefix_lengths": [[10, 5]]}),
                   "alphaedit": SequentialHyperParams(memit=memit_hp)}
    else:
        from mechedit.editing.memit import MEMITHyperParams
        from mechedit.editing.rome import ROMEHyperParams
        from mechedit.toy.export import embedded_world, world_records

        model = mechedit.load(args.model)
        records = world_records(embedded_world(), n=args.pool, seed=args.seed)[:args.n]
        if args.neighbours == "unedited":
            records = unedited_neighbours(embedded_world(), records, args.seed)
        # The embedded model's MLP causal-trace effect at the last subject token peaks at layer 1 (ROME's layer)
        # and spans layers 0-2 (AlphaEdit's MEMIT range); docs/embedded-model.md. Both use 5 context prefixes of
        # 10 tokens (MEMIT's choice; ROME samples 20), so they see the same prompts. Every hyperparameter either
        # depends on is passed here and recorded in the results.
        hparams = {"seq-rome": SequentialHyperParams(rome=ROMEHyperParams(layer=1, prefix_lengths=((10, 5),),
                                                                          clamp_norm_factor=4.0)),
                   "alphaedit": SequentialHyperParams(memit=MEMITHyperParams(layers=(0, 1, 2)))}
    hparams["seq-memit"] = hparams["alphaedit"]  # the same MEMIT steps, a different solve
    checkpoints = {c for c in map(int, args.checkpoints.split(",")) if c <= args.n} | {args.n}
    before = model.fingerprint()
    t0 = time.perf_counter()
    base = score(model, records)
    print(f"unedited: ES {pct(base['ES'])[0]:.1f} NS {pct(base['NS'])[0]:.1f} ({time.perf_counter() - t0:.0f}s)",
          flush=True)
    overrides = {"seq-rome": args.seq_rome_hp, "alphaedit": args.alphaedit_hp, "seq-memit": args.seq_memit_hp}
    hparams = {name: hp.with_overrides(overrides[name]) for name, hp in hparams.items()}
    keys = key_report(model, records, hparams["alphaedit"]) if args.key_report else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.methods.split(","):
        results.append(run_method(model, name, records, hparams[name], checkpoints, args.budget, base["NS"],
                                  partial=out / f"partial-{name}.json"))
        assert model.fingerprint() == before, "the model was not restored"
    command = "OMP_NUM_THREADS=1 .venv/bin/python analyses/sequential_edits.py " + " ".join(
        f"--{k.replace('_', '-')}{'' if v is True else ' ' + (' '.join(v) if isinstance(v, list) else str(v))}"
        for k, v in vars(args).items() if not (isinstance(v, list) and not v) and v is not False)
    load = os.getloadavg()[0]
    data = {"command": command, "model": model.name, "n_records": args.n, "threads": args.threads,
            "load_1min_at_end": round(load, 1),
            "unedited": {k: pct(v) for k, v in base.items()}, "results": results, "keys": keys,
            "scores": "mechedit.evaluation.counterfact.rewrite_scores (ES/PS/NS success over the records edited so "
                      "far, %, [mean, lo, hi] with the Wilson 95% interval)"}
    (out / "sequential_edits.json").write_text(json.dumps(data, indent=1))
    for name in args.methods.split(","):
        (out / f"partial-{name}.json").unlink(missing_ok=True)
    ci = lambda v: f"{v[0]:.1f} [{v[1]:.1f}, {v[2]:.1f}]"  # noqa: E731
    lines = ["| method | edits | ES | PS | NS | NS before | NS drop | ES right after each edit | editing s (wall) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for p in r["points"]:
            lines.append(f"| {r['method']} | {p['edits']} | {ci(p['ES'])} | {ci(p['PS'])} | {ci(p['NS'])} | "
                         f"{p['NS_before'][0]:.1f} | {p['NS_drop']:+.1f} | {ci(p['immediate_ES'])} | "
                         f"{p['edit_seconds']:.0f} |")
        if r["stopped"]:
            lines.append(f"| {r['method']} | stopped: {r['stopped']} | | | | | | | |")
    split_rows = [(r["method"], p) for r in results for p in r["points"] if "nb_person_edited" in p
                  or "nb_person_unedited" in p]
    if split_rows:
        lines += ["", "| method | edits | NS, neighbour's person has an edited fact: n, now (before) | "
                  "NS, neighbour's person unedited: n, now (before) |", "|---|---|---|---|"]
        cell = lambda d: f"{d['n']}: {ci(d['NS'])} ({d['NS_before'][0]:.1f})" if d else "-"  # noqa: E731
        for m, p in split_rows:
            lines.append(f"| {m} | {p['edits']} | {cell(p.get('nb_person_edited'))} | "
                         f"{cell(p.get('nb_person_unedited'))} |")
    lines += ["", "| method | ES of edits by age (edits made after it) | n | ES right after | ES now |",
              "|---|---|---|---|---|"]
    for r in results:
        for b in (r["diagnosis"] or {}).get("by_age", []):
            lines.append(f"| {r['method']} | {b['age']} | {b['n']} | {ci(b['ES_immediate'])} | {ci(b['ES_now'])} |")
    lines += ["", "| method | split | value | n | ES right after | ES now | NS now |", "|---|---|---|---|---|---|---|"]
    for r in results:
        for b in (r["diagnosis"] or {}).get("splits", []):
            lines.append(f"| {r['method']} | {b['split']} | {b['value']} | {b['n']} | {ci(b['ES_immediate'])} | "
                         f"{ci(b['ES_now'])} | {ci(b['NS_now'])} |")
        for b in (r["diagnosis"] or {}).get("NS_by_neighbour_piece", []):
            lines.append(f"| {r['method']} | the neighbour's subject ends in an edited subject's name piece | "
                         f"{b['neighbour_subject_ends_in_an_edited_piece']} | {b['n']} | | | {ci(b['NS_now'])} |")
    if keys:
        lines += ["", "| layer | null space rank / d_mlp | edit key norm in it (median) | kᵀC⁻¹k (median) | "
                  "cos same subject | cos same last piece | cos other | projected: same last piece | "
                  "projected: other |", "|---|---|---|---|---|---|---|---|---|"]
        f3 = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731  (None: no such pair among the records)
        for k in keys["layers"]:
            lines.append(f"| {k['layer']} | {k['n_null']} / {k['d_mlp']} | {k['key_in_null_space_median']:.2f} | "
                         f"{k['whitened_key_sq_norm_median']:.0f} | " + " | ".join(
                             f3(k[c]) for c in ("cos_same_subject", "cos_shared_last_piece", "cos_other_subjects",
                                                "cos_null_shared_last_piece", "cos_null_other_subjects")) + " |")
    (out / "sequential_edits.md").write_text("\n".join(lines) + "\n")
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=3, subplot_titles=("efficacy (ES, %)", "paraphrase (PS, %)",
                                                        "neighbourhood (NS, %)"))
    for r in results:
        xs = [p["edits"] for p in r["points"]]
        for col, key in enumerate(("ES", "PS", "NS"), start=1):
            ys = [p[key][0] for p in r["points"]]
            fig.add_trace(go.Scatter(
                x=xs, y=ys, name=f"{r['method']} {key}", mode="lines+markers",
                error_y={"type": "data", "symmetric": False,
                         "array": [p[key][2] - p[key][0] for p in r["points"]],
                         "arrayminus": [p[key][0] - p[key][1] for p in r["points"]]}), row=1, col=col)
    fig.update_xaxes(type="log", title_text="sequential edits")
    fig.update_layout(title=f"Sequential editing on {model.name}, 95% Wilson intervals")
    fig.write_html(out / "sequential_edits.html", include_plotlyjs="cdn")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
