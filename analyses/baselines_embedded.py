"""The baselines (ft, ft-l, lora, reg-lora, icl) on the embedded world model: CounterFact efficacy, paraphrase and
neighbourhood success, exact-output locality and world/sum accuracy, each from ``mechedit eval`` on N seeded
world records edited one at a time (restore between records: the fair protocol for single-fact editing).

Run (each method is one ``mechedit eval`` process; ``--collect`` only rebuilds the table from finished runs):

    OMP_NUM_THREADS=1 python analyses/baselines_embedded.py -n 100                      # mechedit eval per method
    OMP_NUM_THREADS=1 python analyses/baselines_embedded.py -n 100 --methods reg-lora
    OMP_NUM_THREADS=1 python analyses/baselines_embedded.py -n 100 --workers 3          # interleaved, see run_part
    python analyses/baselines_embedded.py --collect

Writes ``docs/results/baselines-embedded/<method>/`` (evaluation.json, records.csv, evaluation.html, time.json),
``results.json`` and ``results.md`` (the table).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "docs" / "results" / "baselines-embedded"
METHODS = ("ft", "ft-l", "lora", "reg-lora", "icl")
COLUMNS = ("efficacy_success", "paraphrase_success", "neighborhood_success", "locality", "kl", "fact_accuracy",
           "sum_accuracy")


def run(method: str, n: int, seed: int) -> None:
    """One method, as `mechedit eval` runs it (its own unedited side, its own process)."""
    out = OUT / method
    cmd = [sys.executable, "-m", "mechedit", "eval", "--method", method, "-n", str(n), "--seed", str(seed),
           "--one-at-a-time", "--no-generation", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    seconds = time.perf_counter() - started
    (out / "time.json").write_text(json.dumps({"command": " ".join(["mechedit", *cmd[3:]]), "n": n, "seed": seed,
                                               "seconds": round(seconds, 1)}, indent=1))


def run_part(methods: list[str], n: int, seed: int, part: int, parts: int) -> None:
    """Records part, part + parts, ... of `mechedit eval`'s draw, every method on each record in turn (edit,
    evaluate, restore), each method's results saved after every record: a run stopped early keeps every record it
    finished, and all methods stop at (nearly) the same records. Same Evaluator and config as `mechedit eval
    --one-at-a-time --no-generation`."""
    import torch

    from mechedit.cli.eval import pick_records
    from mechedit.editing.methods import edit
    from mechedit.evaluation import EvalConfig, EvalResult, Evaluator
    from mechedit.model import load

    torch.set_num_threads(1)
    m = load()
    records = pick_records(m, None, n, seed)
    evaluator = Evaluator(m, EvalConfig(generation=False))
    evaluator.prepare(records)
    results: dict[str, list] = {k: [] for k in methods}
    cpu: dict[str, float] = {k: 0.0 for k in methods}
    for i in range(part, len(records), parts):
        for method in methods:
            t = time.process_time()
            handle = edit(m, [records[i]], method)
            try:
                results[method].append(evaluator.evaluate(handle, [records[i]], index=i))
            finally:
                handle.restore()
            cpu[method] += time.process_time() - t
            out = OUT / method
            out.mkdir(parents=True, exist_ok=True)
            EvalResult.merge(results[method]).save(out / f"part{part}.json")
            (out / f"part{part}.time.json").write_text(json.dumps({"records": len(results[method]),
                                                                   "cpu_seconds": round(cpu[method], 1)}))
        print(f"part {part}: record {i} done", flush=True)


def collect() -> dict:
    from mechedit.evaluation import EvalResult

    rows = {}
    for method in METHODS:
        path = OUT / method / "evaluation.json"
        parts = sorted((OUT / method).glob("part*[0-9].json"))
        partial = False
        if parts:  # --workers: merge the parts' records into one evaluation.json
            result = EvalResult.merge([EvalResult.load(p) for p in parts])
            result.save(path)
            times = [json.loads(p.with_suffix(".time.json").read_text()) for p in parts]
            (OUT / method / "time.json").write_text(json.dumps({
                "command": "python analyses/baselines_embedded.py --workers", "n_measured": len(result.to_frame()),
                "cpu_seconds": round(sum(t["cpu_seconds"] for t in times), 1)}, indent=1))
        elif path.is_file():
            result = EvalResult.load(path)
        elif (OUT / method / "evaluation.partial.json").is_file():  # mechedit eval stopped early
            result, partial = EvalResult.load(OUT / method / "evaluation.partial.json"), True
        else:
            continue
        summary = {k: list(v) for k, v in result.summary().items()}
        unedited = {k: list(v) for k, v in result.summary(edited=False).items()}
        timing = json.loads((OUT / method / "time.json").read_text()) if (OUT / method / "time.json").is_file() else {}
        rows[method] = {"n_records": len(result.to_frame()), "partial": partial, "summary": summary,
                        "unedited": unedited, **timing}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(rows, indent=1))
    lines = ["| method | records | " + " | ".join(COLUMNS) + " | seconds (wall, or CPU with --workers) |",
             "|---|---|" + "---|" * len(COLUMNS) + "---|"]
    for method, row in rows.items():
        cells = []
        for c in COLUMNS:
            v = row["summary"].get(c)
            cells.append("" if v is None else f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]")
        n = f"{row['n_records']}" + (" (partial)" if row["partial"] else "")
        lines.append(f"| {method} | {n} | " + " | ".join(cells) + f" | {row.get('seconds', row.get('cpu_seconds', ''))} |")
    if rows:
        first = next(iter(rows.values()))["unedited"]
        cells = [("" if first.get(c) is None else f"{first[c][0]:.3f}") for c in COLUMNS]
        lines.append("| (unedited) | | " + " | ".join(cells) + " | |")
    (OUT / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--collect", action="store_true", help="only rebuild results.json/results.md")
    ap.add_argument("--workers", type=int, default=0, help="run this many processes, each editing every method "
                    "on its share of the records in turn (see run_part)")
    ap.add_argument("--part", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part is not None:
        run_part(args.methods, args.n, args.seed, args.part, args.workers)
        return
    if args.workers:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs = [subprocess.Popen([sys.executable, __file__, "-n", str(args.n), "--seed", str(args.seed),
                                   "--methods", *args.methods, "--workers", str(args.workers), "--part", str(j)],
                                  env=env) for j in range(args.workers)]
        for p in procs:
            p.wait()
    elif not args.collect:
        for method in args.methods:
            run(method, args.n, args.seed)
    collect()


if __name__ == "__main__":
    main()
