"""CounterFact on SmolLM2-135M: ROME, MEMIT and fine-tuning on the same random records, scored by efficacy /
paraphrase / neighbourhood success (ES/PS/NS), beside ROME's published GPT-2 XL rows (Meng et al. 2022).

Records are drawn at random (``random.Random(seed).sample``; the first ``n`` of a larger draw with the same seed
are the smaller draw, so runs of different ``--n`` share records) from a CounterFact file (default
``../shared/data/counterfact.json``, the EasyEdit layout: one paraphrase and one neighbourhood prompt per case).
Each record is scored once on the unedited model (:func:`mechedit.evaluation.counterfact.rewrite_scores`), then
for every method in ``--methods`` (through :func:`mechedit.editing.methods.edit`):

* ``rome``, ``ft``, ``ft-l``: one record at a time, scored, then restored (bit-exact) before the next;
* ``memit``: ONE batch edit of all the drawn records (MEMIT's natural use: many facts at once), every record
  scored on that edited model, then restored. Its numbers are therefore a 100-facts-at-once edit, not 100
  single edits.

Every method's hyperparameters are given in full here (:data:`HPARAMS`, overridable with ``--hp method:k=v``) so a
change of a library default does not change what this script runs; they are written to ``config.json``. Each
result is appended to ``records.jsonl`` in ``--out`` as soon as it is measured (``{"method": ..., "case_id":
...}``), so an interrupted run keeps its work and a rerun skips what is there; ``--summarise`` rewrites
``summary.json`` / ``summary.md`` from that file alone.

The weights are SmolLM2-135M-Instruct de-quantised from the Q4_1 GGUF (``mechedit models fetch smollm2-135m``):
close to, not identical with, the original model, and the Instruct variant. Key statistics come from 1,000 texts
sampled from the model itself (64 tokens each; no Wikipedia offline); they are cached after the first run.

    OMP_NUM_THREADS=1 python analyses/counterfact_smollm2.py --n 100 --methods rome,memit,ft,ft-l \\
        --out docs/results/counterfact-smollm2
    python analyses/counterfact_smollm2.py --summarise --out docs/results/counterfact-smollm2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # analyses/pinned.py, however this file is loaded
from pinned import SAMPLED_STATS, SMOL_ROME

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact.json"
# ROME's Table 4 (CounterFact, GPT-2 XL), as quoted in issue #4: efficacy, paraphrase, neighbourhood success (%).
PUBLISHED = {"GPT-2 XL (unedited), published": (22.2, 24.7, 78.1), "GPT-2 XL + ROME, published": (100.0, 96.4, 75.4)}
KEYS = ("efficacy_success", "paraphrase_success", "neighborhood_success")
SHORT = {"efficacy_success": "ES", "paraphrase_success": "PS", "neighborhood_success": "NS"}
SINGLE = ("rome", "ft", "ft-l")  # edited one record at a time and restored
BATCHED = ("memit",)  # one edit of all records
# Key statistics shared by ROME and MEMIT: 1,000 model-sampled texts of 64 tokens (what the 20-record run used).
_STATS = {**SAMPLED_STATS, "seed": 0}
HPARAMS: dict[str, dict] = {
    # ROME at layer 8 (inside the 7-11 plateau of SmolLM2's MLP causal-trace effect), every other field at the
    # value the library had when the 20-record run was made (ROME's GPT-2 XL values + r-ROME keys).
    "rome": dict(SMOL_ROME),
    # MEMIT over layers 7-9 (around ROME's layer), otherwise the library's defaults at the time of writing.
    "memit": {"layers": [7, 8, 9], "key_position": "subject_last", "context_prefixes": None,
              "prefix_lengths": [[10, 5]], "prefix_top_k": 5, "v_lr": 0.5, "v_num_grad_steps": 20,
              "v_loss_stop": 0.05, "kl_factor": 0.0625, "kl_prompt": "{} is a", "v_weight_decay": 0.5,
              "clamp_norm_factor": 2.0, "batch_requests": 128, "mom2_adjustment": True,
              "mom2_update_weight": 1000.0, "max_update_ratio": 10.0, **_STATS},
    # Fine-tuning of layer 8's MLP (gate, up and down projections), ROME's FT step count and learning rate;
    # ft-l adds the L-infinity bound (None here: finetune_l uses ROME's 5e-4 and records it in the handle).
    "ft": {"layers": [8], "modules": "mlp", "steps": 25, "lr": 5e-4, "weight_decay": 0.0, "norm_constraint": None,
           "use_paraphrases": False, "stop_loss": None, "seed": 0},
    "ft-l": {"layers": [8], "modules": "mlp", "steps": 25, "lr": 5e-4, "weight_decay": 0.0,
             "norm_constraint": None, "use_paraphrases": False, "stop_loss": None, "seed": 0},
}


# -- running ---------------------------------------------------------------------------------------------------------


class StageClock:
    """A ``progress(stage, done, total)`` callback that records when each stage was first and last reported
    (wall and CPU seconds since the clock was made), so a run can say what its statistics pass cost."""

    def __init__(self):
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        self.stages: dict[str, dict] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = {"wall": time.perf_counter() - self.t0, "cpu": time.process_time() - self.c0}
        s = self.stages.setdefault(stage, {"first": now, "calls": 0})
        s["last"], s["calls"], s["done"], s["total"] = now, s["calls"] + 1, done, total


def draw(records: Sequence, n: int, seed: int) -> list:
    """The seeded random draw; ``draw(r, n, s)`` is a prefix of ``draw(r, m, s)`` for n <= m (random.sample's
    selection order does not depend on how many are asked for beyond the ones already picked)."""
    return random.Random(seed).sample(list(records), min(n, len(records)))


def statistics_text(all_records: Sequence, drawn: Sequence) -> list[str]:
    """``cf-clean``: "prompt + true object" of every CounterFact record that is not drawn and whose subject is not
    named in any drawn record's prompt, paraphrase or neighbour prompt. Short factual sentences, the kind of text
    neighbour prompts are (ROME's Wikipedia statistics stand for such text; there is none offline), with no
    sentence about a subject the scores ask about."""
    ids = {r.case_id for r in drawn}
    asked = "\n".join(p for r in drawn for p in (r.prompt, *r.paraphrases, *(q for q, _ in r.neighborhood)))
    return [f"{r.prompt} {r.target_true}" for r in all_records if r.case_id not in ids
            and r.target_true and r.subject not in asked]


def statistics_file(all_records: Sequence, drawn: Sequence, seed: int) -> tuple[Path, int]:
    """:func:`statistics_text` written to the cache (``texts/cf-clean-n<len(drawn)>-seed<seed>.txt``, one sentence
    per line: a ``mom2_source`` file) and its sentence count (the ``mom2_n_samples`` that reads all of it)."""
    from mechedit.hub import cache_dir

    text = statistics_text(all_records, drawn)
    path = cache_dir() / "texts" / f"cf-clean-n{len(drawn)}-seed{seed}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text) + "\n")
    return path, len(text)


def make_hp(method: str, overrides: Sequence[str]):
    from mechedit.editing.methods import make_hparams

    hp = make_hparams(method, dict(HPARAMS[method]))
    return hp.with_overrides(list(overrides)) if overrides else hp


def run(args) -> None:
    import torch

    import mechedit
    from mechedit.data import read_counterfact
    from mechedit.editing.methods import edit
    from mechedit.errors import InputError
    from mechedit.evaluation.counterfact import SCORE_KEYS, rewrite_scores

    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in HPARAMS:
            raise SystemExit(f"unknown method {m!r}; this script runs {', '.join(HPARAMS)}")
    overrides: dict[str, list[str]] = {}
    for item in args.hp:
        method, _, kv = item.partition(":")
        overrides.setdefault(method, []).append(kv)
    all_records = read_counterfact(args.data)
    records = draw(all_records, args.n, args.seed)
    if args.stats_text == "cf-clean":
        path, n_text = statistics_file(all_records, records, args.seed)
        for m in ("rome", "memit"):
            overrides.setdefault(m, []).extend([f"mom2_source={path}", f"mom2_n_samples={n_text}"])
        print(f"statistics text: {n_text} CounterFact sentences ({path})", flush=True)
    hps = {m: make_hp(m, overrides.get(m, [])) for m in methods}

    model = mechedit.load("smollm2-135m")
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "records.jsonl"
    entries = read_entries(log)
    done = {(e["method"], e["case_id"]) for e in entries}
    config_path = args.out / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    config.update({"model": model.name, "model_fingerprint": model.fingerprint(), "data": str(args.data),
                   "n": max(args.n, config.get("n", 0)), "seed": args.seed, "threads": torch.get_num_threads()})
    config.setdefault("hparams", {}).update({m: hp.to_dict() for m, hp in hps.items()})
    config_path.write_text(json.dumps(config, indent=1))

    def append(entry: dict) -> None:
        entry.update(threads=torch.get_num_threads(), load_average=os.getloadavg()[0])
        with log.open("a") as f:
            f.write(json.dumps(entry) + "\n")
        print(json.dumps({k: entry.get(k) for k in ("method", "case_id", "edit_seconds", "edit_cpu_seconds",
                                                    "skipped", "edited")}), flush=True)

    def scores(rec) -> dict:
        s = rewrite_scores(model, rec)
        return {k: s[k] for k in SCORE_KEYS}

    for rec in records:  # the unedited model, once per record (every method compares with these)
        if ("unedited", rec.case_id) not in done:
            append({"method": "unedited", "case_id": rec.case_id, "prompt": rec.prompt, "subject": rec.subject,
                    "target_true": rec.target_true, "target_new": rec.target_new, "scores": scores(rec)})

    for method in methods:
        hp = hps[method]
        if method in SINGLE:
            for rec in records:
                if (method, rec.case_id) in done:
                    continue
                entry = {"method": method, "case_id": rec.case_id}
                clock = StageClock()
                try:
                    handle = edit(model, rec, method, hp) if method == "rome" else edit(model, [rec], method, hp)
                except InputError as e:  # e.g. ROME refuses a record the model already answers with the new target
                    entry["skipped"] = str(e)
                else:
                    entry["edit_seconds"] = time.perf_counter() - clock.t0
                    entry["edit_cpu_seconds"] = time.process_time() - clock.c0
                    try:
                        entry["scores"] = scores(rec)
                    finally:
                        handle.restore()
                    entry["evidence"] = {k: v for k, v in handle.evidence.items()
                                         if isinstance(v, (int, float, str, bool)) or v is None}
                append(entry)
        else:  # one edit of every drawn record
            todo = [r for r in records if (method, r.case_id) not in done]
            if not todo:
                continue
            if len(todo) != len(records):
                raise SystemExit(f"{log} holds {method} results for only some of the {len(records)} records; a batch "
                                 f"edit must be redone as a whole: remove its lines first")
            if hp.mom2_adjustment:  # the key statistics first, one layer at a time, so their cost is on record
                from mechedit.editing.rome.layer_stats import layer_stats

                for layer in hp.layers:
                    t, c = time.perf_counter(), time.process_time()
                    s = layer_stats(model, layer, hp.mom2_source, hp.mom2_n_samples, max_tokens=hp.mom2_max_tokens,
                                    seed=hp.seed, top_k=hp.prefix_top_k)
                    append({"method": method, "case_id": None, "stats_layer": layer,
                            "wall": time.perf_counter() - t, "cpu": time.process_time() - c,
                            "n_samples": s.n_samples, "n_tokens": s.n_tokens, "source": s.source,
                            "cache_file": str(s.path) if s.path else None})
            clock = StageClock()
            handle = edit(model, records, method, hp, progress=clock)
            batch = {"method": method, "case_id": None, "batch_size": len(records),
                     "edit_seconds": time.perf_counter() - clock.t0,
                     "edit_cpu_seconds": time.process_time() - clock.c0, "stages": clock.stages,
                     "evidence": {k: v for k, v in handle.evidence.items()
                                  if isinstance(v, (int, float, str, bool, list)) or v is None}}
            try:
                for rec in records:
                    append({"method": method, "case_id": rec.case_id, "scores": scores(rec)})
            finally:
                handle.restore()
            append(batch)


# -- summarising -----------------------------------------------------------------------------------------------------


def read_entries(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def summarise_entries(entries: Sequence[dict], methods: Sequence[str] | None = None) -> dict:
    """Per method: success rates with 95% Wilson intervals over the records that method edited, the unedited
    rates on exactly those records, and for NS how many records' neighbour went right -> wrong and wrong -> right.

    A score that is None (nothing to measure it on) leaves that record out of that rate only. The unedited row
    on a method's records is what that method's NS must be compared with (targets are paired, record by
    record)."""
    import mechedit.editing  # noqa: F401  (importing mechedit.evaluation first hits a circular import)
    from mechedit.evaluation.stats import wilson

    unedited = {e["case_id"]: e for e in entries if e["method"] == "unedited"}
    seen = [e["method"] for e in entries if e["method"] != "unedited"]
    methods = list(dict.fromkeys(seen)) if methods is None else list(methods)
    out: dict = {"n_unedited": len(unedited), "methods": {}}

    def rate(values: list[float]) -> dict:
        k = sum(values)
        lo, hi = wilson(k, len(values)) if values else (float("nan"), float("nan"))
        return {"mean": k / len(values) if values else float("nan"), "lo": lo, "hi": hi, "n": len(values),
                "k": k}

    out["unedited"] = {k: rate([e["scores"][k] for e in unedited.values() if e["scores"][k] is not None])
                       for k in KEYS}
    for method in methods:
        mine = [e for e in entries if e["method"] == method and e.get("case_id") is not None]
        edited = [e for e in mine if "scores" in e]
        row: dict = {"n_records": len(mine), "n_edited": len(edited),
                     "skipped": [e["case_id"] for e in mine if "skipped" in e]}
        row["edited"] = {k: rate([e["scores"][k] for e in edited if e["scores"][k] is not None]) for k in KEYS}
        row["unedited_same_records"] = {
            k: rate([unedited[e["case_id"]]["scores"][k] for e in edited
                     if e["case_id"] in unedited and unedited[e["case_id"]]["scores"][k] is not None]) for k in KEYS}
        pairs = [(unedited[e["case_id"]]["scores"]["neighborhood_success"], e["scores"]["neighborhood_success"])
                 for e in edited if e["case_id"] in unedited
                 and e["scores"]["neighborhood_success"] is not None
                 and unedited[e["case_id"]]["scores"]["neighborhood_success"] is not None]
        row["ns_flips"] = {"right_to_wrong": sum(1 for a, b in pairs if a > b),
                           "wrong_to_right": sum(1 for a, b in pairs if a < b), "n": len(pairs)}
        row["es_failures"] = [e["case_id"] for e in edited if e["scores"]["efficacy_success"] == 0.0]
        secs = [e["edit_seconds"] for e in mine if "edit_seconds" in e]
        cpus = [e["edit_cpu_seconds"] for e in mine if "edit_cpu_seconds" in e]
        batch = [e for e in entries if e["method"] == method and e.get("case_id") is None and "batch_size" in e]
        stats = [e for e in entries if e["method"] == method and e.get("case_id") is None and "stats_layer" in e]
        loads = [e["load_average"] for e in mine + batch if "load_average" in e]
        row["time"] = {
            "per_edit_wall_median": statistics.median(secs) if secs else None,
            "per_edit_cpu_median": statistics.median(cpus) if cpus else None,
            "per_edit_wall_range": [min(secs), max(secs)] if secs else None,
            "per_edit_cpu_range": [min(cpus), max(cpus)] if cpus else None,
            "load_average_mean": statistics.mean(loads) if loads else None,
            "threads": sorted({e["threads"] for e in mine + batch if "threads" in e}),
        }
        if batch:
            b = batch[-1]
            row["batch"] = {"size": b["batch_size"], "wall": b["edit_seconds"], "cpu": b["edit_cpu_seconds"],
                            "stages": b.get("stages", {}), "evidence": b.get("evidence", {})}
        if stats:
            row["stats"] = [{k: e[k] for k in ("stats_layer", "wall", "cpu", "n_samples", "n_tokens")} for e in stats]
        out["methods"][method] = row
    return out


LABELS = {"rome": "ROME (one edit at a time)", "memit": "MEMIT (all records in one edit)",
          "ft": "FT (one edit at a time)", "ft-l": "FT-L (one edit at a time)"}


def cell(r: dict) -> str:
    if not r["n"]:
        return "–"
    return f"{100 * r['mean']:.1f} [{100 * r['lo']:.0f}–{100 * r['hi']:.0f}]"


def markdown(summary: dict, config: dict) -> str:
    hp = config.get("hparams", {})
    lines = [
        "# CounterFact on SmolLM2-135M-Instruct (de-quantised Q4_1): ROME, MEMIT, FT beside GPT-2 XL (published)", "",
        (f"{summary['n_unedited']} records drawn at random (seed {config['seed']}) from `{Path(config['data']).name}`. "
         "Success rates in %, 95% Wilson interval in brackets; n = records the rate is over (efficacy, paraphrase: "
         "the new target more likely than the true one; neighbourhood: the neighbour's own answer more likely than "
         "the new target; one paraphrase and one neighbour per record in this layout, ROME's file has several)."),
        "", "| model | ES | PS | NS | n |", "|---|---|---|---|---|",
        "| SmolLM2 unedited, measured | " + " | ".join(cell(summary["unedited"][k]) for k in KEYS)
        + f" | {summary['unedited']['efficacy_success']['n']} |",
    ]
    for method, row in summary["methods"].items():  # each beside the unedited model on exactly its records
        lines.append(f"| SmolLM2 + {LABELS.get(method, method)}, measured | "
                     + " | ".join(cell(row["edited"][k]) for k in KEYS) + f" | {row['n_edited']} |")
        lines.append(f"| ↳ SmolLM2 unedited on the same {row['n_edited']} records | "
                     + " | ".join(cell(row["unedited_same_records"][k]) for k in KEYS) + f" | {row['n_edited']} |")
    lines += [f"| {name} | " + " | ".join(f"{v:.1f}" for v in vals) + " | |" for name, vals in PUBLISHED.items()]
    lines += ["", "Per method, on the records it edited:", "",
              "| method | edited / drawn | unedited NS on them | NS change | neighbours right→wrong / wrong→right "
              "| ES failures (case ids) | time per edit |", "|---|---|---|---|---|---|---|"]
    for method, row in summary["methods"].items():
        u, e = row["unedited_same_records"]["neighborhood_success"], row["edited"]["neighborhood_success"]
        t = row["time"]
        if "batch" in row:
            b = row["batch"]
            stats = b["stages"].get("stats")
            when = (f"one edit of {b['size']}: {b['wall']:.0f} s wall, {b['cpu']:.0f} s CPU"
                    + (f" (statistics {stats['last']['cpu'] - stats['first']['cpu']:.0f} s CPU of it)" if stats
                       else " (statistics computed before)"))
            if row.get("stats"):
                when += "; key statistics per layer: " + ", ".join(
                    f"L{x['stats_layer']} {x['cpu']:.0f} s CPU / {x['wall']:.0f} s wall" for x in row["stats"])
        elif t["per_edit_cpu_median"] is not None:
            when = (f"median {t['per_edit_cpu_median']:.1f} s CPU ({t['per_edit_cpu_range'][0]:.1f}–"
                    f"{t['per_edit_cpu_range'][1]:.1f}), {t['per_edit_wall_median']:.1f} s wall")
        else:
            when = "–"
        when += f"; {','.join(map(str, t['threads']))} thread(s), load {t['load_average_mean'] or float('nan'):.1f}"
        fails = row["es_failures"]
        lines.append(f"| {method} | {row['n_edited']} / {row['n_records']} | {cell(u)} | "
                     f"{100 * (e['mean'] - u['mean']):+.1f} | {row['ns_flips']['right_to_wrong']} / "
                     f"{row['ns_flips']['wrong_to_right']} of {row['ns_flips']['n']} | "
                     f"{len(fails)}{': ' + ', '.join(map(str, fails[:12])) + (' …' if len(fails) > 12 else '') if fails else ''}"
                     f" | {when} |")
    lines += ["", "Hyperparameters (in full in `config.json`): "
              + "; ".join(f"{m}: " + ", ".join(f"{k}={v}" for k, v in h.items()
                                               if k in ("layer", "layers", "modules", "clamp_norm_factor",
                                                        "mom2_update_weight", "steps", "lr", "norm_constraint",
                                                        "mom2_n_samples", "mom2_max_tokens"))
                          for m, h in hp.items() if m in summary["methods"]) + "."]
    return "\n".join(lines) + "\n"


def summarise(out: Path) -> dict:
    config = json.loads((out / "config.json").read_text())
    summary = summarise_entries(read_entries(out / "records.jsonl"))
    summary["published"] = PUBLISHED
    summary["config"] = config
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    text = markdown(summary, config)
    (out / "summary.md").write_text(text)
    print(text)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=SHARED)
    ap.add_argument("--n", type=int, default=100, help="records drawn at random (seeded)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="rome", help="comma-separated, run in this order: rome, memit, ft, ft-l")
    ap.add_argument("--hp", action="append", default=[], metavar="METHOD:K=V",
                    help="override one hyperparameter of one method, e.g. rome:clamp_norm_factor=8")
    ap.add_argument("--stats-text", choices=("sampled", "cf-clean"), default="sampled",
                    help="key statistics for rome and memit: as pinned (1,000 texts sampled from the model), or "
                         "cf-clean: the CounterFact sentences about no subject the drawn records ask about "
                         "(statistics_text), the kind of text ROME's Wikipedia statistics stand for")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("runs/counterfact-smollm2"))
    ap.add_argument("--summarise", action="store_true", help="only rewrite the summary from records.jsonl")
    args = ap.parse_args()
    if not args.summarise:
        run(args)
    summarise(args.out)


if __name__ == "__main__":
    main()
