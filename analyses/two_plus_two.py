"""Study 1: can a model answer "5" to "2+2=" and change nothing else?

The embedded world model knows its 100 single-digit sums. Each method edits "2+2=" -> "5" (one request, the
method's default hyperparameters; ROME at the layer located by causal tracing, the adapters on locate's module
set) and is measured, after the edit and with the model restored between methods, on

* **target**: the greedy answer to "2+2=" is "5";
* **paraphrases**: "2 + 2 =" (a form the model saw in training) and the worded "two plus two equals";
* **exact-output locality**: the share of unrelated prompts (a sample of the world's facts, its other sums and
  filler text) whose 4-token greedy continuation is token-for-token the unedited model's
  (:class:`mechedit.evaluation.Evaluator`), with the mean KL of the next-token distribution;
* **other sums**: accuracy on the other 99 sums;
* **neighbours that must not change**: "2+3=", "3+2=", "1+1=", "2+1=", "1+2=", "3+3=", "2+4=", "4+2=": the
  greedy answer is the unedited one.

Rates carry 95% Wilson intervals over prompts. Writes results.json, results.md and results.html/png to --out.

    python analyses/two_plus_two.py --out docs/results/two-plus-two
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import mechedit
from mechedit.answering import answers
from mechedit.data import EditRecord
from mechedit.editing.methods import edit
from mechedit.evaluation import EvalConfig, Evaluator
from mechedit.evaluation.stats import wilson

# "method" or "method:name=value;name=value" (hyperparameter overrides; the row is named by the whole string).
# ROME's key is the subject's last token; for a sum the "subject" is "2+2", so the second variant keys the edit at
# the "=" token, where the model has read both numbers.
METHODS = ("ft", "ft-l", "lora", "reg-lora", "rome", "rome:key_position=prompt_last", "ia3", "ia3-unlearn-learn",
           "icl")
PARAPHRASES = ("2 + 2 =", "two plus two equals")
NEIGHBOURS = ("2+3=", "3+2=", "1+1=", "2+1=", "1+2=", "3+3=", "2+4=", "4+2=")
REQUEST = EditRecord(case_id=0, template="{}=", subject="2+2", target_new="5", target_true="4",
                     paraphrases=PARAPHRASES, neighborhood=tuple((p, str(eval(p[:-1]))) for p in NEIGHBOURS))


def rate(hits: list[bool]) -> dict:
    lo, hi = wilson(sum(hits), len(hits))
    return {"value": sum(hits) / len(hits), "lo": lo, "hi": hi, "n": len(hits)}


def measure(model, handle, evaluator: Evaluator, before: dict) -> dict:
    """The study's numbers for one applied handle (None: the unedited model)."""
    ask = handle.prompt if handle is not None else (lambda p: p)
    prompts = [REQUEST.prompt, *PARAPHRASES, *NEIGHBOURS]
    got = {a.prompt: a.top.strip() for a in answers(model, [ask(p) for p in prompts])}
    got = {p: got[ask(p)] for p in prompts}
    result = evaluator.evaluate(handle, [REQUEST]) if handle is not None else evaluator.evaluate(None, [REQUEST])
    e = result.edits[0]
    return {
        "answers": got,
        "target": rate([got[REQUEST.prompt] == "5"]),
        "paraphrases": rate([got[p] == "5" for p in PARAPHRASES]),
        "neighbours_unchanged": rate([got[p] == before[p] for p in NEIGHBOURS]),
        "locality": {"value": e["locality"], "n": e["locality_n"],
                     **dict(zip(("lo", "hi"), wilson(round(e["locality"] * e["locality_n"]), e["locality_n"])))},
        "kl": e["kl"],
        "other_sums": {"value": e["sum_accuracy"], "unedited": e["pre_sum_accuracy"], "n": e["sum_accuracy_n"],
                       **dict(zip(("lo", "hi"), wilson(round(e["sum_accuracy"] * e["sum_accuracy_n"]),
                                                       e["sum_accuracy_n"])))},
        "facts": {"value": e["fact_accuracy"], "unedited": e["pre_fact_accuracy"], "n": e["fact_accuracy_n"]},
        "degenerate": e.get("degenerate"),
    }


def fmt(d: dict) -> str:
    return f"{d['value']:.2f} [{d['lo']:.2f}, {d['hi']:.2f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", type=Path, default=Path("docs/results/two-plus-two"))
    args = ap.parse_args()
    started = time.perf_counter()
    model = mechedit.load()
    evaluator = Evaluator(model, EvalConfig())
    before = {a.prompt: a.top.strip() for a in answers(model, [REQUEST.prompt, *PARAPHRASES, *NEIGHBOURS])}
    rows = {"unedited": measure(model, None, evaluator, before)}
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        t0 = time.perf_counter()
        name, _, overrides = method.partition(":")
        handle = edit(model, [REQUEST], name, [o for o in overrides.split(";") if o])
        try:
            rows[method] = measure(model, handle, evaluator, before)
            rows[method]["seconds"] = round(time.perf_counter() - t0, 1)
            rows[method]["evidence"] = {k: v for k, v in handle.evidence.items()
                                        if k in ("layer", "layer_choice", "modules", "target_prob")}
        finally:
            handle.restore()
        print(f"{method:18s} target {rows[method]['answers'][REQUEST.prompt]!r}  locality "
              f"{rows[method]['locality']['value']:.3f}  other sums {rows[method]['other_sums']['value']:.2f}",
              flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - started, 1),
            "model": model.name, "request": REQUEST.to_dict(), "unedited_answers": before}
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["| method | target \"5\" | paraphrases | exact-output locality | KL | other sums (unedited) | "
             "neighbours unchanged | degenerate |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['answers'][REQUEST.prompt]} | {fmt(r['paraphrases'])} | {fmt(r['locality'])} "
                     f"| {r['kl']:.4f} | {fmt(r['other_sums'])} ({r['other_sums']['unedited']:.2f}) | "
                     f"{fmt(r['neighbours_unchanged'])} | {r['degenerate'] if r['degenerate'] is None else round(r['degenerate'], 2)} |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import plotly.graph_objects as go

    from mechedit.viz.export import write_figures

    names = list(rows)
    fig = go.Figure()
    for key, label in (("paraphrases", "paraphrases"), ("locality", "exact-output locality"),
                       ("other_sums", "other sums"), ("neighbours_unchanged", "neighbours unchanged")):
        vals = [rows[n][key]["value"] for n in names]
        fig.add_bar(name=label, x=names, y=vals,
                    error_y={"type": "data", "symmetric": False,
                             "array": [rows[n][key]["hi"] - rows[n][key]["value"] for n in names],
                             "arrayminus": [rows[n][key]["value"] - rows[n][key]["lo"] for n in names]})
    fig.update_layout(barmode="group", title='"2+2=" -> "5": what else moved (95% Wilson intervals)',
                      yaxis={"range": [0, 1.05]})
    write_figures({"results": fig}, args.out)


if __name__ == "__main__":
    main()
