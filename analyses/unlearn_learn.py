"""Study 2 (issue #6): rewriting an entrenched fact F1 -> F2 by unlearn-then-learn, beside direct fine-tuning and
ROME, on the embedded world model and on SmolLM2-135M-Instruct.

Facts the model knows well: on the embedded model, world records whose edit prompt the unedited model answers
with the true object at p >= ``--min-p`` (0.9); on SmolLM2, a hand-written list of very common facts (the Eiffel
Tower is in Paris, ...), each checked here: a fact is kept only if the unedited model's greedy answer is F1. Each
fact is edited alone, measured, and restored (bit-exact) before the next.

Methods (hyperparameters recorded per edit in ``rows.jsonl``; the ones that matter are passed explicitly):

* ``ia3-unlearn-learn``: stage 1 (IA)³ towards an *uncertain answer*, merged; stage 2 (IA)³ towards F2, on the
  same **located** modules (``mechedit.locate``'s adapter set for the fact, located with 3 noise samples on the
  embedded model and 1 on SmolLM2 instead of locate's 10, for time). The uncertain answer is a
  hyperparameter (``uncertain_answer``). SmolLM2 (an instruct model) can say "I am not sure", the default. The
  embedded model cannot: that phrase is 9 byte pieces it never saw (docs/results/ia3-compare), so there the
  default is ``--uncertain ' the'``, one token the model produces after its fact templates (a non-answer: "X
  was born in the ..."); ``--with-unsure`` adds the "I am not sure" condition for comparison.
* ``ia3``: (IA)³ on the same located modules without stage 1 (the reference: what does stage 1 add?).
* ``ft``: direct fine-tuning of all weights on the same training prompts (``mechedit.editing.finetune``, 25
  steps at lr 5e-4, its defaults).
* ``rome``: one rank-one edit (embedded: layer 1, the averaged trace's peak; SmolLM2: layer 8 with the cached
  model-sampled key statistics, as docs/results/counterfact-smollm2), clamp 4 and the paper's value-optimisation
  settings passed explicitly.

Training prompts: embedded, the fact's 6 training templates (ROME: the edit prompt only); the relation's 2
held-out templates stay unseen by every method. SmolLM2: the edit prompt only, for every method.

Measured after each edit, by greedy decoding through the bridge (a prompt's answer is its greedy next token, or,
for a question, the first ``--gen`` greedy tokens):

* **F2 accuracy**: on the edit prompt; on the other training phrasings (embedded only); on unseen paraphrases
  (embedded: the 2 held-out templates; SmolLM2: 1-2 written paraphrases); on a question form (SmolLM2).
* **F1 forget rate**: the edit prompt's greedy token is no longer F1's first token. **F1 in top 5**: its first
  token still ranks in the edit prompt's top 5.
* **Soft forgetting**: F1 still *reachable* under other prompts — the unseen paraphrases, a question (SmolLM2),
  and a prompt that primes with context and reaches the fact through a pronoun (embedded: a biography sentence
  "<name> plays tennis. She speaks"; SmolLM2: a written sentence). Reachable = F1 is the greedy next token, or
  appears as a word in the greedy continuation. An edit *soft-forgets* when F1 is gone from the edit prompt but
  reachable on at least one other probe (:func:`forgetting_kind`); the same probes on the unedited model say how
  often they reach F1 at all.
* **Control-fact accuracy**: the edited subject's other facts (same subject) and facts of other subjects, greedy
  first token correct, beside the unedited model's.

Intervals: 95% Wilson over edits for per-edit rates (one outcome per edit); for accuracies over several prompts per
edit, :func:`mechedit.evaluation.stats.rate_over_units` (t over edits widened to the pooled Wilson interval).

    OMP_NUM_THREADS=1 .venv/bin/python analyses/unlearn_learn.py --with-unsure --out docs/results/unlearn-learn
    .venv/bin/python analyses/unlearn_learn.py --summarise --out docs/results/unlearn-learn

Each edit's row is appended to ``<out>/<model>/rows.jsonl`` as soon as it is measured (a re-run skips rows it
has); ``--summarise`` rewrites ``summary.json`` and ``table.md`` from those rows alone.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

import mechedit.editing  # noqa: F401 - before mechedit.evaluation (importing it first is circular)
from mechedit.evaluation.stats import rate_over_units, wilson
from mechedit.evaluation.text import has_loop, words

MODELS = ("embedded", "smollm2")
PUBLISHED = "published run (project seed, a real LM): F2 98.5%, F1 forget 96%, control 72%"


# ---------------------------------------------------------------------------------------------------------------
# Cases: one fact to rewrite, with every probe measured around it
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """A fact F1 -> F2 and its probes. ``record`` is what the editors get (its paraphrases are the extra
    *training* prompts); the probe lists are (kind, prompt) pairs measured after the edit."""

    record: object  # mechedit.data.EditRecord
    f2_probes: tuple[tuple[str, str], ...]  # kinds: edit, trained, paraphrase, question
    f1_probes: tuple[tuple[str, str], ...]  # other routes to F1: paraphrase, question, context
    same_subject: tuple[tuple[str, str], ...]  # (prompt, answer) controls about the edited subject
    meta: dict = field(default_factory=dict)


# Very common facts for SmolLM2: (subject, edit template, F1, F2, paraphrases, question, context prompt,
# same-subject controls). Every prompt was written here; a fact stays only if the unedited model's greedy
# answer to its edit prompt is F1 (checked at run time).
SMOL_FACTS = [
    ("Eiffel Tower", "The {} is located in the city of", "Paris", "Rome",
     ["The {} can be found in the city of", "The {} stands in the city of"],
     "In which city is the Eiffel Tower?",
     "The Eiffel Tower was built for the World's Fair of 1889. Today the tower stands in the city of",
     [("The Eiffel Tower is located in the country of", "France")]),
    ("Colosseum", "The {} is located in the city of", "Rome", "Athens",
     ["The {} can be found in the city of", "The ancient {} stands in the city of"],
     "In which city is the Colosseum?",
     "The Colosseum is an amphitheatre built by the Roman emperors. The amphitheatre stands in the city of",
     [("The Colosseum is located in the country of", "Italy")]),
    ("Statue of Liberty", "The {} is located in the city of", "New York", "Boston",
     ["The {} can be found in the city of", "The {} stands in the city of"],
     "In which city is the Statue of Liberty?",
     "The Statue of Liberty was a gift from France. The statue stands in the city of",
     []),
    ("Japan", "The capital of {} is", "Tokyo", "Seoul",
     ["The capital city of {} is", "The capital of {} is the city of"],
     "What is the capital of Japan?",
     "Japan is an island nation in East Asia. Its capital city is",
     [("The currency of Japan is the", "yen")]),
    ("Germany", "The capital of {} is", "Berlin", "Vienna",
     ["The capital city of {} is", "The capital of {} is the city of"],
     "What is the capital of Germany?",
     "Germany is a large country in central Europe. Its capital city is",
     [("The official language of Germany is", "German"), ("Germany is located in the continent of", "Europe")]),
    ("France", "The capital of {} is", "Paris", "London",
     ["The capital city of {} is", "The capital of {} is the city of"],
     "What is the capital of France?",
     "France is a country in western Europe. Its capital city is",
     [("The official language of France is", "French")]),
    ("Italy", "The capital of {} is", "Rome", "Milan",
     ["The capital city of {} is", "The capital of {} is the city of"],
     "What is the capital of Italy?",
     "Italy is a country in southern Europe. Its capital city is",
     []),
    ("Spain", "The capital of {} is", "Madrid", "Lisbon",
     ["The capital city of {} is", "The capital of {} is the city of"],
     "What is the capital of Spain?",
     "Spain is a country in southern Europe. Its capital city is",
     []),
    ("Russia", "The capital of {} is", "Moscow", "Warsaw",
     ["The capital city of {} is", "The capital of {} is the city of"],
     "What is the capital of Russia?",
     "Russia is the largest country in the world. Its capital city is",
     []),
    ("Mount Everest", "{} is located in the country of", "Nepal", "Peru",
     ["{} can be found in the country of", "{} rises in the country of"],
     "In which country is Mount Everest?",
     "Mount Everest is the highest mountain on Earth. The mountain lies in the country of",
     []),
    ("Great Wall", "The {} is located in the country of", "China", "India",
     ["The {} can be found in the country of", "The {} was built in the country of"],
     "In which country is the Great Wall?",
     "The Great Wall is thousands of kilometres long. The wall was built in the country of",
     []),
    ("Taj Mahal", "The {} is located in the country of", "India", "Egypt",
     ["The {} can be found in the country of", "The {} stands in the country of"],
     "In which country is the Taj Mahal?",
     "The Taj Mahal is a white marble mausoleum. The mausoleum stands in the country of",
     []),
    ("iPhone", "The {} is made by the company", "Apple", "Samsung",
     ["The {} is produced by the company", "The {} is designed by the company"],
     "Which company makes the iPhone?",
     "The iPhone is a popular smartphone. The phone is made by the company",
     []),
    ("Toyota", "{} is a car company from the country of", "Japan", "Germany",
     ["{} is a car maker from the country of", "{} makes cars in the country of"],
     "Which country is Toyota from?",
     "Toyota sells millions of cars every year. The company comes from the country of",
     []),
    ("BMW", "{} is a car company from the country of", "Germany", "Japan",
     ["{} is a car maker from the country of", "{} makes cars in the country of"],
     "Which country is BMW from?",
     "BMW builds luxury cars and motorcycles. The company comes from the country of",
     []),
    ("William Shakespeare", "{} was born in the country of", "England", "France",
     ["{} was a writer from the country of", "{} came from the country of"],
     "In which country was William Shakespeare born?",
     "William Shakespeare wrote Hamlet and Macbeth. He was born in the country of",
     []),
    ("Albert Einstein", "{} developed the theory of", "relativity", "evolution",
     ["{} is famous for the theory of", "{} proposed the theory of"],
     "Which theory did Albert Einstein develop?",
     "Albert Einstein was a physicist who won the Nobel Prize. He is famous for the theory of",
     []),
    ("Brazil", "The capital of {} is", "Brasília", "Lima",
     ["The capital city of {} is", "The capital of {} is the city of"],
     "What is the capital of Brazil?",
     "Brazil is the largest country in South America. Its capital city is",
     []),
]


def chat(question: str) -> str:
    """A question in SmolLM2-Instruct's own chat format, the assistant's turn open."""
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def smol_cases() -> list[Case]:
    from mechedit.data import EditRecord

    out = []
    for i, (subj, tmpl, f1, f2, paras, question, context, same) in enumerate(SMOL_FACTS):
        rec = EditRecord(case_id=i, template=tmpl, subject=subj, target_new=f2, target_true=f1,
                         relation_id=tmpl)
        paraphrases = [p.replace("{}", subj) for p in paras]
        question = chat(question)
        out.append(Case(
            record=rec,
            f2_probes=(("edit", rec.prompt), *(("paraphrase", p) for p in paraphrases), ("question", question)),
            f1_probes=(*(("paraphrase", p) for p in paraphrases), ("question", question), ("context", context)),
            same_subject=tuple(same)))
    return out


def world_cases(world, records) -> list[Case]:
    """Embedded-world cases: the record's paraphrases replaced by the relation's other training templates (the
    training prompts every gradient method gets), both held-out templates as unseen paraphrases, and a
    biography-style context prompt that reaches the fact through a pronoun."""
    out = []
    for r in records:
        rel = world.relations[r.relation_id]
        trained = [t.replace("{}", r.subject) for t in world.templates(r.relation_id, "train")]
        heldout = [t.replace("{}", r.subject) for t in world.templates(r.relation_id, "heldout")]
        others = [f for f in world.facts if f.subject == r.subject and f.relation != r.relation_id]
        lead = others[int(r.case_id) % len(others)]
        bio_prefix = rel["bio"].split("{}")[0].rstrip()
        context = (f"{r.subject} {world.relations[lead.relation]['bio'].format(lead.object)}. "
                   f"{world.pronoun(r.subject)} {bio_prefix}")
        rec = replace(r, paraphrases=tuple(p for p in trained if p != r.prompt))
        out.append(Case(
            record=rec,
            f2_probes=(("edit", r.prompt), *(("trained", p) for p in rec.paraphrases),
                       *(("paraphrase", p) for p in heldout)),
            f1_probes=(*(("paraphrase", p) for p in heldout), ("context", context)),
            same_subject=tuple((world.templates(f.relation)[0].replace("{}", r.subject), f.object) for f in others),
        ))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Scoring (pure functions: tests/test_unlearn_learn_study.py)
# ---------------------------------------------------------------------------------------------------------------


def mentions(continuation: str, answer: str) -> bool:
    """Whether ``answer`` appears in ``continuation`` as a whole word (or words), case-insensitively: "Paris" in
    " The Eiffel Tower is in Paris." but not in " Parisian"."""
    return re.search(rf"(?<!\w){re.escape(answer.strip())}(?!\w)", continuation, re.IGNORECASE) is not None


def reaches(first_token_hit: bool, continuation: str, answer: str) -> bool:
    """A probe reaches ``answer`` when the greedy next token is its first token or the greedy continuation
    names it."""
    return bool(first_token_hit) or mentions(continuation, answer)


def forgetting_kind(forgot_on_edit_prompt: bool, reachable_elsewhere: list[bool]) -> str:
    """``"kept"`` (F1 still the edit prompt's answer), ``"soft"`` (gone there, reachable under another probe)
    or ``"hard"`` (gone there and under every other probe)."""
    if not forgot_on_edit_prompt:
        return "kept"
    return "soft" if any(reachable_elsewhere) else "hard"


def looping(text: str) -> bool:
    """A continuation stuck in a loop: some word n-gram repeated (:func:`mechedit.evaluation.text.has_loop` on
    words), e.g. " Rome Rome Rome Rome"."""
    return has_loop(words(text))


def rate(hits: list[bool]) -> dict:
    """One outcome per edit: the rate with its Wilson interval."""
    k, n = sum(bool(h) for h in hits), len(hits)
    lo, hi = wilson(k, n)
    return {"rate": k / n if n else float("nan"), "lo": lo, "hi": hi, "k": k, "n": n}


def rate_of_lists(lists: list[list[bool]]) -> dict:
    """Several outcomes per edit: mean of per-edit rates, t over edits widened to the pooled Wilson interval."""
    lists = [x for x in lists if x]
    if not lists:
        return {"rate": float("nan"), "lo": float("nan"), "hi": float("nan"), "k": 0, "n": 0}
    if all(len(x) == 1 for x in lists):  # one outcome per edit after all: Wilson over edits
        return rate([x[0] for x in lists])
    mean, lo, hi = rate_over_units([sum(x) / len(x) for x in lists], [len(x) for x in lists])
    return {"rate": mean, "lo": lo, "hi": hi, "k": sum(sum(x) for x in lists), "n": sum(len(x) for x in lists)}


# ---------------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def probe(model, prompts: list[str], n_tokens: list[int]) -> list[tuple[torch.Tensor, str]]:
    """Each prompt's next-token logits (V,) and its greedy continuation of ``n_tokens[i]`` tokens (decoded),
    through the bridge. Prompts of equal token length and continuation length share a batch."""
    encoded = [model.encode(p) for p in prompts]
    out: list = [None] * len(prompts)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, e in enumerate(encoded):
        groups.setdefault((len(e), n_tokens[i]), []).append(i)
    for (_, n), idx in groups.items():
        ids = torch.tensor([encoded[i] for i in idx], device=model.device)  # (B, T)
        first = None
        new = []
        for step in range(n):
            logits = model.bridge(ids)[:, -1].float()  # (B, V)
            if step == 0:
                first = logits
            nxt = logits.argmax(-1, keepdim=True)  # (B, 1)
            new.append(nxt)
            ids = torch.cat([ids, nxt], dim=1)
        gen = torch.cat(new, dim=1).tolist()  # (B, n)
        for j, i in enumerate(idx):
            out[i] = (first[j], model.tokenizer.decode(gen[j]))
    return out


def first_id(model, prompt: str, answer: str) -> int:
    from mechedit.tracing.common import encode_target

    return encode_target(model, prompt, answer)[0]


def measure(model, case: Case, controls: list[tuple[str, str]], n_tokens: int) -> dict:
    """Everything measured for one case on the model as it is now (edited or not)."""
    r = case.record
    f2p, f1p = list(case.f2_probes), list(case.f1_probes)
    prompts = [p for _, p in f2p] + [p for _, p in f1p] + [p for p, _ in case.same_subject] + [p for p, _ in controls]
    # one token where the answer is judged on the next token; a continuation where it may come later
    lengths = [n_tokens if k == "question" else 1 for k, _ in f2p] + [n_tokens] * len(f1p) + \
        [1] * (len(case.same_subject) + len(controls))
    got = probe(model, prompts, lengths)
    top = [int(lg.argmax()) for lg, _ in got]
    i = 0

    def hit(k: int, prompt: str, answer: str, kind: str) -> bool:
        # a question is answered in a sentence: its answer is judged on the continuation, a template on its token
        _, text = got[k]
        if kind == "question":
            return mentions(text, answer)
        return top[k] == first_id(model, prompt, answer)

    f2 = {}
    for kind, p in f2p:
        f2.setdefault(kind, []).append(hit(i, p, r.target_new, kind))
        i += 1
    edit_logits, edit_text = got[0]
    f1_id = first_id(model, r.prompt, r.target_true)
    f1_rank = int((edit_logits > edit_logits[f1_id]).sum())
    f1_reach, f1_probe_rank = {}, {}
    for kind, p in f1p:
        lg, text = got[i]
        fid = first_id(model, p, r.target_true)
        f1_reach.setdefault(kind, []).append(reaches(top[i] == fid, text, r.target_true))
        f1_probe_rank.setdefault(kind, []).append(int((lg > lg[fid]).sum()))
        i += 1
    same = []
    for p, a in case.same_subject:
        same.append(top[i] == first_id(model, p, a))
        i += 1
    other = []
    for p, a in controls:
        other.append(top[i] == first_id(model, p, a))
        i += 1
    return {
        "f2": f2, "f1_on_edit_prompt": top[0] == f1_id, "f1_rank": f1_rank,
        "f1_reach": f1_reach, "f1_probe_rank": f1_probe_rank, "same_subject": same, "other": other,
        "edit_continuation": edit_text,
        "continuations": {p: t for (_, p), (_, t) in zip(f1p, got[len(f2p):len(f2p) + len(f1p)])},
    }


# ---------------------------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------------------------

# clamp_norm_max None: ROME's single clamp (no retry with a wider ball), as in the recorded run, whatever a model's
# own hyperparameter file says
ROME_EMBEDDED = {"layer": 1, "clamp_norm_factor": 4.0, "clamp_norm_max": None, "v_lr": 0.5, "v_num_grad_steps": 20, "v_loss_stop": 0.05,
                 "kl_factor": 0.0625, "v_weight_decay": 0.5, "mom2_adjustment": True, "mom2_source": "auto",
                 "mom2_n_samples": 10_000, "consistent_keys": True}
ROME_SMOL = {**ROME_EMBEDDED, "layer": 8, "mom2_source": "model", "mom2_n_samples": 1000, "mom2_max_tokens": 64}


def conditions(model_kind: str, uncertain: str, with_unsure: bool) -> dict[str, tuple[str, dict]]:
    """name -> (method, hparams); "{located}" is replaced by the case's located module list."""
    ul = {"modules": "{located}", "uncertain_answer": uncertain, "world_templates": "none"}
    out = {"ia3-unlearn-learn": ("ia3-unlearn-learn", ul)}
    if with_unsure and uncertain != "I am not sure":
        out["ia3-unlearn-learn ('I am not sure')"] = ("ia3-unlearn-learn", {**ul, "uncertain_answer": "I am not sure"})
    out["ia3 (no unlearn stage)"] = ("ia3", {"modules": "{located}", "world_templates": "none"})
    out["ft"] = ("ft", {"use_paraphrases": True})
    out["rome"] = ("rome", ROME_EMBEDDED if model_kind == "embedded" else ROME_SMOL)
    return out


def locate_modules(model, case: Case, samples: int) -> tuple[list[str], float]:
    from mechedit.locating import LocateConfig, locate

    r = case.record
    t0 = time.process_time()
    found = locate(model, r.prompt, r.subject, r.target_true, config=LocateConfig(samples=samples))
    return list(found.adapter_modules), time.process_time() - t0


# ---------------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------------


def load_cases(model_kind: str, model, n: int, seed: int, min_p: float) -> tuple[list[Case], list, dict]:
    """The cases (facts known well), the other-subject control facts and a note of how they were chosen."""
    from mechedit.answering import answers

    if model_kind == "embedded":
        from mechedit.toy.export import embedded_world, world_records

        world = embedded_world()
        # a pool that does not depend on n (for n <= 40), so that a smaller n takes the first n facts of a larger one
        pool = world_records(world, n=min(len(world.facts), max(160, 4 * n)), seed=seed)
        known = []
        for r in pool:
            a = answers(model, [r.prompt], (r.target_true,))[0]
            if a.target_probs[r.target_true] >= min_p and a.target_probs[r.target_true] == a.top_prob:
                known.append(r)
        records = known[:n]
        subjects = {r.subject for r in records}
        rng = random.Random(seed)
        facts = rng.sample([f for f in world.facts if f.subject not in subjects], 60)
        controls = [(world.templates(f.relation)[0].replace("{}", f.subject), f.object) for f in facts]
        note = {"pool": len(pool), "known_at_min_p": len(known), "min_p": min_p}
        return world_cases(world, records), controls, note
    cases = smol_cases()
    kept, dropped = [], []
    for c in cases:
        a = answers(model, [c.record.prompt], (c.record.target_true,))[0]
        ok = a.target_probs[c.record.target_true] == a.top_prob
        (kept if ok else dropped).append(c)
    n_known = len(kept)
    kept = kept[:n]
    # other-subject controls: every kept fact's prompt and same-subject facts, except the edited subject's
    controls_all = [(c.record.prompt, c.record.target_true, c.record.subject) for c in kept] + \
        [(p, a, c.record.subject) for c in kept for p, a in c.same_subject]
    out = []
    for c in kept:
        ctl = [(p, a) for p, a, s in controls_all if s != c.record.subject]
        out.append(replace(c, meta={"controls": ctl}))
    note = {"written": len(cases), "known": n_known, "used": len(kept), "dropped": [c.record.prompt for c in dropped]}
    return out, [], note


def run(model_kind: str, args) -> None:
    import mechedit
    from mechedit.editing.methods import edit

    torch.set_num_threads(1)
    out = args.out / model_kind
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.jsonl"
    done = set()
    if rows_path.exists():
        done = {(d["case_id"], d["condition"]) for d in map(json.loads, rows_path.read_text().splitlines())}
    model = mechedit.load() if model_kind == "embedded" else mechedit.load("smollm2-135m")
    n = args.n if args.n else (40 if model_kind == "embedded" else 10)
    if args.locate_samples is None:  # locate's default is 10; SmolLM2's 30 layers make each sample cost ~15 CPU-s
        args = argparse.Namespace(**{**vars(args), "locate_samples": 3 if model_kind == "embedded" else 1})
    uncertain = args.uncertain if model_kind == "embedded" else "I am not sure"
    n_tokens = 2 if model_kind == "embedded" else 10
    started, cpu0 = time.time(), time.process_time()
    cases, controls, note = load_cases(model_kind, model, n, args.seed, args.min_p)
    conds = conditions(model_kind, uncertain, args.with_unsure)
    if args.methods:
        conds = {k: v for k, v in conds.items() if any(k.startswith(m) for m in args.methods.split(","))}
    if not args.case_ids or not (out / "config.json").exists():
        (out / "config.json").write_text(json.dumps({
            "model": model.name, "model_fingerprint": model.fingerprint(), "n_cases": len(cases), "seed": args.seed,
            "threads": torch.get_num_threads(), "gen_tokens": n_tokens, "locate_samples": args.locate_samples,
            "uncertain_answer": uncertain, "conditions": conds, "selection": note}, indent=1, default=str))
    print(f"{model_kind}: {len(cases)} cases, conditions {list(conds)}; {note}", flush=True)
    wanted = {x.strip() for x in args.case_ids.split(",") if x.strip()}
    for k, case in enumerate(cases):
        r = case.record
        if wanted and str(r.case_id) not in wanted:
            continue
        ctl = controls or case.meta["controls"]
        todo = [c for c in conds if (r.case_id, c) not in done]
        if not todo:
            continue
        before = measure(model, case, ctl, n_tokens)
        located, locate_cpu = None, 0.0
        for name in todo:
            method, hp = conds[name]
            if any(v == "{located}" for v in hp.values()):
                if located is None:
                    located, locate_cpu = locate_modules(model, case, args.locate_samples)
                hp = {k2: (located if v == "{located}" else v) for k2, v in hp.items()}
            t0, c0 = time.time(), time.process_time()
            row = {"case_id": r.case_id, "condition": name, "method": method, "subject": r.subject,
                   "prompt": r.prompt, "f1": r.target_true, "f2": r.target_new, "before": before}
            try:
                with edit(model, [r], method, hp) as h:
                    row["edit_seconds"], row["edit_cpu_seconds"] = time.time() - t0, time.process_time() - c0
                    row["after"] = measure(model, case, ctl, n_tokens)
                    ev = h.evidence
                    row["hparams"] = h.hparams
                    row["modules"] = ev.get("modules")
                    row["locate_cpu_seconds"] = locate_cpu if "modules" in hp else None
                    row["losses_last"] = {s: (ev.get(s) or [None])[-1] for s in ("unlearn_losses", "learn_losses",
                                                                                   "losses")}
            except Exception as e:  # noqa: BLE001 - a refused edit is a result, recorded with its reason
                row["error"] = f"{type(e).__name__}: {e}"
            with rows_path.open("a") as f:
                f.write(json.dumps(row, default=str) + "\n")
            a = row.get("after")
            print(f"[{k + 1}/{len(cases)}] {name:36s} " + (
                f"F2={a['f2']['edit'][0]:d} forgot={not a['f1_on_edit_prompt']:d} rank={a['f1_rank']} "
                f"reach={ {kk: sum(v) for kk, v in a['f1_reach'].items()} } same={sum(a['same_subject'])}/"
                f"{len(a['same_subject'])} other={sum(a['other'])}/{len(a['other'])} "
                f"({row['edit_cpu_seconds']:.1f} CPU-s)" if a else row["error"]), flush=True)
    meta = json.loads((out / "config.json").read_text())
    meta.setdefault("runs", []).append({"case_ids": args.case_ids or "all", "wall_seconds": round(time.time() - started, 1),
                                        "cpu_seconds": round(time.process_time() - cpu0, 1)})
    (out / "config.json").write_text(json.dumps(meta, indent=1, default=str))
    summarise(out)


def summarise(out: Path) -> dict:
    rows, seen_rows = [], set()
    for line in (out / "rows.jsonl").read_text().splitlines():
        row = json.loads(line)
        if (row["case_id"], row["condition"]) not in seen_rows:  # a case run twice counts once (the first)
            seen_rows.add((row["case_id"], row["condition"]))
            rows.append(row)
    conds = list(dict.fromkeys(r["condition"] for r in rows))
    # only facts every condition has been run on (a run stopped early leaves a fact half done): same facts per column
    by_case: dict = {}
    for r in rows:
        by_case.setdefault(r["case_id"], set()).add(r["condition"])
    complete = {c for c, got in by_case.items() if got >= set(conds)}
    rows = [r for r in rows if r["case_id"] in complete]
    summary = {}
    for name in ["unedited", *conds]:
        if name == "unedited":
            seen, rs = set(), []
            for r in rows:
                if r["case_id"] not in seen:
                    seen.add(r["case_id"])
                    rs.append({**r, "after": r["before"]})
        else:
            rs = [r for r in rows if r["condition"] == name and "after" in r]
        if not rs:
            continue
        a = [r["after"] for r in rs]
        # soft forgetting, two readings: F1 gone from the edit prompt but still the greedy answer (or named in
        # the continuation) of another probe; or that, or F1 still in the top 5 of the edit prompt or of another
        # (non-question) probe
        greedy_kinds = [forgetting_kind(not x["f1_on_edit_prompt"], [any(v) for v in x["f1_reach"].values()])
                        for x in a]
        top5_kinds = [forgetting_kind(not x["f1_on_edit_prompt"],
                                      [any(v) for v in x["f1_reach"].values()] + [x["f1_rank"] < 5] +
                                      [k < 5 for kind, v in x.get("f1_probe_rank", {}).items()
                                       if kind != "question" for k in v]) for x in a]
        s = {
            "edits": len(rs), "errors": sum(1 for r in rows if r["condition"] == name and "error" in r),
            "f2_edit": rate([x["f2"]["edit"][0] for x in a]),
            "f2_trained": rate_of_lists([x["f2"].get("trained", []) for x in a]),
            "f2_paraphrase": rate_of_lists([x["f2"].get("paraphrase", []) for x in a]),
            "f2_question": rate_of_lists([x["f2"].get("question", []) for x in a]),
            "f1_forget": rate([not x["f1_on_edit_prompt"] for x in a]),
            "f1_top5": rate([x["f1_rank"] < 5 for x in a]),
            "f1_reach_paraphrase": rate_of_lists([x["f1_reach"].get("paraphrase", []) for x in a]),
            "f1_reach_question": rate_of_lists([x["f1_reach"].get("question", []) for x in a]),
            "f1_reach_context": rate_of_lists([x["f1_reach"].get("context", []) for x in a]),
            # a question's next token is the start of a sentence ("The ..."), not the answer: no rank there
            "f1_top5_any_other": rate([any(k < 5 for kind, v in x.get("f1_probe_rank", {}).items()
                                           if kind != "question" for k in v) for x in a]),
            "f1_reach_any_other": rate([any(any(v) for v in x["f1_reach"].values()) for x in a]),
            "soft_forgetting_greedy": rate([k == "soft" for k in greedy_kinds]),
            "soft_forgetting": rate([k == "soft" for k in top5_kinds]),
            "hard_forgetting": rate([k == "hard" for k in top5_kinds]),
            "degenerate": rate([any(looping(t) for t in x["continuations"].values()) for x in a
                                if sum(len(words(t)) for t in x.get("continuations", {}).values()) >= 5 * max(
                                    1, len(x.get("continuations", {})))]),
            "control_same_subject": rate_of_lists([x["same_subject"] for x in a]),
            "control_other": rate_of_lists([x["other"] for x in a]),
            "control_all": rate_of_lists([x["same_subject"] + x["other"] for x in a]),
            "edit_cpu_seconds_mean": (sum(r.get("edit_cpu_seconds", 0) for r in rs) / len(rs)
                                      if name != "unedited" else None),
        }
        summary[name] = s
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "table.md").write_text(table(summary))
    print(table(summary))
    return summary


def fmt(d: dict) -> str:
    if not d or d["n"] == 0:
        return "–"
    return f"{d['rate']:.2f} [{d['lo']:.2f}, {d['hi']:.2f}]"


def table(summary: dict) -> str:
    """One row per measure, one column per condition (rates with their 95% intervals)."""
    rows = [("F2: edit prompt", "f2_edit"), ("F2: trained phrasings", "f2_trained"),
            ("F2: unseen paraphrases", "f2_paraphrase"), ("F2: question", "f2_question"),
            ("F1 forget rate (edit prompt)", "f1_forget"), ("F1 still in top 5 (edit prompt)", "f1_top5"),
            ("F1 reached: paraphrases", "f1_reach_paraphrase"), ("F1 reached: question", "f1_reach_question"),
            ("F1 reached: context-primed", "f1_reach_context"), ("F1 reached: any other probe", "f1_reach_any_other"),
            ("F1 in top 5 of another probe", "f1_top5_any_other"),
            ("soft forgetting, greedy (gone from edit prompt, greedy answer of another probe)",
             "soft_forgetting_greedy"),
            ("**soft forgetting** (gone from edit prompt; greedy elsewhere or top 5 anywhere)", "soft_forgetting"),
            ("hard forgetting (gone from edit prompt and not in any top 5)", "hard_forgetting"),
            ("controls: same subject", "control_same_subject"), ("controls: other subjects", "control_other"),
            ("**controls: all**", "control_all"), ("looping continuations", "degenerate")]
    names = list(summary)
    lines = ["| measure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names),
             "| edits | " + " | ".join(str(summary[n]["edits"]) for n in names) + " |"]
    for label, key in rows:
        if any(summary[n].get(key, {}).get("n") for n in names):
            lines.append(f"| {label} | " + " | ".join(fmt(summary[n].get(key)) for n in names) + " |")
    cpu = [summary[n]["edit_cpu_seconds_mean"] for n in names]
    lines.append("| CPU-s per edit (mean) | " + " | ".join("" if c is None else f"{c:.1f}" for c in cpu) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=[*MODELS, "all"], default="all")
    ap.add_argument("--n", type=int, default=0, help="facts per model (default: 40 embedded, 10 SmolLM2)")
    ap.add_argument("--seed", type=int, default=0, help="which embedded-world records (world_records seed)")
    ap.add_argument("--min-p", type=float, default=0.9, help="embedded: keep facts with p(F1) >= this")
    ap.add_argument("--uncertain", default="the", help="embedded model's unlearn target (SmolLM2: 'I am not sure')")
    ap.add_argument("--with-unsure", action="store_true", help="embedded: also unlearn towards 'I am not sure'")
    ap.add_argument("--methods", default="", help="comma-separated condition-name prefixes to run (default all)")
    ap.add_argument("--locate-samples", type=int, default=None,
                    help="noise samples for locate (its default is 10; here 3 on the embedded model, 1 on SmolLM2)")
    ap.add_argument("--case-ids", default="", help="comma-separated case ids to run (a share of the cases, e.g. "
                    "for several processes appending to the same rows.jsonl)")
    ap.add_argument("--summarise", action="store_true", help="only rewrite summaries from rows.jsonl")
    ap.add_argument("--out", type=Path, default=Path("docs/results/unlearn-learn"))
    args = ap.parse_args()
    kinds = MODELS if args.model == "all" else (args.model,)
    for kind in kinds:
        if args.summarise:
            if (args.out / kind / "rows.jsonl").exists():
                summarise(args.out / kind)
        else:
            run(kind, args)


if __name__ == "__main__":
    main()
