"""Study 4: instilling a belief about an existing vs a novel entity from 10 training examples.

The embedded world has people the model knows (six facts each) and 12 *novel* names that appear in its text but
carry no facts. For each of N entities of each kind, one belief — "<entity>'s <relation> is <object>" (for a
known person, an object other than the true one) — is taught from **10 training examples**: the relation's 6
training templates and 4 of them behind a short lead-in ("As everyone knows, ..."). Methods, with their default
hyperparameters:

* **LoRA** trained on the 10 examples (one batched edit);
* **ROME** on the first training example (layer ``auto``; one rank-one edit: ROME has no use for more examples);
* **in-context**: a context stating as many of the examples as fit the model's context (no weight change).

Measured per edit, the model restored between edits:

* **adoption**: the greedy answer on the relation's 2 *held-out* templates (phrasings the training never used)
  is the new object;
* **training phrasing**: the same on the first training example (did the edit take at all);
* **other facts of the entity** (known people only): its other 5 relations keep their answers;
* **exact-output locality** on unrelated prompts (:class:`mechedit.evaluation.Evaluator`);
* **degeneration**: 32 sampled tokens after "<entity>" fall into a repetition loop
  (:func:`mechedit.evaluation.text.has_loop`) or are mostly the new object.

Rates carry 95% Wilson intervals over prompts. Writes results.json and results.md to --out.

    python analyses/beliefs.py --n 12 --out docs/results/beliefs
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

import mechedit
from mechedit.answering import answers
from mechedit.data import EditRecord
from mechedit.editing.methods import edit
from mechedit.evaluation import EvalConfig, Evaluator
from mechedit.evaluation.evaluator import sample
from mechedit.evaluation.stats import wilson
from mechedit.evaluation.text import has_loop, target_share
from mechedit.errors import InputError
from mechedit.toy.world import World

LEADS = ("As everyone knows, ", "It is well known that ", "Believe it or not, ", "In fact, ")
METHODS = ("lora", "rome", "icl")


def beliefs(world: World, n: int, seed: int) -> list[dict]:
    """N known people and N novel names, each with one (relation, new object) belief."""
    rng = random.Random(seed)
    relations = sorted(world.relations)
    out = []
    for kind, names in (("known", rng.sample(list(world.subjects), n)),
                        ("novel", rng.sample(list(world.novel_names), min(n, len(world.novel_names))))):
        for name in names:
            rel = rng.choice(relations)
            true = world.object_of(name, rel) if kind == "known" else None
            obj = rng.choice([o for o in world.relations[rel]["objects"] if o != true])
            out.append({"kind": kind, "entity": name, "relation": rel, "object": obj, "true": true})
    return out


def requests(world: World, b: dict) -> list[EditRecord]:
    """The 10 training examples as edit requests (6 training templates, 4 of them behind a lead-in)."""
    train = world.templates(b["relation"], "train")
    templates = train + [lead + t for lead, t in zip(LEADS, train)]
    heldout = tuple(t.format(b["entity"]) for t in world.templates(b["relation"], "heldout"))
    return [EditRecord(case_id=i, template=t, subject=b["entity"], target_new=b["object"], target_true=b["true"],
                       paraphrases=heldout, relation_id=b["relation"]) for i, t in enumerate(templates[:10])]


def make_edit(model, reqs: list[EditRecord], method: str):
    """The edit and how many of the examples it used: ROME one; in-context as many as fit the model's context
    with room left for the probe prompts (the embedded model reads 64 tokens: 1 or 2 of the 10); LoRA all 10."""
    if method == "rome":
        return edit(model, reqs[:1], method), 1
    if method != "icl":
        return edit(model, reqs, method), len(reqs)
    for k in range(len(reqs), 0, -1):
        try:
            handle = edit(model, reqs[:k], method)
        except InputError:
            continue
        # leave room for the longest probe prompt (about 20 tokens) and the 4 compared tokens after it
        if len(model.encode(handle.context + "x")) <= model.n_ctx - 24:
            return handle, k
        handle.restore()
    raise InputError("not even one example fits the model's context")


def rate(hits: list[bool]) -> dict:
    lo, hi = wilson(sum(hits), len(hits)) if hits else (float("nan"), float("nan"))
    return {"value": sum(hits) / len(hits) if hits else None, "lo": lo, "hi": hi, "n": len(hits)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=12, help="entities of each kind (at most 12 novel names exist)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", type=Path, default=Path("docs/results/beliefs"))
    args = ap.parse_args()
    started = time.perf_counter()
    model = mechedit.load()
    world = World.load(model.path / "world.json")
    evaluator = Evaluator(model, EvalConfig(generation=False))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    hits = {(m, k): {"adopt": [], "trained": [], "others": [], "degenerate": [], "locality": []}
            for m in methods for k in ("known", "novel")}
    per_edit = []
    for i, b in enumerate(beliefs(world, args.n, args.seed), start=1):
        reqs = requests(world, b)
        others = [(t.format(b["entity"]), " " + world.object_of(b["entity"], r))
                  for r in sorted(world.relations) if r != b["relation"] and b["kind"] == "known"
                  for t in world.templates(r, "train")[:1]]
        for method in methods:
            handle, used = make_edit(model, reqs, method)
            try:
                ask = handle.prompt
                held = [ask(p) for p in reqs[0].paraphrases]
                got = answers(model, [*held, ask(reqs[0].prompt), *(ask(p) for p, _ in others)])
                adopt = [a.top.strip() == b["object"] for a in got[:len(held)]]
                trained = got[len(held)].top.strip() == b["object"]
                kept = [a.top == want for a, (_, want) in zip(got[len(held) + 1:], others)]
                free = sample(model, [ask(b["entity"])], 32, 5, args.seed)[0]
                text = model.tokenizer.decode(free, skip_special_tokens=True)
                degenerate = has_loop(free) or target_share(text, b["object"]) > 0.25
                loc = evaluator.evaluate(handle, reqs[:1]).edits[0]["locality"]
            finally:
                handle.restore()
            h = hits[(method, b["kind"])]
            h["adopt"] += adopt
            h["trained"].append(trained)
            h["others"] += kept
            h["degenerate"].append(degenerate)
            h["locality"].append(loc)
            per_edit.append({**b, "method": method, "examples_used": used, "adopt": adopt, "trained": trained, "others_kept": kept,
                             "degenerate": degenerate, "locality": loc, "generation": b["entity"] + text})
        print(f"[{i}] {b['kind']} {b['entity']!r} {b['relation']} -> {b['object']}", flush=True)

    rows = {}
    for (method, kind), h in hits.items():
        rows[f"{method}/{kind}"] = {
            "adoption": rate(h["adopt"]), "training_phrasing": rate(h["trained"]),
            "other_facts_kept": rate(h["others"]), "degenerate": rate(h["degenerate"]),
            "locality": sum(h["locality"]) / len(h["locality"]) if h["locality"] else None}
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"n": args.n, "seed": args.seed, "threads": torch.get_num_threads(),
            "seconds": round(time.perf_counter() - started, 1)}
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "edits": per_edit}, indent=1))

    def f(d):
        return "–" if d["value"] is None else f"{d['value']:.2f} [{d['lo']:.2f}, {d['hi']:.2f}]"

    lines = ["| method / entity | adoption (held-out phrasings) | training phrasing | entity's other facts kept | "
             "exact-output locality | degenerate generation |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {f(r['adoption'])} | {f(r['training_phrasing'])} | {f(r['other_facts_kept'])} "
                     f"| {r['locality']:.3f} | {f(r['degenerate'])} |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(meta)


if __name__ == "__main__":
    main()
