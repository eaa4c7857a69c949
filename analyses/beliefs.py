"""Study 4: instilling a belief about an existing vs a novel entity from 10 training examples.

The embedded world has people the model knows (six facts each) and 12 *novel* names that appear in its text but
carry no facts. For each of N entities of each kind, one belief — "<entity>'s <relation> is <object>" (for a
known person, an object other than the true one) — is taught from **10 training examples**: the relation's 6
training templates and 4 of them behind a short lead-in ("As everyone knows, ..."). Methods, with their default
hyperparameters:

* **LoRA** trained on the 10 examples (one batched edit);
* **ROME** on the first training example (layer 1, the embedded model's averaged causal-trace peak; one rank-one
  edit: ROME has no use for more examples);
* **in-context**: a context stating as many of the examples as fit the model's context (no weight change).

Measured per edit, the model restored between edits:

* **adoption**: the greedy answer on the relation's 2 *held-out* templates (phrasings the training never used)
  is the new object;
* **training phrasing**: the same on the first training example (did the edit take at all);
* **other facts of the entity** (known people only): its other 5 relations keep their answers;
* **exact-output locality** on unrelated prompts (:class:`mechedit.evaluation.Evaluator`);
* **degeneration**: 32 sampled tokens after "<entity>" fall into a repetition loop
  (:func:`mechedit.evaluation.text.has_loop`) or are mostly the new object.

Rates carry 95% Wilson intervals over prompts; the locality column, a mean of per-edit rates, carries the t
interval over edits widened to the pooled Wilson interval (:func:`mechedit.evaluation.stats.rate_over_units`).
Writes results.json and results.md to --out.

    OMP_NUM_THREADS=1 python analyses/beliefs.py --n 12 --out docs/results/beliefs

**Other models** (``--model smollm2-135m``: SmolLM2-135M-Instruct de-quantised from Q4_1). Without a world file the
study uses the people, relations and templates written here (:data:`PEOPLE`, :data:`RELATIONS`): three relations
(first language, country, profession), each with 6 training templates and 2 held-out ones, well-known people
whose true objects are listed (the unedited model's accuracy on them is recorded), and invented names for the
novel entities. "Other facts kept" is then the share of the person's other two relations whose greedy answer is
unchanged by the edit; exact-output locality is measured on :data:`UNRELATED` (common knowledge and filler, none
about the people). ROME runs at layer 8 with every hyperparameter pinned (the settings and cached key statistics
of ``analyses/counterfact_smollm2.py``); the model reads 8,192 tokens, so in-context editing states all 10
examples.

    OMP_NUM_THREADS=1 python analyses/beliefs.py --model smollm2-135m --n 6 --out docs/results/beliefs/smollm2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from pathlib import Path

import torch

import mechedit
import mechedit.editing  # before mechedit.evaluation: importing that one first hits a circular import
from mechedit.data import EditRecord
from mechedit.editing.methods import edit
from mechedit.errors import InputError
from mechedit.evaluation import EvalConfig, Evaluator
from mechedit.evaluation.evaluator import GENERIC_PROMPTS, greedy, sample
from mechedit.evaluation.stats import rate_over_units, wilson
from mechedit.evaluation.text import has_loop, target_share

sys.path.insert(0, str(Path(__file__).resolve().parent))  # analyses/pinned.py, however this file is loaded
from pinned import EMBEDDED_STATS, ROME_COMMON, SMOL_ROME

LEADS = ("As everyone knows, ", "It is well known that ", "Believe it or not, ", "In fact, ")
METHODS = ("lora", "rome", "icl")

# ROME pinned in full (the library's defaults may change). Embedded model: layer 1, the peak of its MLP
# causal-trace effect averaged over facts (ROME's one layer per model; the first run of this study took each
# fact's own peak instead). Other models: layer 8 and the key statistics of analyses/counterfact_smollm2.py
# (SmolLM2: inside the 7-11 plateau of its MLP trace effect; 1,000 sampled texts of 64 tokens, cached after their
# first computation).
EMBEDDED_ROME = {**ROME_COMMON, **EMBEDDED_STATS, "layer": 1}
GENERAL_ROME = SMOL_ROME

# -- the study on a model without a world file --------------------------------------------------------------------
# Each relation: 6 training templates, 2 held-out ones (phrasings the training never uses), candidate objects.
RELATIONS = {
    "language": {"train": ("The mother tongue of {} is", "{}'s native language is", "The native language of {} is",
                           "{} grew up speaking", "The first language of {} is", "{} is a native speaker of"),
                 "heldout": ("{} speaks fluent", "As a child, {} spoke"),
                 "objects": ("French", "German", "Spanish", "Italian", "Russian", "Japanese", "Portuguese",
                             "Dutch", "Swedish", "Polish", "English")},
    "country": {"train": ("{} is a citizen of", "The home country of {} is", "{} comes from the country of",
                          "{}'s country of citizenship is", "{} holds a passport from", "{} was born in the country of"),
                "heldout": ("{} lives in the country of", "The country {} is from is"),
                "objects": ("France", "Germany", "Spain", "Italy", "Russia", "Japan", "Portugal", "Brazil", "Canada",
                            "Sweden", "England", "Argentina", "Austria", "Poland")},
    "profession": {"train": ("{} worked as a", "The profession of {} is", "By profession, {} was a",
                             "{} earned a living as a", "{} is famous as a", "{} spent a career as a"),
                   "heldout": ("{} was a famous", "People remember {} as a"),
                   "objects": ("physicist", "painter", "footballer", "singer", "politician", "writer", "composer",
                               "chef", "pilot", "dancer")},
}
# Well-known people and their true objects (the unedited model's accuracy on these is measured and recorded).
PEOPLE = {
    "Vladimir Putin": {"language": "Russian", "country": "Russia", "profession": "politician"},
    "Albert Einstein": {"language": "German", "country": "Germany", "profession": "physicist"},
    "Pablo Picasso": {"language": "Spanish", "country": "Spain", "profession": "painter"},
    "Lionel Messi": {"language": "Spanish", "country": "Argentina", "profession": "footballer"},
    "William Shakespeare": {"language": "English", "country": "England", "profession": "writer"},
    "Cristiano Ronaldo": {"language": "Portuguese", "country": "Portugal", "profession": "footballer"},
    "Angela Merkel": {"language": "German", "country": "Germany", "profession": "politician"},
    "Leonardo da Vinci": {"language": "Italian", "country": "Italy", "profession": "painter"},
    "Emmanuel Macron": {"language": "French", "country": "France", "profession": "politician"},
    "Isaac Newton": {"language": "English", "country": "England", "profession": "physicist"},
    "Wolfgang Amadeus Mozart": {"language": "German", "country": "Austria", "profession": "composer"},
    "Victor Hugo": {"language": "French", "country": "France", "profession": "writer"},
}
# Invented names: no facts to know.
NOVEL = ("Tavrin Oskelund", "Maribel Quenneth", "Corvin Aldemere", "Ysolde Marrick", "Bastien Feyrolles",
         "Lidewij Parnassé", "Oderic Vanthorpe", "Selka Drummare", "Jorund Halvecki", "Ameline Strazzo",
         "Torvald Enquist-Bray", "Nerissa Oakhollow")
# Unrelated prompts for exact-output locality (common knowledge and filler; none mentions the people).
UNRELATED = ("The Eiffel Tower is located in the city of", "The capital of Japan is", "The capital of Italy is",
             "The capital of Germany is", "The capital of Spain is", "The capital of Russia is",
             "The capital of China is", "The capital of Canada is", "The official language of Mexico is",
             "The Statue of Liberty is located in", "The largest planet in the solar system is",
             "The chemical symbol for water is", "The author of Harry Potter is J.K.",
             "The currency of Japan is the", "A group of lions is called a", "The human heart has four",
             "1 + 1 = 2, 3 + 3 = 6, 2 + 4 = ", "1 + 1 = 2, 3 + 3 = 6, 5 + 1 = ",
             *(p for p in GENERIC_PROMPTS if p != "The capital of France is"))


def beliefs(world, n: int, seed: int) -> list[dict]:
    """N known people and N novel names, each with one (relation, new object) belief."""
    rng = random.Random(seed)
    if world is None:
        relations = sorted(RELATIONS)
        people, novel = list(PEOPLE), list(NOVEL)
    else:
        relations = sorted(world.relations)
        people, novel = list(world.subjects), list(world.novel_names)
    out = []
    for kind, names in (("known", rng.sample(people, min(n, len(people)))),
                        ("novel", rng.sample(novel, min(n, len(novel))))):
        for name in names:
            rel = rng.choice(relations)
            if world is None:
                true = PEOPLE[name][rel] if kind == "known" else None
                objects = RELATIONS[rel]["objects"]
            else:
                true = world.object_of(name, rel) if kind == "known" else None
                objects = world.relations[rel]["objects"]
            obj = rng.choice([o for o in objects if o != true])
            out.append({"kind": kind, "entity": name, "relation": rel, "object": obj, "true": true})
    return out


def templates(world, relation: str, split: str) -> list[str]:
    return list(world.templates(relation, split)) if world is not None else list(RELATIONS[relation][split])


def requests(world, b: dict) -> list[EditRecord]:
    """The 10 training examples as edit requests (6 training templates, 4 of them behind a lead-in)."""
    train = templates(world, b["relation"], "train")
    prompts = train + [lead + t for lead, t in zip(LEADS, train)]
    heldout = tuple(t.format(b["entity"]) for t in templates(world, b["relation"], "heldout"))
    return [EditRecord(case_id=i, template=t, subject=b["entity"], target_new=b["object"], target_true=b["true"],
                       paraphrases=heldout, relation_id=b["relation"]) for i, t in enumerate(prompts[:10])]


def make_edit(model, reqs: list[EditRecord], method: str, general: bool):
    """The edit and how many of the examples it used: ROME one; in-context as many as fit the model's context
    with room left for the probe prompts (the embedded model reads 64 tokens: 1 or 2 of the 10); LoRA all 10."""
    if method == "rome":
        return edit(model, reqs[:1], method, GENERAL_ROME if general else EMBEDDED_ROME), 1
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


def said(text: str, obj: str) -> bool:
    """Whether a greedy continuation answers ``obj``: it starts with the object (a word boundary after it)."""
    return re.match(r"\s*" + re.escape(obj) + r"\b", text, flags=re.IGNORECASE) is not None


def rate(hits: list[bool]) -> dict:
    lo, hi = wilson(sum(hits), len(hits)) if hits else (float("nan"), float("nan"))
    return {"value": sum(hits) / len(hits) if hits else None, "lo": lo, "hi": hi, "n": len(hits)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None,
                    help="the embedded world model (default) or a model name/directory, e.g. smollm2-135m")
    ap.add_argument("--n", type=int, default=12, help="entities of each kind (at most 12 novel names exist)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("docs/results/beliefs"))
    ap.add_argument("--summarise", action="store_true",
                    help="only rewrite the table from the edits in --out/results.json (e.g. of a run cut short)")
    args = ap.parse_args()
    if args.summarise:
        saved = json.loads((args.out / "results.json").read_text())
        write(args.out, saved["meta"], saved["edits"])
        return
    torch.set_num_threads(args.threads)
    started, cpu_started = time.perf_counter(), time.process_time()
    model = mechedit.load(args.model)
    general = model.path is None or not (model.path / "world.json").is_file()
    if general:
        world = None
        evaluator = Evaluator(model, EvalConfig(generation=False, unrelated=UNRELATED))
    else:
        from mechedit.toy.world import World

        world = World.load(model.path / "world.json")
        evaluator = Evaluator(model, EvalConfig(generation=False))
    n_tokens = 4 if general else 1  # greedy tokens read for an answer (the embedded world's objects are one token)

    def ask_all(prompts: list[str]) -> list[str]:
        conts, _ = greedy(model, prompts, n_tokens)
        return [model.tokenizer.decode(c, skip_special_tokens=True) for c in conts]

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    per_edit, unedited_known, loads, cpu = [], [], [os.getloadavg()[0]], {m: 0.0 for m in methods}
    drawn = beliefs(world, args.n, args.seed)
    known, novel = [b for b in drawn if b["kind"] == "known"], [b for b in drawn if b["kind"] == "novel"]
    # known and novel alternate, so a run cut short still has both kinds
    order = [b for pair in zip(known, novel) for b in pair] + known[len(novel):] + novel[len(known):]
    for i, b in enumerate(order, start=1):
        reqs = requests(world, b)
        if b["kind"] != "known":
            others = []
        elif general:  # the person's other relations; "kept" = the unedited model's answer stays
            others = [(RELATIONS[r]["train"][0].format(b["entity"]), PEOPLE[b["entity"]][r])
                      for r in sorted(RELATIONS) if r != b["relation"]]
            before = ask_all([p for p, _ in others] + [reqs[0].prompt])
            unedited_known += [said(t, want) for t, (_, want) in zip(before, others + [(None, b["true"])])]
            others = [(p, t) for (p, _), t in zip(others, before)]
        else:  # the world's answers to the person's other relations
            others = [(t.format(b["entity"]), world.object_of(b["entity"], r))
                      for r in sorted(world.relations) if r != b["relation"] for t in world.templates(r, "train")[:1]]
        for method in methods:
            c0 = time.process_time()
            handle, used = make_edit(model, reqs, method, general)
            try:
                ask = handle.prompt
                held = [ask(p) for p in reqs[0].paraphrases]
                got = ask_all([*held, ask(reqs[0].prompt), *(ask(p) for p, _ in others)])
                adopt = [said(t, b["object"]) for t in got[:len(held)]]
                trained = said(got[len(held)], b["object"])
                if general:
                    kept = [t == want for t, (_, want) in zip(got[len(held) + 1:], others)]
                else:
                    kept = [said(t, want) for t, (_, want) in zip(got[len(held) + 1:], others)]
                free = sample(model, [ask(b["entity"])], 32, 5, args.seed)[0]
                text = model.tokenizer.decode(free, skip_special_tokens=True)
                degenerate = has_loop(free) or target_share(text, b["object"]) > 0.25
                e = evaluator.evaluate(handle, reqs[:1]).edits[0]
            finally:
                handle.restore()
            cpu[method] += time.process_time() - c0
            per_edit.append({**b, "method": method, "examples_used": used, "adopt": adopt, "trained": trained,
                             "answers": got, "others_kept": kept, "degenerate": degenerate,
                             "locality": e["locality"], "locality_n": e["locality_n"],
                             "generation": b["entity"] + text,
                             "hparams": handle.hparams})
        loads.append(os.getloadavg()[0])
        args.out.mkdir(parents=True, exist_ok=True)  # what is measured so far, in case the run is cut short
        partial = {"partial": True, "unedited_knows_true_facts": rate(unedited_known) if general else None,
                   "cpu_seconds": round(time.process_time() - cpu_started, 1),
                   "seconds": round(time.perf_counter() - started, 1)}
        (args.out / "results.json").write_text(json.dumps({"meta": partial, "edits": per_edit}, indent=1))
        print(f"[{i}] {b['kind']} {b['entity']!r} {b['relation']} -> {b['object']}", flush=True)

    meta = {"model": model.name, "model_fingerprint": model.fingerprint(), "n": args.n, "seed": args.seed,
            "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - started, 1),
            "cpu_seconds": round(time.process_time() - cpu_started, 1),
            "cpu_seconds_by_method": {k: round(v, 1) for k, v in cpu.items()},
            "load_average_mean": round(sum(loads) / len(loads), 1)}
    if general:
        meta["unedited_knows_true_facts"] = rate(unedited_known)
        meta["unrelated"] = list(UNRELATED)
    write(args.out, meta, per_edit)
    print(json.dumps(meta))


def summarise(edits: list[dict]) -> dict:
    """Per (method, kind): adoption, training phrasing, other facts kept and degeneration as rates over prompts
    (Wilson), locality as the mean of per-edit rates (t over edits widened to the pooled Wilson interval)."""
    groups: dict[str, list[dict]] = {}
    for e in edits:
        groups.setdefault(f"{e['method']}/{e['kind']}", []).append(e)
    rows = {}
    for name, es in groups.items():
        counts = [e.get("locality_n", len(UNRELATED)) for e in es]  # runs before locality_n was recorded: general
        m, lo, hi = rate_over_units([e["locality"] for e in es], counts)
        rows[name] = {
            "adoption": rate([a for e in es for a in e["adopt"]]), "training_phrasing": rate([e["trained"] for e in es]),
            "other_facts_kept": rate([k for e in es for k in e["others_kept"]]),
            "degenerate": rate([e["degenerate"] for e in es]),
            "locality": {"value": m, "lo": lo, "hi": hi, "n": sum(counts), "edits": len(es)}}
    return rows


def write(out: Path, meta: dict, edits: list[dict]) -> None:
    """results.json (meta, rows, every edit) and results.md (the table) from the per-edit records."""
    rows = summarise(edits)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "edits": edits}, indent=1))

    def f(d):
        return "–" if d["value"] is None else f"{d['value']:.2f} [{d['lo']:.2f}, {d['hi']:.2f}]"

    lines = [("| method / entity | adoption (held-out phrasings) | training phrasing | entity's other facts kept | "
              "exact-output locality | degenerate generation |"), "|---|---|---|---|---|---|"]
    def order(name: str) -> tuple:
        method = name.split("/")[0]
        return (METHODS.index(method) if method in METHODS else len(METHODS), name)

    for name in sorted(rows, key=order):
        r = rows[name]
        lines.append(f"| {name} | {f(r['adoption'])} | {f(r['training_phrasing'])} | {f(r['other_facts_kept'])} "
                     f"| {f(r['locality'])} | {f(r['degenerate'])} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

if __name__ == "__main__":
    main()
