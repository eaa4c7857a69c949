"""Does locating matter for (IA)³? On the same embedded-world facts, one edit per fact with

* ``located``: (IA)³ on locate's 10 modules (``modules="auto"``);
* ``random``: (IA)³ on 10 modules drawn at random (seed = the fact's index), the same number;
* ``all``: (IA)³ on every linear module of every layer;
* ``unlearn-learn``: the two-stage recipe on the located modules (the same ones ``located`` used);
* ``ft`` (with ``--ft``): direct fine-tuning of all weights (``mechedit.editing.finetune``, trained on the prompt
  and its paraphrase; its own defaults otherwise).

Measured after each edit (then restored), all by greedy decoding of the edited model:

* **new-fact accuracy**: the greedy next token is ``target_new``'s first token, on the edit prompt (efficacy), on
  the request's paraphrase (which the adapters train on) and on the relation's *other* held-out template (never
  trained on: generalisation);
* **forget rate**: the greedy next token on the edit prompt is no longer ``target_true``'s first token;
* **control-fact accuracy**: on the edited subject's other five relations (``same-subject``) and on 100 facts of
  other subjects (``other``), the fraction answered correctly (greedy first token = the true object's), next to
  the unedited model's fraction;
* **exact-output locality**: the fraction of unrelated prompts (the 100 other-subject facts, 30 sums, 20 filler
  sentences) whose 4-token greedy continuation is exactly the unedited model's.

The project's ``evaluate`` was not committed when this was written, so these are computed here with plain greedy
decoding through the bridge.

    OMP_NUM_THREADS=1 .venv/bin/python analyses/ia3_compare.py --n 30 --out docs/results/ia3-compare
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from pathlib import Path

import torch

import mechedit
from mechedit.editing.methods import edit
from mechedit.toy.export import embedded_world, world_records
from mechedit.tracing.common import encode_target

GEN_TOKENS = 4


@torch.no_grad()
def greedy(model, prompts: list[str], n_tokens: int) -> list[tuple[int, ...]]:
    """Greedy continuation (token ids) of each prompt through the bridge; prompts of equal length share a batch."""
    encoded = [model.encode(p) for p in prompts]
    out: list[tuple[int, ...] | None] = [None] * len(prompts)
    by_len: dict[int, list[int]] = {}
    for i, e in enumerate(encoded):
        by_len.setdefault(len(e), []).append(i)
    for idx in by_len.values():
        ids = torch.tensor([encoded[i] for i in idx], device=model.device)  # (B, T)
        new = []
        for _ in range(n_tokens):
            nxt = model.bridge(ids)[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            new.append(nxt)
            ids = torch.cat([ids, nxt], dim=1)
        gen = torch.cat(new, dim=1).tolist()  # (B, n_tokens)
        for i, g in zip(idx, gen):
            out[i] = tuple(g)
    return out  # type: ignore[return-value]


def first_token(model, prompt: str, answer: str) -> int:
    return encode_target(model, prompt, answer)[0]


def accuracy(model, pairs: list[tuple[str, str]], wrong: Counter | None = None) -> list[bool]:
    """Whether the greedy next token of each prompt is its answer's first token (wrong answers, decoded, are
    counted into ``wrong``)."""
    got = greedy(model, [p for p, _ in pairs], 1)
    ok = [g[0] == first_token(model, p, a) for g, (p, a) in zip(got, pairs)]
    if wrong is not None:
        wrong.update(model.tokenizer.decode([g[0]]) for g, good in zip(got, ok) if not good)
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=30, help="facts to edit (one edit each)")
    ap.add_argument("--seed", type=int, default=0, help="which facts (world_records seed)")
    ap.add_argument("--ft", action="store_true", help="also direct fine-tuning of all weights")
    ap.add_argument("--unlearn-steps", default="", help="comma-separated unlearn_steps values: extra "
                    "unlearn-learn conditions (e.g. '5,20') besides the default")
    ap.add_argument("--only-unlearn", action="store_true", help="run only the unlearn-learn conditions "
                    "(located modules come from locate, as in 'located')")
    ap.add_argument("--out", type=Path, default=Path("docs/results/ia3-compare"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    start = time.time()

    m = mechedit.load()
    world = embedded_world()
    records = world_records(world, n=args.n, seed=args.seed)
    edited_subjects = {r.subject for r in records}
    rng = random.Random(args.seed)
    others = rng.sample([f for f in world.facts if f.subject not in edited_subjects], 100)
    other_pairs = [(rng.choice(world.templates(f.relation)).replace("{}", f.subject), f.object) for f in others]
    sums = [(p, a) for p, a in world.sum_prompts()]
    unrelated = [p for p, _ in other_pairs] + [p for p, _ in rng.sample(sums, 30)] + \
        [" ".join(s.split()[:5]) for s in world.filler(random.Random(args.seed + 7), 20)]
    base_unrelated = greedy(m, unrelated, GEN_TOKENS)
    base_other = accuracy(m, other_pairs)

    conditions = {
        "located": lambda r, mods: ("ia3", {"modules": "auto"}),
        "random": lambda r, mods: ("ia3", {"modules": "random", "seed": int(r.case_id)}),
        "all": lambda r, mods: ("ia3", {"modules": "all"}),
        "unlearn-learn": lambda r, mods: ("ia3-unlearn-learn", {"modules": mods}),
    }
    for steps in (int(x) for x in args.unlearn_steps.split(",") if x.strip()):
        conditions[f"unlearn-learn (unlearn_steps={steps})"] = (
            lambda r, mods, steps=steps: ("ia3-unlearn-learn", {"modules": mods, "unlearn_steps": steps}))
    if args.ft:
        conditions["ft"] = lambda r, mods: ("ft", {"use_paraphrases": True})
    if args.only_unlearn:
        conditions = {k: v for k, v in conditions.items() if k == "located" or k.startswith("unlearn")}

    rows = []
    for k, r in enumerate(records):
        heldout = [t.replace("{}", r.subject) for t in world.templates(r.relation_id, "heldout")]
        unseen = [p for p in heldout if p not in r.paraphrases]
        same_subject = [(world.templates(f.relation)[0].replace("{}", r.subject), f.object) for f in world.facts
                        if f.subject == r.subject and f.relation != r.relation_id]
        base_same = accuracy(m, same_subject)
        base_prompt = accuracy(m, [(r.prompt, r.target_true)])[0]
        located_modules = None
        for name, spec in conditions.items():
            method, hp = spec(r, located_modules)
            t0 = time.time()
            with edit(m, [r], method, hp) as h:
                secs = time.time() - t0
                if name == "located":
                    located_modules = list(h.evidence["modules"])
                new = accuracy(m, [(r.prompt, r.target_new), (r.paraphrases[0], r.target_new),
                                   *((p, r.target_new) for p in unseen)])
                old = accuracy(m, [(r.prompt, r.target_true)])[0]
                same = accuracy(m, same_subject)
                wrong: Counter = Counter()
                other = accuracy(m, other_pairs, wrong)
                gen = greedy(m, unrelated, GEN_TOKENS)
                ev = h.evidence
                rows.append({
                    "case_id": r.case_id, "condition": name, "method": method, "hparams": h.hparams,
                    "modules": ev.get("modules"), "n_params_changed": sum(int(d.numel()) for d in h.deltas.values()),
                    "seconds": round(secs, 2),
                    "final_loss": (ev.get("losses") or ev.get("learn_losses") or [None])[-1],
                    "efficacy": new[0], "paraphrase_trained": new[1],
                    "paraphrase_unseen": sum(new[2:]) / len(new[2:]) if new[2:] else None,
                    "knew_old_fact": base_prompt, "forgot_old_fact": not old,
                    "same_subject_acc": sum(same) / len(same), "same_subject_acc_before": sum(base_same) / len(base_same),
                    "other_acc": sum(other) / len(other), "other_acc_before": sum(base_other) / len(base_other),
                    "other_wrong_answers": dict(wrong.most_common(3)),
                    "adapter_params": (sum(int(t.numel()) for t in h.adapter["weights"].values())
                                       if h.adapter else None),
                    "locality_exact": sum(a == b for a, b in zip(gen, base_unrelated)) / len(unrelated),
                })
            print(f"[{k + 1}/{len(records)}] {name:14s} eff={new[0]:d} unseen={rows[-1]['paraphrase_unseen']} "
                  f"forgot={not old:d} same={rows[-1]['same_subject_acc']:.2f} other={rows[-1]['other_acc']:.2f} "
                  f"loc={rows[-1]['locality_exact']:.2f} ({secs:.1f}s)", flush=True)

    metrics = ["efficacy", "paraphrase_trained", "paraphrase_unseen", "forgot_old_fact", "same_subject_acc",
               "same_subject_acc_before", "other_acc", "other_acc_before", "locality_exact", "n_params_changed",
               "seconds"]
    summary = {}
    for name in conditions:
        rs = [x for x in rows if x["condition"] == name]
        summary[name] = {mt: sum(float(x[mt]) for x in rs if x[mt] is not None) /
                         max(1, sum(x[mt] is not None for x in rs)) for mt in metrics}
        summary[name]["n"] = len(rs)
    elapsed = time.time() - start
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"model": m.name, "model_fingerprint": m.fingerprint(), "n_facts": len(records), "seed": args.seed,
              "threads": torch.get_num_threads(), "seconds_total": round(elapsed, 1),
              "unrelated_prompts": len(unrelated), "gen_tokens": GEN_TOKENS, "summary": summary, "rows": rows}
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    header = ("| condition | n | efficacy | paraphrase (trained) | paraphrase (unseen) | forget rate | "
              "same-subject controls (before) | other controls (before) | exact-output locality | params changed | s/edit |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for name, s in summary.items():
        lines.append(f"| {name} | {s['n']} | {s['efficacy']:.2f} | {s['paraphrase_trained']:.2f} | "
                     f"{s['paraphrase_unseen']:.2f} | {s['forgot_old_fact']:.2f} | {s['same_subject_acc']:.2f} "
                     f"({s['same_subject_acc_before']:.2f}) | {s['other_acc']:.3f} ({s['other_acc_before']:.3f}) | "
                     f"{s['locality_exact']:.3f} | {s['n_params_changed']:.0f} | {s['seconds']:.1f} |")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"total {elapsed:.0f} s")


if __name__ == "__main__":
    main()
