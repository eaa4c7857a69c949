"""Study 1: can a model answer "5" to "2+2=" and change nothing else?

The embedded world model knows its 100 single-digit sums. Each method edits "2+2=" -> "5" (one request, the
method's default hyperparameters; ROME pinned in full at layer 3, where the causal trace of "2+2=" locates it,
the adapters on locate's module set) and is measured, after the edit and with the model restored between methods, on

* **target**: the greedy answer to "2+2=" is "5";
* **paraphrases**: "2 + 2 =" (a form the model saw in training) and the worded "two plus two equals";
* **exact-output locality**: the share of unrelated prompts (a sample of the world's facts, its other sums and
  filler text) whose 4-token greedy continuation is token-for-token the unedited model's
  (:class:`mechedit.evaluation.Evaluator`), with the mean KL of the next-token distribution;
* **other sums**: accuracy on the other 99 sums;
* **neighbours that must not change**: "2+3=", "3+2=", "1+1=", "2+1=", "1+2=", "3+3=", "2+4=", "4+2=": the
  greedy answer is the unedited one.

Rates carry 95% Wilson intervals over prompts. Writes results.json, results.md and results.html/png to --out.

    OMP_NUM_THREADS=1 python analyses/two_plus_two.py --out docs/results/two-plus-two

**Other models** (``--model smollm2-135m``: SmolLM2-135M-Instruct de-quantised from Q4_1). A pretrained model
has no world file, and this one cannot add bare "2+2=" (it continues "11, so the answer"); it does add in a
spaced few-shot frame, ``"1 + 1 = 2, 3 + 3 = 6, a + b = "`` (the first digit right for 96 of the 100 sums, and
the whole answer for 51 of the 55 with a one-digit result). So on such a model the study is defined in that
frame (:func:`general_suite`), every set chosen from the unedited model's own greedy answers:

* the request is ``"1 + 1 = 2, 3 + 3 = 6, 2 + 2 = "`` -> ``"5"`` (subject ``"2 + 2"``; the prompt ends in the
  space token, so the answer is one digit token);
* paraphrases: another few-shot frame, the compact ``"1+1=2, 3+3=6, 2+2="``, a worded few-shot form (answer
  ``five``) and ``"The sum of 2 and 2 is"`` (success: the first number or number word answered is 5);
* other sums: the one-digit-result sums the unedited model gets right in the frame, less "2 + 2" and the
  neighbours;
* neighbours: the same eight sums as on the embedded model, in the frame (unchanged answer);
* exact-output locality: 4 greedy tokens on those other sums, the facts of :data:`FACTS` the unedited model
  answers right (common knowledge: capitals, languages, landmarks) and the filler openings of
  :data:`FILLER`, compared with the unedited model's (the same rule as :class:`mechedit.evaluation.Evaluator`);
  KL of the next-token distribution on them with a t interval;
* degeneration: 24 sampled tokens (top-k 5, fixed seed) after 8 of the filler and fact prompts loop or are
  mostly "5".

ROME runs at layer 8 with every hyperparameter pinned (:data:`SMOL_ROME`, the settings of
``analyses/counterfact_smollm2.py``, whose key statistics are cached); regularized LoRA is given explicit
retention rows (:func:`general_suite`), since its automatic choice on a model without a world would train on the
neighbours this study measures.

    OMP_NUM_THREADS=1 python analyses/two_plus_two.py --model smollm2-135m --out docs/results/two-plus-two/smollm2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import mechedit
import mechedit.editing  # before mechedit.evaluation: importing that one first hits a circular import
from mechedit.answering import answers
from mechedit.data import EditRecord
from mechedit.editing.methods import edit
from mechedit.evaluation import EvalConfig, Evaluator
from mechedit.evaluation.evaluator import GENERIC_PROMPTS, greedy, sample
from mechedit.evaluation.stats import mean_ci, wilson
from mechedit.evaluation.text import has_loop, target_share

sys.path.insert(0, str(Path(__file__).resolve().parent))  # analyses/pinned.py, however this file is loaded
from pinned import EMBEDDED_STATS, ROME_COMMON, SMOL_ROME

# "method" or "method:name=value;name=value" (hyperparameter overrides; the row is named by the whole string).
# ROME's key is the subject's last token; for a sum the "subject" is "2+2", so the second variant keys the edit at
# the prompt's last token ("=" on the embedded model, the space after it in SmolLM2's frame), where the model has
# read both numbers.
METHODS = ("ft", "ft-l", "lora", "reg-lora", "rome", "rome:key_position=prompt_last", "ia3", "ia3-unlearn-learn",
           "icl")
PARAPHRASES = ("2 + 2 =", "two plus two equals")
NEIGHBOURS = ("2+3=", "3+2=", "1+1=", "2+1=", "1+2=", "3+3=", "2+4=", "4+2=")
REQUEST = EditRecord(case_id=0, template="{}=", subject="2+2", target_new="5", target_true="4",
                     paraphrases=PARAPHRASES, neighborhood=tuple((p, str(eval(p[:-1]))) for p in NEIGHBOURS))

# ROME pinned in full (the library's defaults may change). The located layer: on the embedded model layer 3, where
# the MLP causal-trace effect of "2+2=" itself peaks at the subject's last token (what layer="auto" chose per fact
# when this study was first run); on SmolLM2 layer 8, inside the 7-11 plateau of its MLP trace effect over facts,
# with the key statistics of analyses/counterfact_smollm2.py (1,000 texts of 64 tokens sampled from the model;
# cached after their first computation).
EMBEDDED_ROME = {**ROME_COMMON, **EMBEDDED_STATS, "layer": 3}

# -- the study on a model without a world file (SmolLM2) ------------------------------------------------------
FRAME = "1 + 1 = 2, 3 + 3 = 6, {} = "  # ends in the space token: the answer is one digit token
GENERAL_PARAPHRASES = ("4 + 1 = 5, 2 + 5 = 7, 2 + 2 = ", "1+1=2, 3+3=6, 2+2=",
                       "one plus one equals two. three plus three equals six. two plus two equals",
                       "The sum of 2 and 2 is")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Common-knowledge prompts and the start of their answer; those the unedited model answers right are used.
FACTS = (
    ("The Eiffel Tower is located in the city of", "Paris"), ("The capital of Japan is", "Tokyo"),
    ("The capital of Italy is", "Rome"), ("The capital of Germany is", "Berlin"),
    ("The capital of Spain is", "Madrid"), ("The capital of Russia is", "Moscow"),
    ("The capital of England is", "London"), ("The capital of Egypt is", "Cairo"),
    ("The capital of China is", "Beijing"), ("The capital of Canada is", "Ottawa"),
    ("The capital of Poland is", "Warsaw"), ("The official language of Brazil is", "Portuguese"),
    ("The official language of Mexico is", "Spanish"), ("People in France speak", "French"),
    ("People in Italy speak", "Italian"), ("The mother tongue of Vladimir Putin is", "Russian"),
    ("The Statue of Liberty is located in", "New York"), ("The Colosseum is located in", "Rome"),
    ("The largest planet in the solar system is", "Jupiter"), ("The chemical symbol for water is", "H2O"),
    ("Water freezes at zero degrees", "Celsius"), ("Albert Einstein was a", "physicist"),
    ("Pablo Picasso was a", "Spanish"), ("Mozart was born in the city of", "Salzburg"),
    ("Mount Everest is the highest mountain in the", "world"), ("Madrid is the capital of", "Spain"),
    ("Cairo is the capital of", "Egypt"), ("The currency of the United Kingdom is the", "pound"),
    ("The author of Harry Potter is J.K.", "Rowling"), ("The Mona Lisa was painted by Leonardo da", "Vinci"),
    ("The theory of relativity was developed by Albert", "Einstein"), ("Microsoft was founded by Bill", "Gates"),
    ("The human heart has four", "chambers"), ("The Amazon rainforest is located in", "South America"),
    ("Sushi is a dish from", "Japan"), ("The Louvre is a museum in", "Paris"),
    ("The capital of Australia is", "Canberra"), ("The capital of France is", "Paris"),
)
# Regularized LoRA's retention rows on such a model: facts outside FACTS (answer NLL + KL) and sums with a
# two-digit result in the frame (KL only), so none of the measured prompts is trained on.
RETENTION = ("The capital of Greece is => Athens", "The capital of Austria is => Vienna",
             "The capital of Portugal is => Lisbon", "The currency of Japan is the => yen",
             "A group of lions is called a => pride", "The first man on the moon was Neil => Armstrong",
             "Apple was founded by Steve => Jobs", "The opposite of up is => down",
             *(FRAME.format(f"{a} + {b}").rstrip() for a, b in ((5, 7), (8, 4), (9, 3), (6, 6), (7, 8), (4, 9),
                                                                (9, 9), (3, 8))))
FILLER = tuple(p for p in GENERIC_PROMPTS if p not in ("Two plus two equals", "The capital of France is"))
GENERATION_TOKENS = 24


def rate(hits: list[bool]) -> dict:
    """A rate over prompts with its 95% Wilson interval (value None when there are no prompts)."""
    lo, hi = wilson(sum(hits), len(hits))
    return {"value": sum(hits) / len(hits) if hits else None, "lo": lo, "hi": hi, "n": len(hits)}


def measure(model, handle, evaluator: Evaluator, before: dict) -> dict:
    """The study's numbers for one applied handle (None: the unedited model), on the embedded world."""
    ask = handle.prompt if handle is not None else (lambda p: p)
    prompts = [REQUEST.prompt, *PARAPHRASES, *NEIGHBOURS]
    got = {a.prompt: a.top.strip() for a in answers(model, [ask(p) for p in prompts])}
    got = {p: got[ask(p)] for p in prompts}
    result = evaluator.evaluate(handle, [REQUEST]) if handle is not None else evaluator.evaluate(None, [REQUEST])
    e = result.edits[0]
    deg = e.get("degenerate")
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
        "degenerate": None if deg is None else {
            "value": deg, "n": e["degenerate_n"],
            **dict(zip(("lo", "hi"), wilson(round(deg * e["degenerate_n"]), e["degenerate_n"])))},
    }


# -- the general (world-less) suite ------------------------------------------------------------------------------


def first_answer(text: str) -> str:
    """The first number or word of a continuation, lower-cased ("" if none): " 4, so" -> "4"."""
    m = re.match(r"\s*(\d+|[A-Za-z]+)", text)
    return m.group(1).lower() if m else ""


@dataclass(frozen=True)
class Suite:
    """The prompts of the study on one model and the unedited model's answers to them."""

    request: EditRecord
    paraphrases: tuple[str, ...]
    neighbours: tuple[str, ...]
    sums: tuple[tuple[str, str], ...]  # (prompt, answer) the unedited model gets right
    facts: tuple[tuple[str, str], ...]  # (prompt, answer start) the unedited model gets right
    filler: tuple[str, ...]
    free: tuple[str, ...]  # prompts sampled from for degeneration
    base: dict  # prompt -> unedited 4-token greedy continuation (token ids)
    base_first: dict  # prompt -> unedited next-token log-distribution

    @property
    def unrelated(self) -> list[str]:
        return [p for p, _ in self.sums] + [p for p, _ in self.facts] + list(self.filler)


def continuations(model, prompts: list[str], ask=lambda p: p, n_tokens: int = 4) -> tuple[dict, dict]:
    conts, first = greedy(model, [ask(p) for p in prompts], n_tokens)
    return dict(zip(prompts, conts)), {p: first[i] for i, p in enumerate(prompts)}


def general_suite(model) -> Suite:
    """The study's prompts on a model without a world file, chosen from the unedited model's answers (see the
    module docstring)."""
    request = EditRecord(case_id=0, template=FRAME, subject="2 + 2", target_new="5",
                         target_true="4", paraphrases=GENERAL_PARAPHRASES)
    neighbours = tuple(FRAME.format(p[:-1].replace("+", " + ")) for p in NEIGHBOURS)
    skip = {(2, 2)} | {tuple(int(x) for x in p[:-1].split("+")) for p in NEIGHBOURS}
    sums = [(FRAME.format(f"{a} + {b}"), str(a + b)) for a in range(10) for b in range(10)
            if a + b <= 9 and (a, b) not in skip]
    prompts = [request.prompt, *GENERAL_PARAPHRASES, *neighbours, *(p for p, _ in sums), *(p for p, _ in FACTS),
               *FILLER]
    base, first = continuations(model, list(dict.fromkeys(prompts)))
    text = {p: model.tokenizer.decode(c, skip_special_tokens=True) for p, c in base.items()}
    sums = tuple((p, a) for p, a in sums if first_answer(text[p]) == a)
    facts = tuple((p, a) for p, a in FACTS if text[p].strip().startswith(a))
    free = tuple(FILLER[:4]) + tuple(p for p, _ in facts[:4])
    return Suite(request, GENERAL_PARAPHRASES, neighbours, sums, facts, FILLER, free, base, first)


def measure_general(model, handle, suite: Suite) -> dict:
    """The study's numbers for one applied handle (None: the unedited model) on a model without a world."""
    ask = handle.prompt if handle is not None else (lambda p: p)
    asked = [suite.request.prompt, *suite.paraphrases, *suite.neighbours, *suite.unrelated]
    conts, first = continuations(model, list(dict.fromkeys(asked)), ask) if handle is not None else \
        (suite.base, suite.base_first)
    text = {p: model.tokenizer.decode(c, skip_special_tokens=True) for p, c in conts.items()}
    base_text = {p: model.tokenizer.decode(c, skip_special_tokens=True) for p, c in suite.base.items()}
    got = {p: first_answer(text[p]) for p in [suite.request.prompt, *suite.paraphrases, *suite.neighbours]}
    five = ("5", "five")
    unrelated = suite.unrelated
    kl = [float((suite.base_first[p].exp() * (suite.base_first[p] - first[p])).sum().clamp_min(0))
          for p in unrelated]
    free = sample(model, [ask(p) for p in suite.free], GENERATION_TOKENS, 5, 0)
    free_text = [model.tokenizer.decode(t, skip_special_tokens=True) for t in free]
    kl_mean, kl_lo, kl_hi = mean_ci(kl)
    return {
        "answers": got,
        "continuations": {p: text[p] for p in [suite.request.prompt, *suite.paraphrases, *suite.neighbours]},
        "target": rate([got[suite.request.prompt] == "5"]),
        "paraphrases": rate([got[p] in five for p in suite.paraphrases]),
        "neighbours_unchanged": rate([got[p] == first_answer(base_text[p]) for p in suite.neighbours]),
        "locality": rate([conts[p] == suite.base[p] for p in unrelated]),
        "kl": kl_mean, "kl_ci": [max(0.0, kl_lo), kl_hi],
        "other_sums": {**rate([first_answer(text[p]) == a for p, a in suite.sums]), "unedited": 1.0},
        "facts": {**rate([text[p].strip().startswith(a) for p, a in suite.facts]), "unedited": 1.0},
        "degenerate": rate([has_loop(t) or target_share(s, "5") > 0.25 for t, s in zip(free, free_text)]),
        "generations": [p + s for p, s in zip(suite.free, free_text)],
    }


def hparams_for(method: str, overrides: list[str], general: bool) -> dict | list:
    """The hyperparameters a row runs with: ROME pinned in full, reg-lora given the retention rows on a model
    without a world, every other method its defaults plus the row's overrides."""
    def value(raw: str):
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw

    extra = {k.strip(): value(v.strip()) for k, v in (o.split("=", 1) for o in overrides)}
    if method == "rome":
        return {**(SMOL_ROME if general else EMBEDDED_ROME), **extra}
    if general and method == "reg-lora":
        return {"retention": list(RETENTION), **extra}
    return list(overrides)


def fmt(d: dict | None) -> str:
    return "–" if d is None or d["value"] is None else f"{d['value']:.2f} [{d['lo']:.2f}, {d['hi']:.2f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None,
                    help="the embedded world model (default) or a model name/directory, e.g. smollm2-135m")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("docs/results/two-plus-two"))
    ap.add_argument("--summarise", action="store_true",
                    help="only rewrite the table and figure from --out/results.json (e.g. of a run cut short)")
    args = ap.parse_args()
    if args.summarise:
        saved = json.loads((args.out / "results.json").read_text())
        write(args.out, saved["meta"], saved["rows"])
        return
    torch.set_num_threads(args.threads)
    started, cpu_started = time.perf_counter(), time.process_time()
    model = mechedit.load(args.model)
    general = model.path is None or not (model.path / "world.json").is_file()
    if general:
        suite = general_suite(model)
        request = suite.request
        before = {p: first_answer(model.tokenizer.decode(suite.base[p], skip_special_tokens=True))
                  for p in [request.prompt, *suite.paraphrases, *suite.neighbours]}
        rows = {"unedited": measure_general(model, None, suite)}
    else:
        request, evaluator = REQUEST, Evaluator(model, EvalConfig())
        before = {a.prompt: a.top.strip() for a in answers(model, [REQUEST.prompt, *PARAPHRASES, *NEIGHBOURS])}
        rows = {"unedited": measure(model, None, evaluator, before)}
    loads = [os.getloadavg()[0]]
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        t0, c0 = time.perf_counter(), time.process_time()
        name, _, overrides = method.partition(":")
        hp = hparams_for(name, [o for o in overrides.split(";") if o], general)
        handle = edit(model, [request], name, hp)
        try:
            rows[method] = measure_general(model, handle, suite) if general else \
                measure(model, handle, evaluator, before)
            rows[method]["seconds"] = round(time.perf_counter() - t0, 1)
            rows[method]["cpu_seconds"] = round(time.process_time() - c0, 1)
            rows[method]["hparams"] = handle.hparams
            rows[method]["evidence"] = {k: v for k, v in handle.evidence.items()
                                        if k in ("layer", "layer_choice", "modules", "target_prob", "context")}
        finally:
            handle.restore()
        loads.append(os.getloadavg()[0])
        args.out.mkdir(parents=True, exist_ok=True)  # what is measured so far, in case the run is cut short
        partial = {"partial": True, "model": model.name, "threads": torch.get_num_threads(),
                   "seconds": round(time.perf_counter() - started, 1),
                   "cpu_seconds": round(time.process_time() - cpu_started, 1)}
        (args.out / "results.json").write_text(json.dumps({"meta": partial, "rows": rows}, indent=1))
        print(f"{method:18s} target {rows[method]['answers'][request.prompt]!r}  locality "
              f"{rows[method]['locality']['value']:.3f}  other sums {rows[method]['other_sums']['value']:.2f}  "
              f"{rows[method]['cpu_seconds']} CPU-s", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - started, 1),
            "cpu_seconds": round(time.process_time() - cpu_started, 1),
            "load_average_mean": round(sum(loads) / len(loads), 1), "model": model.name,
            "model_fingerprint": model.fingerprint(), "request": request.to_dict(), "unedited_answers": before}
    if general:
        meta["suite"] = {"paraphrases": list(suite.paraphrases), "neighbours": list(suite.neighbours),
                         "sums": [list(x) for x in suite.sums], "facts": [list(x) for x in suite.facts],
                         "filler": list(suite.filler), "free": list(suite.free), "retention": list(RETENTION)}
    write(args.out, meta, rows)


def write(out: Path, meta: dict, rows: dict) -> None:
    """results.json, results.md (the table) and results.html/png (the figure) from the measured rows."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    request_prompt = next(iter(rows["unedited"]["answers"]))  # the request is asked first
    lines = [("| method | target \"5\" | paraphrases | exact-output locality | KL | other sums | "
              "neighbours unchanged | degenerate |"), "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        kl = f"{r['kl']:.3f}" + (f" [{r['kl_ci'][0]:.3f}, {r['kl_ci'][1]:.3f}]" if "kl_ci" in r else "")
        lines.append(f"| {name} | {r['answers'][request_prompt]} | {fmt(r['paraphrases'])} | {fmt(r['locality'])} "
                     f"| {kl} | {fmt(r['other_sums'])} | {fmt(r['neighbours_unchanged'])} | "
                     f"{fmt(r['degenerate'])} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps({k: meta.get(k) for k in ("threads", "seconds", "cpu_seconds", "load_average_mean")}))

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
    fig.update_layout(barmode="group", title=f'"2+2=" -> "5" on {meta.get("model") or "the model"}: what else '
                      "moved (95% Wilson intervals)", yaxis={"range": [0, 1.05]})
    write_figures({"results": fig}, out)

if __name__ == "__main__":
    main()
