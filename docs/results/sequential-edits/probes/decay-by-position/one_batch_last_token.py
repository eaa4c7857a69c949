"""Where does a seq-memit batch move neighbour / edit prompts: through the subject side or the last token?"""
import sys, time, torch
sys.path.insert(0, "analyses")  # run from the repository root
torch.set_num_threads(2)
import mechedit
import counterfact_smollm2 as cf
from mechedit.data import read_counterfact
from mechedit.editing.sequential import SequentialHyperParams, sequential_memit
from mechedit.editing.training import answer_batch, answer_logprobs
from mechedit.editing.memit.memit_main import linear_weight_in_out

N = int(sys.argv[1]) if len(sys.argv) > 1 else 100
model = mechedit.load("smollm2-135m")
path = "../shared/data/counterfact.json"
allr = read_counterfact(path)
recs = cf.draw(allr, 1000, 0)[:N]
p, n_text = cf.statistics_file(allr, cf.draw(allr, 1000, 0), 0)
mh = dict(cf.HPARAMS["memit"]); mh.update(mom2_source=str(p), mom2_n_samples=n_text)
hp = SequentialHyperParams(memit=mh).with_overrides(["batch_size=100", "memit.mom2_update_weight=500"])
t = time.time()
h = sequential_memit(model, recs, hp)
print("edit s", time.time() - t, flush=True)
deltas = {}
for layer in hp.memit.layers:
    name = model.module_name(layer, "mlp_out") + ".weight"
    deltas[layer] = linear_weight_in_out(h.deltas[name].clone(), model.conv1d).double()
h.restore()

mode = {"m": "none"}
def make_hook(layer):
    def hook(mod, args, out):
        if mode["m"] == "none":
            return None
        x = args[0]
        add = (x.double() @ deltas[layer]).to(out.dtype)
        m = MASKS[mode["m"]].to(out.dtype).unsqueeze(-1)
        return out + add * m
    return hook
hs = [model.module(l, "mlp_out").register_forward_hook(make_hook(l)) for l in deltas]

def margins(pairs):  # pairs: (prompt, win, lose) -> (N,) mean-per-token nll(lose) - nll(win)
    out = {k: [] for k in ("none", "full", "rest", "last")}
    for i in range(0, len(pairs), 64):
        ch = pairs[i:i + 64]
        res = {}
        for which in ("win", "lose"):
            b = answer_batch(model, [c[0] for c in ch], [c[1] if which == "win" else c[2] for c in ch])
            lp = torch.tensor([len(model.encode(c[0])) for c in ch])
            T = b.input_ids.shape[1]
            pos = torch.arange(T).unsqueeze(0)
            global MASKS
            MASKS = {"full": torch.ones(len(ch), T), "last": (pos >= (lp - 1).unsqueeze(1)).float()}
            MASKS["rest"] = 1 - MASKS["last"]
            ntok = (b.labels[:, 1:] != -100).sum(1).clamp_min(1)
            for k in out:
                mode["m"] = k
                with torch.no_grad():
                    res[(which, k)] = (-answer_logprobs(model.hf_model, b) / ntok).double()
            mode["m"] = "none"
        for k in out:
            out[k].append(res[("lose", k)] - res[("win", k)])
    return {k: torch.cat(v) for k, v in out.items()}

groups = {
    "edit (new>true)": [(r.prompt, r.target_new, r.target_true) for r in recs],
    "paraphrase (new>true)": [(pp, r.target_new, r.target_true) for r in recs for pp in r.paraphrases],
    "neighbour (true>new)": [(pp, a, r.target_new) for r in recs for pp, a in r.neighborhood if a.strip() != r.target_new.strip()],
}
later = cf.draw(allr, 1000, 0)[N:N + 300]
groups["unedited facts (true>new_j)"] = [(r.prompt, r.target_true, r.target_new) for r in later]
for g, pairs in groups.items():
    m = margins(pairs)
    base = m["none"]
    line = f"{g:32s} n={len(pairs):4d} base {base.mean():+.3f} success {(base>0).float().mean()*100:5.1f}"
    for k in ("full", "rest", "last"):
        d = m[k] - base
        line += f" | {k}: Δ {d.mean():+.3f} success {(m[k]>0).float().mean()*100:5.1f}"
    print(line, flush=True)
