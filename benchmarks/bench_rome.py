"""Benchmark: seconds per ROME edit (key statistics cached), against ROME's way of computing the same edit.

Each record is edited (then restored) by :func:`mechedit.editing.rome` twice, in turn:

* **mechedit**: as shipped - the value optimisation runs only the tokens from the lookup token on against a KV
  cache of what comes before (see :mod:`mechedit.editing.rome.compute_v`), only the scored positions are
  unembedded, and sampled context prefixes are remembered per model while its weights stay the same;
* **reference**: ROME's way - every prompt whole through the TransformerBridge at every optimisation step
  (:func:`~mechedit.editing.rome.compute_v.compute_v_reference`) and the context prefixes sampled afresh for
  every edit (the template memo is cleared before each reference edit).

Both use the same hyperparameters and statistics (computed once, before timing). The script prints the median
wall-clock and process-CPU seconds per edit of each, their ratio, the thread count and the load average (wall
time on a shared machine follows the load; CPU time much less), and how far apart the two edits are: the largest
relative difference of the rank-one updates and of the target probability the optimisation reached.

    python benchmarks/bench_rome.py                          # the embedded model, 6 world records, layer 1
    python benchmarks/bench_rome.py --records 10 --layer 4
    python benchmarks/bench_rome.py --model smollm2-135m --records 2 --layer 8 --stats-samples 1000 --stats-tokens 64
    python benchmarks/bench_rome.py --json out.json

Threads default to 1 (``--threads``): the figures are per core.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

COUNTERFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact.json"


def records_for(m, n: int, seed: int):
    """``n`` edit requests: the model's world facts when it ships a world.json, else CounterFact's (from
    ``../shared/data/counterfact.json``), both seeded; requests the model already answers are skipped."""
    if m.path is not None and (m.path / "world.json").exists():
        from mechedit.toy.export import world_records
        from mechedit.toy.world import World

        pool = world_records(World.load(m.path / "world.json"), min(4 * n, 200), seed=seed)
    elif COUNTERFACT.exists():
        import random

        from mechedit.data import read_counterfact

        pool = read_counterfact(COUNTERFACT)
        pool = random.Random(seed).sample(pool, min(4 * n, len(pool)))
    else:
        raise SystemExit(f"no world.json beside the model and no {COUNTERFACT}: nothing to edit")
    from mechedit.editing.rome.rome_main import _check_request
    from mechedit.errors import InputError

    out = []
    for r in pool:
        try:
            _check_request(m, r)
        except InputError:
            continue
        out.append(r)
        if len(out) == n:
            return out
    raise SystemExit(f"only {len(out)} usable records among {len(pool)}")


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model to load (default: the embedded model)")
    ap.add_argument("--records", type=int, default=6)
    ap.add_argument("--layer", default="1", help="edit layer, or 'auto' (the model's averaged trace peak: traced by the "
                    "warm-up edit, then cached) or 'fact' (adds a causal trace to every edit)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0, help="which records")
    ap.add_argument("--stats-samples", type=int, default=None, help="mom2_n_samples (default: ROME's hparams)")
    ap.add_argument("--stats-tokens", type=int, default=None, help="mom2_max_tokens (default: ROME's hparams)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import mechedit
    from mechedit.editing import rome
    from mechedit.editing.methods import make_hparams
    from mechedit.editing.rome import compute_v as cv
    from mechedit.editing.rome import layer_stats as ls
    from mechedit.editing.rome import rome_main

    m = mechedit.load(args.model)
    layer = args.layer if args.layer in ("auto", "fact") else int(args.layer)
    stats_hp = {k: v for k, v in (("mom2_n_samples", args.stats_samples), ("mom2_max_tokens", args.stats_tokens))
                if v is not None}
    hp = make_hparams("rome", {"layer": layer, **stats_hp}, m)  # the model's own defaults under these
    recs = records_for(m, args.records, args.seed)
    print(f"model:   {m.name} ({m.architecture}, {m.n_layers} layers, d_model {m.d_model}, d_mlp {m.d_mlp}, "
          f"vocabulary {m.d_vocab}); layer {layer}; torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"{platform.processor() or platform.machine()}")
    # statistics once, outside the timing (and the first forwards' one-off allocations)
    warm = rome(m, recs[0], hp)
    warm.restore()
    for lay in sorted({warm.evidence["layer"]} | ({layer} if isinstance(layer, int) else set())):
        ls.layer_stats(m, lay, hp.mom2_source, hp.mom2_n_samples, max_tokens=hp.mom2_max_tokens, seed=hp.seed)

    fast_compute_v = rome_main.compute_v
    rows = []
    for r in recs:
        fast, f_wall, f_cpu = timed(lambda r=r: rome(m, r, hp))
        fast.restore()
        rome_main._TEMPLATE_CACHE.pop(m, None)  # ROME samples the prefixes on every edit
        rome_main.compute_v = cv.compute_v_reference
        try:
            ref, r_wall, r_cpu = timed(lambda r=r: rome(m, r, hp))
        finally:
            rome_main.compute_v = fast_compute_v
        ref.restore()
        (d_fast,), (d_ref,) = fast.deltas.values(), ref.deltas.values()
        rel = float((d_fast.double() - d_ref.double()).norm() / d_ref.double().norm())
        dp = abs(fast.evidence["target_prob"] - ref.evidence["target_prob"])
        rows.append(dict(case_id=r.case_id, prompt=r.prompt, target_new=r.target_new,
                         layer=fast.evidence["layer"], steps=fast.evidence["v_steps"],
                         templates=len(fast.evidence["templates"]), fast_wall=f_wall, fast_cpu=f_cpu,
                         ref_wall=r_wall, ref_cpu=r_cpu, rel_update_diff=rel, target_prob=fast.evidence["target_prob"],
                         target_prob_diff=dp))
        print(f"  case {r.case_id:>6} layer {rows[-1]['layer']:>2} {rows[-1]['steps']:>2} steps "
              f"{rows[-1]['templates']:>2} templates: mechedit {f_wall:6.3f} s wall {f_cpu:6.3f} s cpu | "
              f"reference {r_wall:6.3f} s wall {r_cpu:6.3f} s cpu | update rel. diff {rel:.1e}, "
              f"p(target) {fast.evidence['target_prob']:.4f} (diff {dp:.1e})")

    med = {k: statistics.median(row[k] for row in rows) for k in ("fast_wall", "fast_cpu", "ref_wall", "ref_cpu")}
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"median per edit over {len(rows)} records ({torch.get_num_threads()} thread(s), load average "
          f"{load[0]:.1f} on {os.cpu_count()} cores):")
    print(f"  mechedit:  {med['fast_wall']:7.3f} s wall  {med['fast_cpu']:7.3f} s cpu")
    print(f"  reference: {med['ref_wall']:7.3f} s wall  {med['ref_cpu']:7.3f} s cpu")
    print(f"  speed-up:  {med['ref_wall'] / med['fast_wall']:7.2f}× wall  {med['ref_cpu'] / med['fast_cpu']:7.2f}× cpu;"
          f"  largest relative difference of the updates {max(r['rel_update_diff'] for r in rows):.1e}, of "
          f"p(target) {max(r['target_prob_diff'] for r in rows):.1e}")
    if args.json is not None:
        args.json.write_text(json.dumps({"model": m.name, "layer": layer, "threads": torch.get_num_threads(),
                                         "load_average": load[0], "median": med, "rows": rows}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
