"""Where do later sequential steps move an earlier batch of edits? A probe behind docs/results/sequential-edits.

Edits the first N (default 300) of the seeded SmolLM2 CounterFact draw with ``seq-memit`` in batches of 100
(layers 7-9, λ 500, key statistics from CounterFact sentences: ``analyses/sequential_edits.py --counterfact
--stats-text cf-clean``), with any further ``SequentialHyperParams`` overrides given after N. It keeps the first
batch's change ``D₁`` and the final total ``D``, then scores the first batch's 100 edit prompts (and their
paraphrases) with the margin ``NLL(true) − NLL(new)`` (mean per answer token; > 0: the edit holds) on the unedited
weights plus ``D₁`` (right after), plus ``D`` (now), and plus ``D₁`` everywhere and the later steps' ``D − D₁``
only at one class of positions (forward hooks on the MLP output projections):

* ``subj``: the subject's last token (where the edits are keyed);  ``other``: every other position;
* ``last``: the prompt's last token and the answer tokens;  ``mid``: the rest.

    OMP_NUM_THREADS=1 .venv/bin/python analyses/decay_by_position.py 300 anchor_original=true protect_weight=10
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # counterfact_smollm2: the draw and hyperparameters

import mechedit
import counterfact_smollm2 as cf
from mechedit.data import read_counterfact
from mechedit.editing.sequential import SequentialHyperParams, sequential_memit
from mechedit.editing.training import answer_batch, answer_logprobs
from mechedit.editing.memit.memit_main import linear_weight_in_out
from mechedit.tracing.common import prepare_prompt


def main() -> None:
    torch.set_num_threads(1)

    N = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    extra = sys.argv[2:]
    model = mechedit.load("smollm2-135m")
    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact.json"
    allr = read_counterfact(path)
    recs = cf.draw(allr, 1000, 0)[:N]
    p, n_text = cf.statistics_file(allr, cf.draw(allr, 1000, 0), 0)
    mh = dict(cf.HPARAMS["memit"]); mh.update(mom2_source=str(p), mom2_n_samples=n_text)
    hp = SequentialHyperParams(memit=mh).with_overrides(["batch_size=100", "memit.mom2_update_weight=500", *extra])
    layers = list(hp.memit.layers)
    W = {l: model.module(l, "mlp_out").weight for l in layers}
    W0 = {l: W[l].detach().clone() for l in layers}
    first = {}
    def progress(stage, k, n):
        if stage == "edit" and k == 100:
            for l in layers:
                first[l] = linear_weight_in_out((W[l].detach() - W0[l]).clone(), model.conv1d).double()
    t = time.time()
    h = sequential_memit(model, recs, hp, progress)
    print("edit s", time.time() - t, flush=True)
    final = {l: linear_weight_in_out(h.deltas[model.module_name(l, "mlp_out") + ".weight"].clone(), model.conv1d).double() for l in layers}
    h.restore()
    later = {l: final[l] - first[l] for l in layers}
    for l in layers:
        print(l, "first norm", float(first[l].norm()), "later norm", float(later[l].norm()), "final", float(final[l].norm()))

    state = {"a": None, "b": None, "mask": None}
    def make_hook(layer):
        def hook(mod, args, out):
            x = args[0].double()
            add = torch.zeros_like(out, dtype=torch.float64)
            if state["a"] is not None:
                add = add + x @ state["a"][layer]
            if state["b"] is not None:
                add = add + (x @ state["b"][layer]) * state["mask"].unsqueeze(-1)
            return out + add.to(out.dtype)
        return hook
    # the hooks add nothing until ``state`` says so; removed however the scoring ends
    handles = [model.module(layer, "mlp_out").register_forward_hook(make_hook(layer)) for layer in layers]
    try:

        def margin(pairs, subj_pos, a, b=None, cls=None):
            out = []
            for i in range(0, len(pairs), 64):
                ch = pairs[i:i + 64]; sp = subj_pos[i:i + 64]
                res = {}
                for which in (1, 2):
                    bt = answer_batch(model, [c[0] for c in ch], [c[which] for c in ch])
                    T = bt.input_ids.shape[1]
                    pos = torch.arange(T).unsqueeze(0)
                    lp = torch.tensor([len(model.encode(c[0])) for c in ch]).unsqueeze(1)
                    s = torch.tensor(sp).unsqueeze(1)
                    masks = {"subj": (pos == s).double(), "last": (pos >= lp - 1).double()}
                    masks["other"] = 1 - masks["subj"]
                    masks["mid"] = 1 - masks["subj"] - masks["last"]
                    state.update(a=a, b=b, mask=masks[cls] if cls else None)
                    ntok = (bt.labels[:, 1:] != -100).sum(1).clamp_min(1)
                    with torch.no_grad():
                        res[which] = (-answer_logprobs(model.hf_model, bt) / ntok).double()
                    state.update(a=None, b=None, mask=None)
                out.append(res[2] - res[1])
            return torch.cat(out)

        def subj_last(prompt, subject):
            pp = prepare_prompt(model, prompt, subject)
            return pp.subject_range[1] - 1

        b1 = recs[:100]
        pairs = [(r.prompt, r.target_new, r.target_true) for r in b1]
        sp = [subj_last(r.prompt, r.subject) for r in b1]
        para = [(q, r.target_new, r.target_true) for r in b1 for q in r.paraphrases]
        psp = []
        for r in b1:
            for q in r.paraphrases:
                try: psp.append(subj_last(q, r.subject))
                except Exception: psp.append(-1)
        for name, pr, s in (("edit", pairs, sp), ("paraphrase", para, psp)):
            m0 = margin(pr, s, None)
            m1 = margin(pr, s, first)
            mf = margin(pr, s, final)
            print(f"{name}: base {m0.mean():+.3f} ({(m0>0).float().mean()*100:.1f}) | right after {m1.mean():+.3f} ({(m1>0).float().mean()*100:.1f}) | now {mf.mean():+.3f} ({(mf>0).float().mean()*100:.1f})", flush=True)
            for cls in ("subj", "other", "last", "mid"):
                mc = margin(pr, s, first, later, cls)
                print(f"   first + later at {cls:5s}: Δ vs right after {(mc - m1).mean():+.3f}  success {(mc>0).float().mean()*100:.1f}", flush=True)
    finally:
        for handle in handles:
            handle.remove()


if __name__ == "__main__":
    main()
