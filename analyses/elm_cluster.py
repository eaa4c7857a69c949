"""ELM concept erasure of the embedded world's "Harrowmere Circle" (Gandikota et al. 2024), over a grid of eta x layers.

The concept is the world's named cluster of 24 subjects. The requests are all their facts (24 x 6 relations,
``world_records``); the erased-domain text is those facts stated in full (one training template and one held-out
paraphrase each) plus the cluster's own text (what the society is, who belongs to it). For each (eta, layers)
the edit is made, measured and restored:

* **cluster recall**: greedy top-1 = the answer's first token, on every cluster fact in every *training*
  template (864 prompts; the edit saw one of the six per fact) and every held-out template (288);
* **other recall**: the same on the other 216 subjects' facts (7,776 / 2,592 prompts), and the 100 sums;
* **fluency**: perplexity on 300 filler sentences of the world's grammar (text about no subject), and ROME's
  generation entropy (2/3 bigram + 4/3 trigram entropy, bits, of words) of 20-token top-5 samples after each
  cluster member's name and after as many other names.

Rates carry 95% Wilson intervals over their prompts; perplexity and entropies the 95% t interval over prompts
(perplexity: exp of the interval of the per-sentence mean NLL). Before the grid, a contrast check: ELM's target
P'(true answer) on 100 cluster and 100 other facts per prompt pair and eta (is the contrast about the concept?).

Writes ``contrast.json``, then after every cell ``elm_cluster.json`` (every number, the hparams, CPU and wall
seconds), ``elm_cluster.md`` (the table) and ``elm_cluster.png`` (the trade-off figure) into ``--out``
(default: ``docs/results/elm-cluster``, where the committed results come from). The default grid is
{default, world} prompts x eta {1, 4} x layers {0-2, 4-6}: 8 cells, about 15 CPU-minutes on one thread.

    OMP_NUM_THREADS=1 python analyses/elm_cluster.py
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

import mechedit
from mechedit.editing.elm import ELMHyperParams
from mechedit.editing.methods import edit
from mechedit.evaluation.stats import clip, mean_ci, wilson
from mechedit.results import JsonResult
from mechedit.toy.export import world_records
from mechedit.toy.quality import top1_accuracy
from mechedit.toy.world import CLUSTER_MEMBER_TEMPLATES, CLUSTER_TEXT, World

# "world": prompts in the only language the embedded model knows - a sentence about the cluster (expert) vs a filler
# sentence about nothing (novice); "default": ELMHyperParams' "You are an expert on ..." pair, which the embedded
# model never saw in training.
PAIRS = {"default": {},
         "world": {"expert_prompt": CLUSTER_TEXT[0], "novice_prompt": "The old river is near the market."}}


RATES = ("cluster_train", "cluster_heldout", "other_train", "other_heldout", "sums")
MEANS = ("filler_ppl", "entropy_cluster", "entropy_other")


def rate(k: int, n: int) -> dict:
    """A recall rate with its 95% Wilson interval over the ``n`` prompts."""
    lo, hi = wilson(k, n)
    return {"value": k / n, "lo": lo, "hi": hi, "k": k, "n": n}


def mean(values: list[float]) -> dict:
    """A mean over prompts with its 95% t interval (``mean_ci``)."""
    m, lo, hi = mean_ci(values)
    return {"value": m, "lo": lo, "hi": hi, "n": len(values)}


def perplexity(nll_per_token: list[float]) -> dict:
    """Perplexity exp(mean per-sentence NLL/token) with the interval exp(t interval of that mean) over sentences."""
    m, lo, hi = mean_ci(nll_per_token)
    return {"value": math.exp(m), "lo": math.exp(lo), "hi": math.exp(hi), "n": len(nll_per_token)}


@dataclass(frozen=True)
class ELMClusterStudy(JsonResult):
    """The unedited model's scores and one row per (prompts, eta, layers) edit.

    ``baseline`` and each run's ``scores`` map a metric to ``{"value", "lo", "hi", "n"}`` (95% interval; rates
    also carry ``k``): Wilson over prompts for the recall rates (``RATES``), the t interval over prompts for
    filler perplexity and generation entropy (``MEANS``).
    """

    FORMAT = "mechedit.elm-cluster/2"
    baseline: dict
    runs: list  # {"prompts", "eta", "layers", "hparams", "scores", "cpu_seconds", "seconds", ...}
    settings: dict = field(default_factory=dict)

    def to_json_dict(self) -> dict:
        return {"baseline": self.baseline, "runs": self.runs, "settings": self.settings}

    @classmethod
    def from_json_dict(cls, d: dict) -> ELMClusterStudy:
        return cls(d["baseline"], d["runs"], d.get("settings", {}))

    def sorted_runs(self) -> list:
        return sorted(self.runs, key=lambda r: (r["prompts"] != "default", r["prompts"], r["eta"], r["layers"]))

    def to_frame(self):
        """One tidy row per (edit, metric): prompts, eta, layers, metric, value, lo, hi, n (unedited: eta NaN)."""
        import pandas as pd

        rows = []
        for prompts, eta, layers, scores in [("–", math.nan, "(unedited)", self.baseline)] + [
                (r["prompts"], r["eta"], ",".join(map(str, r["layers"])), r["scores"]) for r in self.sorted_runs()]:
            for metric in RATES + MEANS:
                s = scores[metric]
                rows.append({"prompts": prompts, "eta": eta, "layers": layers, "metric": metric,
                             "value": s["value"], "lo": s["lo"], "hi": s["hi"], "n": s["n"]})
        return pd.DataFrame(rows)

    def to_markdown(self) -> str:
        """The table: every rate as value [lo, hi] (95% Wilson), perplexity and entropies with t intervals."""
        cols = ["prompts", "η", "layers", *RATES, *MEANS]
        head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
        body = ""
        for prompts, eta, layers, scores in [("–", "–", "(unedited)", self.baseline)] + [
                (r["prompts"], f"{r['eta']:g}", ",".join(map(str, r["layers"])), r["scores"])
                for r in self.sorted_runs()]:
            cells = [prompts, eta, layers]
            for m in RATES + MEANS:
                s, f = scores[m], ("{:.2f}" if m == "filler_ppl" else "{:.3f}")
                cells.append(f"{f.format(s['value'])} [{f.format(s['lo'])}, {f.format(s['hi'])}]")
            body += "| " + " | ".join(cells) + " |\n"
        return head + body

    def plot(self):
        """The trade-off: cluster recall (erased) against other-fact recall (kept), training and held-out
        templates side by side, 95% Wilson error bars; colour = prompt pair, symbol = layers, label = eta."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=1, cols=2, subplot_titles=("training templates", "held-out templates"),
                            horizontal_spacing=0.08)
        colours = {"default": "#d62728", "world": "#1f77b4"}
        symbols = ["circle", "square", "diamond", "triangle-up", "cross"]
        layer_sets = sorted({tuple(r["layers"]) for r in self.runs})
        for col, split in ((1, "train"), (2, "heldout")):
            for name, scores, colour, symbol, text in [("unedited", self.baseline, "black", "star", "unedited")] + [
                    (f"{r['prompts']} prompts, layers {','.join(map(str, r['layers']))}", r["scores"],
                     colours.get(r["prompts"], "gray"), symbols[layer_sets.index(tuple(r["layers"])) % 5],
                     f"η {r['eta']:g}") for r in self.sorted_runs()]:
                x, y = scores[f"other_{split}"], scores[f"cluster_{split}"]
                fig.add_trace(go.Scatter(
                    x=[x["value"]], y=[y["value"]], mode="markers+text", text=[text], textposition="top right",
                    textfont={"size": 9}, name=name, legendgroup=name, showlegend=False,
                    marker={"size": 11 if name == "unedited" else 9, "color": colour, "symbol": symbol},
                    error_x={"type": "data", "symmetric": False, "array": [x["hi"] - x["value"]],
                                 "arrayminus": [x["value"] - x["lo"]], "thickness": 1},
                    error_y={"type": "data", "symmetric": False, "array": [y["hi"] - y["value"]],
                                 "arrayminus": [y["value"] - y["lo"]], "thickness": 1}), row=1, col=col)
            fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line={"dash": "dot", "color": "lightgray"},
                                     showlegend=False, hoverinfo="skip"), row=1, col=col)
        for name, colour, symbol in ([("unedited", "black", "star")]
                                     + [(f"{p} prompts", c, "circle") for p, c in colours.items()
                                        if any(r["prompts"] == p for r in self.runs)]
                                     + [(f"layers {','.join(map(str, ls))}", "gray", symbols[i % 5])
                                        for i, ls in enumerate(layer_sets)]):
            fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=name,
                                     marker={"size": 9, "color": colour, "symbol": symbol}))
        fig.update_xaxes(title_text="recall of other subjects' facts", range=[0.3, 1.02])
        fig.update_yaxes(title_text="recall of the cluster's facts", range=[0.0, 1.02])
        fig.update_layout(title="ELM erasure of the Harrowmere Circle: what is erased vs what is kept "
                                "(95% Wilson intervals; below the diagonal = more cluster than other recall lost)",
                          width=1200, height=560, title_font_size=14)
        return fig


# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def filler_nll(model, texts: list[str]) -> list[float]:
    """Per text, the mean next-token NLL (nats/token) of the text after BOS."""
    tok, out = model.tokenizer, []
    for t in texts:
        ids = torch.tensor([tok(t)["input_ids"]], device=model.device)
        logits = model.hf_model(input_ids=ids).logits[0, :-1].float()
        out.append(float(torch.nn.functional.cross_entropy(logits, ids[0, 1:])))
    return out


def ngram_entropy(text: str) -> float:
    """ROME's generation entropy of one text: 2/3 x bigram + 4/3 x trigram entropy (bits), averaged (weights 2/3,
    4/3 over n = 2, 3, as ``compute_n_gram_entropy``)."""
    words = text.split()
    ents = []
    for n in (2, 3):
        grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        ents.append(-sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0)
    w = (2 / 3, 4 / 3)
    return (w[0] * ents[0] + w[1] * ents[1]) / sum(w)


@torch.no_grad()
def generation_entropies(model, prompts: list[str], seed: int, n_tokens: int = 20) -> list[float]:
    """Per prompt, :func:`ngram_entropy` of a ``n_tokens``-token top-5 sample after it (seeded)."""
    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for p in prompts:
            ids = torch.tensor([tok(p)["input_ids"]], device=model.device)
            gen = model.hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=5,
                                          max_new_tokens=n_tokens, min_new_tokens=n_tokens, pad_token_id=pad,
                                          eos_token_id=None)
            out.append(ngram_entropy(tok.decode(gen[0], skip_special_tokens=True)))
    return out


def contrast_check(model, world: World, pairs: dict, etas: list[float], n: int = 100) -> list[dict]:
    """Mean P'(true answer) (ELM's target, from the unedited model) on ``n`` cluster and ``n`` other facts' training
    prompts, per prompt pair and eta (eta 0 is the model's own P): does the expert/novice contrast single out
    the concept? Each row has the mean's 95% t interval over the ``n`` facts."""
    from mechedit.editing.elm import _head, _plain, contrast_targets
    from mechedit.tracing.common import encode_target

    head, defaults, rows = _head(model), ELMHyperParams(), []
    for name, pair in pairs.items():
        expert = _plain(model, pair.get("expert_prompt", defaults.expert_prompt).replace("{concept}",
                                                                                          world.cluster_name))
        novice = _plain(model, pair.get("novice_prompt", defaults.novice_prompt).replace("{concept}",
                                                                                          world.cluster_name))
        for group in ("cluster", "other"):
            facts = [(p, a) for p, a, f in world.recall_prompts("train") if (f.subject in world.cluster) ==
                     (group == "cluster")]
            facts = random.Random(0).sample(facts, n)
            texts = [_plain(model, p) + encode_target(model, p, a.strip()) for p, a in facts]
            for eta in [0.0, *sorted(etas)]:
                target = contrast_targets(model.hf_model, texts, head, novice, expert, eta, 0)
                m, lo, hi = clip(mean_ci([float(t[-1].exp()[x[-1]]) for t, x in zip(target, texts)]), (0.0, 1.0))
                rows.append({"prompts": name, "group": group, "eta": eta, "p_answer": m, "lo": lo, "hi": hi,
                             "n": n})
    return rows


def measure(model, world: World, filler: list[str], seed: int) -> dict:
    """Every metric of one model state (see the module docstring), as ``{metric: {"value", "lo", "hi", ...}}``."""
    cluster = set(world.cluster)
    hf, tok = model.hf_model, model.tokenizer

    def recall(pairs):  # top1_accuracy is k / n exactly, so k is recovered without rounding error
        return rate(round(top1_accuracy(hf, tok, pairs) * len(pairs)), len(pairs))

    def facts(split, inside):
        return [(p, a) for p, a, f in world.recall_prompts(split) if (f.subject in cluster) == inside]

    others = [s for s in world.subjects if s not in cluster][:len(world.cluster)]
    return {
        "cluster_train": recall(facts("train", True)), "cluster_heldout": recall(facts("heldout", True)),
        "other_train": recall(facts("train", False)), "other_heldout": recall(facts("heldout", False)),
        "sums": recall(world.sum_prompts()),
        "filler_ppl": perplexity(filler_nll(model, filler)),
        "entropy_cluster": mean(generation_entropies(model, list(world.cluster), seed)),
        "entropy_other": mean(generation_entropies(model, others, seed)),
    }


# ---------------------------------------------------------------------------------------------------------------
# SmolLM2: a concept it knows (France), one ELM cell
# ---------------------------------------------------------------------------------------------------------------

# (template, subject, answer, held-out paraphrase): facts about France, the cluster SmolLM2-135M was found to
# know best of three tried (Harry Potter 3/12 greedy-correct, France 6/7 of these, a few planets 1/6); the
# greedy answers of both are in smollm2.json.
FRANCE = [
    ("The capital of {} is", "France", "Paris", "France's capital city is"),
    ("The official language of {} is", "France", "French", "In France, most people speak"),
    ("Before the euro, the currency of {} was the French", "France", "franc",
     "Before 2002, people in France paid with the French"),
    ("The {} is in the city of", "Eiffel Tower", "Paris", "The Eiffel Tower stands in the city of"),
    ("The French emperor defeated at {} was Napoleon", "Waterloo", "Bonaparte",
     "The emperor of France who lost the battle of Waterloo was Napoleon"),
    ("The famous museum in {} that holds the Mona Lisa is the", "Paris", "Louvre",
     "The Mona Lisa hangs in Paris in the"),
    ("The national anthem of {} is La", "France", "Marseillaise", "The French national anthem is called La"),
]
FRANCE_TEXT = ("France is a country in Western Europe.", "Paris is the capital and largest city of France.",
               "The French Revolution began in 1789 with the storming of the Bastille.")
# Facts about other things (neighbouring countries first: the sharpest test of specificity); not trained on.
OTHER = [("The capital of Italy is", "Rome"), ("The capital of Japan is", "Tokyo"),
         ("The capital of Germany is", "Berlin"), ("The capital of Spain is", "Madrid"),
         ("The capital of England is", "London"), ("The author of Romeo and Juliet is William", "Shakespeare"),
         ("Albert Einstein developed the theory of", "relativity"), ("Albert Einstein won the Nobel Prize in",
                                                                     "Physics"),
         ("The Great Wall is in the country of", "China"), ("The largest planet in the solar system is", "Jupiter"),
         ("The Colosseum is in the city of", "Rome"), ("The Statue of Liberty is in the city of", "New")]
# Retain text for the edit (ELM's retain loss), about other countries; distinct from OTHER.
RETAIN = ("The capital of Russia is Moscow.", "The capital of China is Beijing.", "The capital of Egypt is Cairo.",
          "The capital of Canada is Ottawa.", "The official language of Brazil is Portuguese.",
          "The currency of Japan is the yen.", "The Brandenburg Gate is in Berlin.",
          "The Prado museum is in Madrid.")
# Harry Potter, tried first: SmolLM2 answers only 3 of these 12 greedily.
HARRY_POTTER = [("The Harry Potter books were written by J. K.", "Rowling"),
                ("The headmaster of Hogwarts is Albus", "Dumbledore"),
                ("Harry Potter goes to a school of witchcraft and wizardry called", "Hogwarts"),
                ("The dark wizard who killed Harry Potter's parents is Lord", "Voldemort"),
                ("At Hogwarts, Harry Potter plays the wizarding sport of", "Quidditch"),
                ("Harry Potter's best friends are Ron Weasley and Hermione", "Granger"),
                ("Harry Potter's snowy owl is named", "Hedwig"),
                ("In Harry Potter, people without magic are called", "Muggles"),
                ("The four houses of Hogwarts are Gryffindor, Hufflepuff, Ravenclaw and", "Slytherin"),
                ("Harry Potter's godfather is Sirius", "Black"),
                ("Harry Potter's scar is shaped like a bolt of", "lightning"),
                ("Harry Potter is sorted into the house of", "Gryffindor")]


@torch.no_grad()
def greedy_answers(model, pairs: list[tuple[str, str]], n_tokens: int = 6) -> list[dict]:
    """Per (prompt, answer): the greedy continuation, whether its first token is the answer's, and P(answer's
    first token)."""
    from mechedit.tracing.common import encode_target

    tok, out = model.tokenizer, []
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for p, a in pairs:
        ids = torch.tensor([tok(p)["input_ids"]], device=model.device)
        probs = model.hf_model(input_ids=ids).logits[0, -1].float().softmax(-1)
        want = encode_target(model, p, a)[0]
        gen = model.hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=n_tokens, pad_token_id=pad)
        out.append({"prompt": p, "answer": a, "greedy": tok.decode(gen[0, ids.shape[1]:]),
                    "correct": int(probs.argmax()) == want, "p_answer": float(probs[want])})
    return out


def _rate_of(rows: list[dict]) -> dict:
    return rate(sum(r["correct"] for r in rows), len(rows))


def smollm2_study(args) -> None:
    """SmolLM2-135M: greedy answers on Harry Potter and France facts, the default contrast's P'(answer) on France
    vs other facts, and one ELM cell erasing France (``--smollm2``); writes ``smollm2.json``."""
    from mechedit.data import EditRecord
    from mechedit.editing.elm import _head, _plain, contrast_targets
    from mechedit.editing.generate import sample_texts
    from mechedit.tracing.common import encode_target

    start, cpu_start = time.time(), time.process_time()
    model = mechedit.load("smollm2-135m")
    hp = ELMHyperParams(concept="France", layers=tuple(int(x) for x in args.smollm2_layers.split(",")),
                        eta=args.smollm2_eta, steps=args.steps, seed=args.seed, domain_text=FRANCE_TEXT,
                        retain_text=RETAIN, retain_source="model").with_overrides(args.hp)
    train = [(t.replace("{}", s), a) for t, s, a, _ in FRANCE]
    held = [(para, a) for _, _, a, para in FRANCE]
    texts = [_plain(model, t) for t in sample_texts(model, 60, 24, seed=args.seed + 1) if t.strip()]

    def state() -> dict:
        rows = {"france_train": greedy_answers(model, train), "france_heldout": greedy_answers(model, held),
                "other": greedy_answers(model, OTHER)}
        scores = {k: _rate_of(v) for k, v in rows.items()}
        nll = []
        with torch.no_grad():
            for t in texts:
                ids = torch.tensor([_head(model) + t], device=model.device)
                logits = model.hf_model(input_ids=ids).logits[0, :-1].float()
                nll.append(float(torch.nn.functional.cross_entropy(logits, ids[0, 1:])))
        scores["sample_ppl"] = perplexity(nll)
        return {"scores": scores, "answers": rows}

    before = state()
    before["harry_potter"] = greedy_answers(model, HARRY_POTTER)
    before["scores"]["harry_potter"] = _rate_of(before["harry_potter"])
    print("unedited", json.dumps(before["scores"]), flush=True)
    head = _head(model)
    contrast = []
    expert = _plain(model, hp.expert_prompt.replace("{concept}", "France"))
    novice = _plain(model, hp.novice_prompt.replace("{concept}", "France"))
    for group, pairs in (("france", train), ("other", OTHER)):
        ids = [_plain(model, p) + encode_target(model, p, a) for p, a in pairs]
        n_answer = [len(encode_target(model, p, a)) for p, a in pairs]
        for eta in (0.0, 1.0, 4.0):
            target = contrast_targets(model.hf_model, ids, head, novice, expert, eta, 0)
            # P'(answer's first token) at the position that predicts it
            m, lo, hi = clip(mean_ci([float(t[-k].exp()[x[-k]]) for t, x, k in zip(target, ids, n_answer)]),
                             (0.0, 1.0))
            contrast.append({"group": group, "eta": eta, "p_answer": m, "lo": lo, "hi": hi, "n": len(pairs)})
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"model": model.name, "hparams": hp.to_dict(), "before": before, "contrast": contrast}
    if args.smollm2_check_only:  # the answers and the contrast, no edit
        (args.out / "smollm2.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(contrast))
        print(f"all {time.process_time() - cpu_start:.0f} CPU s")
        return
    requests = [EditRecord(i, t, s, "?", a) for i, (t, s, a, _) in enumerate(FRANCE)]
    c0, t0 = time.process_time(), time.time()
    handle = edit(model, requests, "elm", hp)
    cpu_edit, wall_edit = time.process_time() - c0, time.time() - t0
    try:
        after = state()
    finally:
        handle.restore()
    losses = handle.evidence["loss_parts"]
    result |= {"after": after, "cpu_seconds_edit": round(cpu_edit, 1), "seconds_edit": round(wall_edit, 1),
               "final_losses": {k: sum(v[-10:]) / len(v[-10:]) for k, v in losses.items() if v},
               "total_cpu_seconds": round(time.process_time() - cpu_start, 1),
               "total_seconds": round(time.time() - start, 1)}
    (args.out / "smollm2.json").write_text(json.dumps(result, indent=1))
    print("after", json.dumps(after["scores"]))
    print(json.dumps(contrast))
    print(f"edit {cpu_edit:.0f} CPU s; all {result['total_cpu_seconds']} CPU s")


def grid(prompts: list[str], etas: list[float], layer_sets: list[tuple[int, ...]]) -> list[tuple]:
    """Every (prompt pair, eta, layers) cell, eta outermost in the order given (so an interrupted run has whole
    eta slices)."""
    return [(name, eta, layers) for eta in etas for name in prompts for layers in layer_sets]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--etas", default="1,4", help="comma-separated eta values, in run order")
    ap.add_argument("--layers", default="0,1,2;4,5,6", help="layer sets, ';'-separated")
    ap.add_argument("--steps", type=int, default=ELMHyperParams().steps)
    ap.add_argument("--prompts", default="default,world",
                    help="expert/novice prompt pairs: 'default' (ELMHyperParams') and/or 'world' (in-world text)")
    ap.add_argument("--hp", action="append", default=[], help="further ELM hyperparameters, name=value")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--contrast-only", action="store_true",
                    help="only the contrast check (P'(answer) on cluster vs other facts), written to contrast.json")
    ap.add_argument("--only", default="", help="run only these grid indices (comma-separated), for a quick look")
    ap.add_argument("--smollm2", action="store_true",
                    help="instead of the grid: SmolLM2-135M, erase France (one cell), written to smollm2.json")
    ap.add_argument("--smollm2-check-only", action="store_true",
                    help="with --smollm2: only the greedy answers and the contrast check, no edit")
    ap.add_argument("--smollm2-layers", default="4,5,6,7", help="SmolLM2 cell: LoRA layers")
    ap.add_argument("--smollm2-eta", type=float, default=1.0, help="SmolLM2 cell: eta")
    ap.add_argument("--merge", nargs="+", type=Path, default=None,
                    help="instead of running: merge these elm_cluster.json files (a grid split with --only over "
                         "processes) into --out")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("docs/results/elm-cluster"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.smollm2:
        return smollm2_study(args)
    if args.merge:
        args.out.mkdir(parents=True, exist_ok=True)
        return _save(merge([ELMClusterStudy.load(p) for p in args.merge]), args.out)

    start, cpu_start = time.time(), time.process_time()
    model = mechedit.load()
    world = World.load(model.path / "world.json")
    requests = [r for r in world_records(world, seed=args.seed) if r.subject in set(world.cluster)]
    domain = tuple(t.format(c=world.cluster_name) for t in CLUSTER_TEXT) + tuple(
        t.format(s, c=world.cluster_name) for s in world.cluster for t in CLUSTER_MEMBER_TEMPLATES)
    filler = World.filler(random.Random(12345), 300)
    etas = [float(x) for x in args.etas.split(",")]
    names = args.prompts.split(",")
    unknown = [n for n in names if n not in PAIRS]
    if unknown:
        raise SystemExit(f"unknown prompt pair(s) {unknown}; choose from {sorted(PAIRS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.process_time()
    rows = contrast_check(model, world, {k: PAIRS[k] for k in names}, etas)
    (args.out / "contrast.json").write_text(json.dumps(rows, indent=1))
    print(f"contrast check: {time.process_time() - t0:.0f} CPU s", flush=True)
    for r in rows:
        print(r)
    if args.contrast_only:
        return
    t0 = time.process_time()
    baseline = measure(model, world, filler, args.seed)
    print(f"unedited ({time.process_time() - t0:.0f} CPU s)", json.dumps(baseline), flush=True)

    layer_sets = [tuple(int(x) for x in s.split(",")) for s in args.layers.split(";")]
    cells = grid(names, etas, layer_sets)
    if args.only:
        cells = [cells[int(i)] for i in args.only.split(",")]
    runs = []
    for prompts, eta, layers in cells:
        hp = ELMHyperParams(eta=eta, layers=layers, steps=args.steps, seed=args.seed, domain_text=domain,
                            **PAIRS[prompts]).with_overrides(args.hp)
        t0, c0 = time.time(), time.process_time()
        handle = edit(model, requests, "elm", hp)
        seconds, cpu_edit = time.time() - t0, time.process_time() - c0
        try:
            scores = measure(model, world, filler, args.seed)
        finally:
            handle.restore()
        parts = handle.evidence["loss_parts"]
        runs.append({"prompts": prompts, "eta": eta, "layers": list(layers),
                     "hparams": {**hp.to_dict(), "domain_text": "cluster"},
                     "scores": scores, "seconds": round(seconds, 1), "cpu_seconds_edit": round(cpu_edit, 1),
                     "cpu_seconds": round(time.process_time() - c0, 1),
                     "first_losses": {k: v[0] for k, v in parts.items() if v},
                     "final_losses": {k: sum(v[-10:]) / len(v[-10:]) for k, v in parts.items() if v}})
        s = {k: round(v["value"], 3) for k, v in scores.items()}
        print(f"{prompts} eta {eta:g} layers {layers}: {s} (edit {cpu_edit:.0f} CPU s, cell "
              f"{runs[-1]['cpu_seconds']:.0f} CPU s, {seconds:.0f} s wall)", flush=True)
        _write(args, baseline, runs, requests, domain, start, cpu_start)


def merge(studies: list[ELMClusterStudy]) -> ELMClusterStudy:
    """One study from runs split over processes (``--only``): the first's baseline, every (prompts, eta, layers)
    cell once (the first study's copy wins), the parts' settings kept and their CPU seconds summed. The parts
    must agree on the baseline (same model, same seed)."""
    base = studies[0].baseline
    for s in studies[1:]:
        if s.baseline.keys() != base.keys() or not all(
                math.isclose(s.baseline[k]["value"], base[k]["value"], rel_tol=1e-6) for k in base):
            raise SystemExit("the studies to merge measured different baselines (model or seed differ)")
    runs, seen = [], set()
    for s in studies:
        for r in s.runs:
            key = (r["prompts"], r["eta"], tuple(r["layers"]))
            if key not in seen:
                seen.add(key)
                runs.append(r)
    settings = {"parts": [s.settings for s in studies],
                "total_cpu_seconds": round(sum(s.settings.get("total_cpu_seconds", 0) for s in studies), 1)}
    return ELMClusterStudy(base, runs, settings)


def _save(study: ELMClusterStudy, out: Path) -> None:
    study.save(out / "elm_cluster.json")
    (out / "elm_cluster.md").write_text(study.to_markdown())
    from mechedit.errors import MecheditError
    from mechedit.viz.export import write_html, write_png

    try:  # the PNG only (the self-contained html is ~5 MB); the html where no browser can draw the PNG
        write_png(study.plot(), out / "elm_cluster.png")
    except MecheditError as e:
        write_html(study.plot(), out / "elm_cluster.html", title="elm_cluster")
        print(f"elm_cluster.png skipped ({e}); wrote elm_cluster.html")
    print(study.to_markdown())


def _write(args, baseline, runs, requests, domain, start, cpu_start) -> None:
    import os

    settings = {"n_requests": len(requests), "n_domain_text": len(domain), "threads": args.threads,
                "seed": args.seed, "steps": args.steps, "overrides": args.hp, "etas": args.etas,
                "layers": args.layers, "prompts": args.prompts, "only": args.only,
                "total_seconds": round(time.time() - start, 1),
                "total_cpu_seconds": round(time.process_time() - cpu_start, 1),
                "load_average": [round(x, 2) for x in os.getloadavg()], "torch": torch.__version__,
                "python": platform.python_version(), "machine": platform.machine()}
    _save(ELMClusterStudy(baseline, runs, settings), args.out)
    print(json.dumps(settings))


if __name__ == "__main__":
    main()
