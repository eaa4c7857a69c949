"""ROME on CounterFact with SmolLM2-135M: efficacy / paraphrase / neighbourhood success, unedited vs edited, beside
ROME's published GPT-2 XL rows (Meng et al. 2022, Table 4).

Records are drawn at random (seeded) from a CounterFact file (default ``../shared/data/counterfact.json``, the
EasyEdit layout: one paraphrase and one neighbourhood prompt per case). Each is scored on the unedited model
(:func:`mechedit.evaluation.counterfact.rewrite_scores`), edited with ROME at ``--layer``, scored again, and
restored; records the model already answers with the new target are skipped (ROME refuses them). Each record's
result is appended to ``records.jsonl`` in ``--out`` as soon as it is done, so an interrupted run keeps what it
measured; ``--summarise`` rewrites ``summary.json`` and ``summary.md`` from that file alone.

The weights are SmolLM2-135M-Instruct de-quantised from the Q4_1 GGUF (``mechedit models fetch smollm2-135m``):
close to, not identical with, the original model, and the Instruct variant. Defaults (say so when reporting):

* ``--layer 8``: inside the plateau of the MLP causal-trace effect at the last subject token (layers 7-11; the
  averaged trace in ``docs/results/causal-trace-smollm2`` peaks at layer 3 with 20 facts and 3 samples);
* key statistics from 1,000 texts sampled from the model itself (64 tokens each; no Wikipedia here). Computing
  them is slow on a CPU; they are cached after the first run.

    OMP_NUM_THREADS=1 python analyses/counterfact_smollm2.py --n 20 --out docs/results/counterfact-smollm2
    python analyses/counterfact_smollm2.py --summarise --out docs/results/counterfact-smollm2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact.json"
# ROME's Table 4 (CounterFact, GPT-2 XL): efficacy, paraphrase, neighbourhood success (%).
PUBLISHED = {"GPT-2 XL (unedited), published": (22.2, 24.7, 78.1), "GPT-2 XL + ROME, published": (100.0, 96.4, 75.4)}
KEYS = ("efficacy_success", "paraphrase_success", "neighborhood_success")


def run(args) -> None:
    import mechedit
    from mechedit.data import read_counterfact
    from mechedit.editing import ROMEHyperParams, rome
    from mechedit.errors import InputError
    from mechedit.evaluation.counterfact import SCORE_KEYS, rewrite_scores

    torch.set_num_threads(args.threads)
    model = mechedit.load("smollm2-135m")
    records = read_counterfact(args.data)
    records = random.Random(args.seed).sample(records, min(args.n, len(records)))
    hp = ROMEHyperParams(layer=args.layer, mom2_source="model", mom2_n_samples=args.stats_samples,
                         mom2_max_tokens=args.stats_tokens)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "records.jsonl"
    done = {json.loads(line)["case_id"] for line in log.read_text().splitlines()} if log.exists() else set()
    (args.out / "config.json").write_text(json.dumps({
        "model": model.name, "model_fingerprint": model.fingerprint(), "data": str(args.data), "n": args.n,
        "seed": args.seed, "threads": torch.get_num_threads(), "hparams": hp.to_dict()}, indent=1))
    for rec in records:
        if rec.case_id in done:
            continue
        entry = {"case_id": rec.case_id, "prompt": rec.prompt, "target_true": rec.target_true,
                 "target_new": rec.target_new}
        before = rewrite_scores(model, rec)
        entry["unedited"] = {k: before[k] for k in SCORE_KEYS}
        started = time.perf_counter()
        cpu = time.process_time()
        try:
            handle = rome(model, rec, hp)
        except InputError as e:  # e.g. the model already answers the new target
            entry["skipped"] = str(e)
        else:
            entry["edit_seconds"] = time.perf_counter() - started
            entry["edit_cpu_seconds"] = time.process_time() - cpu
            try:
                after = rewrite_scores(model, rec)
            finally:
                handle.restore()
            entry["rome"] = {k: after[k] for k in SCORE_KEYS}
            entry["target_prob"] = handle.evidence["target_prob"]
            entry["update_ratio"] = handle.evidence["update_ratio"]
        entry["threads"] = torch.get_num_threads()
        entry["load_average"] = os.getloadavg()[0]
        with log.open("a") as f:
            f.write(json.dumps(entry) + "\n")
        print(json.dumps({k: entry.get(k) for k in ("case_id", "edit_seconds", "skipped")}), flush=True)


def summarise(out: Path) -> None:
    from mechedit.evaluation.stats import interval

    config = json.loads((out / "config.json").read_text())
    entries = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    edited = [e for e in entries if "rome" in e]
    rows = {}
    for side in ("unedited", "rome"):
        rows[side] = {k: interval([e[side][k] for e in edited]) for k in KEYS}
    secs = [e["edit_seconds"] for e in edited]
    cpus = [e["edit_cpu_seconds"] for e in edited]
    summary = {
        "config": config, "n_records_drawn": config["n"], "n_measured": len(entries), "n_edited": len(edited),
        "n_skipped": len(entries) - len(edited),
        "scores": {side: {k: {"mean": v[0], "lo": v[1], "hi": v[2]} for k, v in r.items()} for side, r in rows.items()},
        "edit_seconds_median": statistics.median(secs) if secs else None,
        "edit_cpu_seconds_median": statistics.median(cpus) if cpus else None,
        "edit_seconds_range": [min(secs), max(secs)] if secs else None,
        "load_average_mean": statistics.mean(e["load_average"] for e in entries) if entries else None,
        "published": PUBLISHED,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    hp = config["hparams"]

    def cell(v) -> str:
        return f"{100 * v[0]:.1f} [{100 * v[1]:.0f}–{100 * v[2]:.0f}]"

    lines = [
        "# ROME on CounterFact: SmolLM2-135M-Instruct (de-quantised Q4_1) beside GPT-2 XL (published)", "",
        (f"{len(edited)} records edited one at a time and restored ({len(entries) - len(edited)} skipped: the model "
        f"already gave the new target) of {config['n']} drawn at random (seed {config['seed']}) from "
        f"`{Path(config['data']).name}`; ROME at layer {hp['layer']}, key statistics from {hp['mom2_n_samples']} "
        f"texts sampled from the model ({hp['mom2_max_tokens']} tokens each). Success rates in %, 95% Wilson "
        "interval in brackets (efficacy, paraphrase: new target more likely than the true one; neighbourhood: the "
        "neighbour's own answer more likely than the new target; one paraphrase and one neighbour per record in "
        "this layout, ROME's file has several)."), "",
        "| model | ES | PS | NS |", "|---|---|---|---|",
        "| SmolLM2-135M (unedited), measured | " + " | ".join(cell(rows["unedited"][k]) for k in KEYS) + " |",
        "| SmolLM2-135M + ROME, measured | " + " | ".join(cell(rows["rome"][k]) for k in KEYS) + " |",
    ]
    lines += [f"| {name} | " + " | ".join(f"{v:.1f}" for v in vals) + " |" for name, vals in PUBLISHED.items()]
    if secs:
        lines += ["", (f"Time per edit (statistics cached): median {statistics.median(secs):.1f} s wall "
                       f"({min(secs):.1f}–{max(secs):.1f} s), median {statistics.median(cpus):.1f} s CPU, "
                       f"{config['threads']} thread(s), on a shared 2-core machine (mean load average "
                       f"{summary['load_average_mean']:.1f}).")]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=SHARED)
    ap.add_argument("--n", type=int, default=20, help="records drawn at random (seeded)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layer", type=int, default=8)
    ap.add_argument("--stats-samples", type=int, default=1000)
    ap.add_argument("--stats-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("runs/counterfact-smollm2"))
    ap.add_argument("--summarise", action="store_true", help="only rewrite the summary from records.jsonl")
    args = ap.parse_args()
    if not args.summarise:
        run(args)
    summarise(args.out)


if __name__ == "__main__":
    main()
