"""MEMIT at scale on the embedded model: one call with N embedded-world requests (default 1,000), timed, and
the efficacy of the result (ES: p(new) > p(true) on the edit prompt, PS on the paraphrase, NS on the neighbour;
:func:`mechedit.evaluation.counterfact.rewrite_scores`). The issue's target: 1,000 requests in <= 60 s on CPU.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_memit.py --n 1000

Key statistics are read from the cache (computed first, outside the timing, when missing). The time is split
into the stages MEMIT reports through ``progress``; the thread count and CPU load are printed with it.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", default="0,1,2")
    ap.add_argument("--hp", nargs="*", default=[], help="MEMITHyperParams overrides, name=value")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import mechedit
    from mechedit.editing.memit import MEMITHyperParams, memit
    from mechedit.editing.memit.memit_main import layer_statistics
    from mechedit.evaluation.counterfact import rewrite_scores
    from mechedit.toy.export import embedded_world, world_records

    model = mechedit.load()
    records = world_records(embedded_world(), n=args.n, seed=args.seed)
    hp = MEMITHyperParams(layers=tuple(int(x) for x in args.layers.split(","))).with_overrides(args.hp)
    layer_statistics(model, hp.layers, hp, None, None)  # warm the cache outside the timing
    stages: dict[str, float] = {}
    mark = [time.perf_counter()]

    def progress(stage, done, total):  # time since the last call goes to the stage now reporting
        now = time.perf_counter()
        if stage == "value" and done == 0:
            stage = "prepare"  # context templates, tokenizing, residuals before the value optimisation starts
        stages[stage] = stages.get(stage, 0.0) + now - mark[0]
        mark[0] = now

    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    mark[0] = t0
    handle = memit(model, records, hp, progress)
    seconds = time.perf_counter() - t0
    scores = [rewrite_scores(model, r) for r in records]
    handle.restore()

    def mean(key):
        vals = [s[key] for s in scores if s[key] is not None]
        return 100.0 * sum(vals) / len(vals)

    out = {"n_requests": args.n, "seconds": round(seconds, 1), "target_seconds": 60.0,
           "ratio_to_target": round(seconds / 60.0, 2), "threads": torch.get_num_threads(),
           "load_average_1min": load, "stages_seconds": {k: round(v, 1) for k, v in stages.items()},
           "ES": mean("efficacy_success"), "PS": mean("paraphrase_success"), "NS": mean("neighborhood_success"),
           "update_ratio": [p["update_ratio"] for p in handle.evidence["per_layer"]],
           "target_prob_mean": handle.evidence["target_prob_mean"], "hparams": hp.to_dict()}
    print(f"MEMIT, {args.n} requests in one call: {seconds:.1f} s on {out['threads']} thread(s) "
          f"(1-min load average {load:.1f} on {os.cpu_count()} cores); target 60 s -> {out['ratio_to_target']}x")
    print(f"  stages: {out['stages_seconds']}")
    print(f"  ES {out['ES']:.1f}  PS {out['PS']:.1f}  NS {out['NS']:.1f}  ‖ΔW‖/‖W‖ per layer "
          f"{[round(r, 2) for r in out['update_ratio']]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
