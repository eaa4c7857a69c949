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

Writes ``elm_cluster.json`` (every number and the settings), ``elm_cluster.md`` (the table), ``elm_cluster.html``
/``.png`` (the figure) into ``--out``, after each run. ``--contrast-only`` instead writes ``contrast.json``: the
target P'(true answer) on 100 cluster and 100 other facts per prompt pair and eta (is the contrast specific?).

    OMP_NUM_THREADS=1 python analyses/elm_cluster.py --etas 1,4 --layers "0,1,2;4,5,6" --steps 80 \\
        --out docs/results/elm-cluster
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import mechedit
from mechedit.editing.elm import ELMHyperParams
from mechedit.editing.methods import edit
from mechedit.results import JsonResult
from mechedit.toy.export import world_records
from mechedit.toy.quality import top1_accuracy
from mechedit.toy.world import CLUSTER_MEMBER_TEMPLATES, CLUSTER_TEXT, World


# "world": prompts in the only language the embedded model knows - a sentence about the cluster (expert) vs a filler
# sentence about nothing (novice); "default": ELMHyperParams' "You are an expert on ..." pair, which the embedded
# model never saw in training.
PAIRS = {"default": {},
         "world": {"expert_prompt": CLUSTER_TEXT[0], "novice_prompt": "The old river is near the market."}}


@dataclass(frozen=True)
class Scores:
    cluster_train: float
    cluster_heldout: float
    other_train: float
    other_heldout: float
    sums: float
    filler_ppl: float
    entropy_cluster: float
    entropy_other: float


@dataclass(frozen=True)
class ELMClusterStudy(JsonResult):
    """The baseline model's scores and one row per (eta, layers) edit."""

    FORMAT = "mechedit.elm-cluster/1"
    baseline: dict
    runs: list  # {"eta", "layers", "hparams", "scores", "seconds", "final_losses"}
    settings: dict = field(default_factory=dict)

    def to_json_dict(self) -> dict:
        return {"baseline": self.baseline, "runs": self.runs, "settings": self.settings}

    @classmethod
    def from_json_dict(cls, d: dict) -> "ELMClusterStudy":
        return cls(d["baseline"], d["runs"], d.get("settings", {}))

    def to_frame(self):
        import pandas as pd

        rows = [{"prompts": "–", "eta": None, "layers": "(unedited)", **self.baseline}]
        rows += [{"prompts": r.get("prompts", "default"), "eta": r["eta"], "layers": ",".join(map(str, r["layers"])),
                  **r["scores"]} for r in self.runs]
        return pd.DataFrame(rows)

    def to_markdown(self) -> str:
        df = self.to_frame()
        cols = ["prompts", "eta", "layers", "cluster_train", "cluster_heldout", "other_train", "other_heldout", "sums",
                "filler_ppl", "entropy_cluster", "entropy_other"]
        head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
        body = ""
        for _, r in df.iterrows():
            no_eta = r["eta"] is None or (isinstance(r["eta"], float) and math.isnan(r["eta"]))
            cells = [str(r["prompts"]), "–" if no_eta else f"{r['eta']:g}", str(r["layers"])]
            cells += [f"{r[c]:.3f}" if c != "filler_ppl" else f"{r[c]:.2f}" for c in cols[3:]]
            body += "| " + " | ".join(cells) + " |\n"
        return head + body

    def plot(self):
        import plotly.graph_objects as go

        fig = go.Figure()
        base = self.baseline
        fig.add_trace(go.Scatter(x=[base["other_train"]], y=[base["cluster_train"]], mode="markers+text",
                                 text=["unedited"], textposition="top center", name="unedited",
                                 marker=dict(size=12, symbol="star")))
        for r in self.runs:
            s = r["scores"]
            label = f"{r.get('prompts', 'default')} η={r['eta']:g}, L{','.join(map(str, r['layers']))}"
            fig.add_trace(go.Scatter(x=[s["other_train"]], y=[s["cluster_train"]], mode="markers+text",
                                     text=[f"{label}<br>ppl {s['filler_ppl']:.2f}"], textposition="top center",
                                     name=label, marker=dict(size=10)))
        fig.update_layout(title="ELM erasure of the Harrowmere Circle: recall of its facts vs other facts",
                          xaxis_title="recall of other subjects' facts (training templates)",
                          yaxis_title="recall of the cluster's facts (training templates)",
                          xaxis_range=[-0.02, 1.05], yaxis_range=[-0.02, 1.05], width=900, height=650)
        return fig


# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def filler_perplexity(model, texts: list[str]) -> float:
    tok = model.tokenizer
    nll, n = 0.0, 0
    for t in texts:
        ids = torch.tensor([tok(t)["input_ids"]], device=model.device)
        logits = model.hf_model(input_ids=ids).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        n += ids.shape[1] - 1
    return math.exp(nll / n)


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
def generation_entropy(model, prompts: list[str], seed: int, n_tokens: int = 20) -> float:
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
            out.append(tok.decode(gen[0], skip_special_tokens=True))
    return sum(ngram_entropy(t) for t in out) / len(out)


def contrast_check(model, world: World, pairs: dict, etas: list[float], n: int = 100) -> list[dict]:
    """Mean P'(true answer) (ELM's target, from the unedited model) on ``n`` cluster and ``n`` other facts' training
    prompts, per prompt pair and eta (eta 0 is the model's own P): does the expert/novice contrast single out
    the concept?"""
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
            for eta in [0.0, *etas]:
                target = contrast_targets(model.hf_model, texts, head, novice, expert, eta, 0)
                p_answer = sum(float(t[-1].exp()[x[-1]]) for t, x in zip(target, texts)) / len(texts)
                rows.append({"prompts": name, "group": group, "eta": eta, "p_answer": p_answer})
    return rows


def measure(model, world: World, filler: list[str], seed: int) -> Scores:
    cluster = set(world.cluster)
    hf, tok = model.hf_model, model.tokenizer

    def recall(split, inside):
        pairs = [(p, a) for p, a, f in world.recall_prompts(split) if (f.subject in cluster) == inside]
        return top1_accuracy(hf, tok, pairs)

    others = [s for s in world.subjects if s not in cluster][:len(world.cluster)]
    return Scores(
        cluster_train=recall("train", True), cluster_heldout=recall("heldout", True),
        other_train=recall("train", False), other_heldout=recall("heldout", False),
        sums=top1_accuracy(hf, tok, world.sum_prompts()),
        filler_ppl=filler_perplexity(model, filler),
        entropy_cluster=generation_entropy(model, list(world.cluster), seed),
        entropy_other=generation_entropy(model, others, seed),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--etas", default="1,4", help="comma-separated eta values")
    ap.add_argument("--layers", default="0,1,2;4,5,6", help="layer sets, ';'-separated")
    ap.add_argument("--steps", type=int, default=ELMHyperParams().steps)
    ap.add_argument("--prompts", default="default,world",
                    help="expert/novice prompt pairs: 'default' (ELMHyperParams') and/or 'world' (in-world text)")
    ap.add_argument("--hp", action="append", default=[], help="further ELM hyperparameters, name=value")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--contrast-only", action="store_true",
                    help="only the contrast check (P'(answer) on cluster vs other facts), written to contrast.json")
    ap.add_argument("--only", default="", help="run only these grid indices (comma-separated), for a quick look")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("runs/elm-cluster"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    start = time.time()
    model = mechedit.load()
    world = World.load(model.path / "world.json")
    requests = [r for r in world_records(world, seed=args.seed) if r.subject in set(world.cluster)]
    domain = tuple(t.format(c=world.cluster_name) for t in CLUSTER_TEXT) + tuple(
        t.format(s, c=world.cluster_name) for s in world.cluster for t in CLUSTER_MEMBER_TEMPLATES)
    filler = World.filler(random.Random(12345), 300)
    etas = [float(x) for x in args.etas.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    if args.contrast_only:
        rows = contrast_check(model, world, {k: v for k, v in PAIRS.items() if k in args.prompts.split(",")}, etas)
        (args.out / "contrast.json").write_text(json.dumps(rows, indent=1))
        for r in rows:
            print(r)
        return
    baseline = measure(model, world, filler, args.seed)
    print("unedited", baseline, flush=True)

    pairs = PAIRS
    layer_sets = [tuple(int(x) for x in s.split(",")) for s in args.layers.split(";")]
    grid = [(name, eta, layers) for name in args.prompts.split(",") for eta in etas for layers in layer_sets]
    if args.only:
        grid = [grid[int(i)] for i in args.only.split(",")]
    runs = []
    for prompts, eta, layers in grid:
        hp = ELMHyperParams(eta=eta, layers=layers, steps=args.steps, seed=args.seed, domain_text=domain,
                            **pairs[prompts]).with_overrides(args.hp)
        t0 = time.time()
        handle = edit(model, requests, "elm", hp)
        seconds = time.time() - t0
        try:
            scores = measure(model, world, filler, args.seed)
        finally:
            handle.restore()
        parts = handle.evidence["loss_parts"]
        runs.append({"prompts": prompts, "eta": eta, "layers": list(layers),
                     "hparams": {**hp.to_dict(), "domain_text": "cluster"},
                     "scores": asdict(scores), "seconds": round(seconds, 1),
                     "first_losses": {k: v[0] for k, v in parts.items() if v},
                     "final_losses": {k: sum(v[-10:]) / len(v[-10:]) for k, v in parts.items() if v}})
        print(f"{prompts} eta {eta:g} layers {layers}: {scores} ({seconds:.0f} s)", flush=True)
        _write(args, baseline, runs, requests, domain, start)


def _write(args, baseline, runs, requests, domain, start) -> None:
    settings = {"n_requests": len(requests), "n_domain_text": len(domain), "threads": args.threads,
                "seed": args.seed, "steps": args.steps, "overrides": args.hp,
                "total_seconds": round(time.time() - start, 1), "torch": torch.__version__,
                "python": platform.python_version(), "machine": platform.machine()}
    study = ELMClusterStudy(asdict(baseline), runs, settings)
    study.save(args.out / "elm_cluster.json")
    (args.out / "elm_cluster.md").write_text(study.to_markdown())
    from mechedit.viz.export import write_figures

    _, notes = write_figures({"elm_cluster": study.plot()}, args.out)
    for n in notes:
        print(n)
    print(study.to_markdown())
    print(json.dumps(settings))


if __name__ == "__main__":
    main()
