"""Benchmark: mechedit's batched activation patching against ``transformer_lens.patching`` on the same bridge.

For each component (residual stream by position, heads over all positions, heads by position) both compute the
same raw logit difference for every patched entry; the script prints both timings, their ratio and the largest
absolute difference (and the range of the values compared, to show they are not all alike), with the thread
count and device.

    python benchmarks/bench_patching.py                     # two random GQA Llamas (test-size, embedded-size)
    python benchmarks/bench_patching.py --model smollm2-135m --clean "The Eiffel Tower is located in the city of" \\
        --corrupted "The Colosseum is located in the city of" --components resid_pre,z
    python benchmarks/bench_patching.py --device cuda --threads 16

transformer_lens runs one forward per entry (its tqdm bar is silenced here: TQDM_DISABLE); mechedit puts
``--batch-size`` entries in each forward, its clean and corrupted runs included as two more rows of the first
forward. mechedit's time is end to end (its clean and corrupted runs and the model fingerprint included);
transformer_lens's excludes the clean-cache run it is handed. Each side is timed ``--repeat`` times, interleaved,
and the fastest kept; on a CPU with one thread the clock is the process's CPU time (``--clock``), which other
processes on a shared machine disturb far less than the wall clock.

What to expect. transformer_lens pays per entry one batch-1 forward: a fixed cost (Python, module calls, hooks)
plus one row's arithmetic. Batching removes the fixed cost; what remains is arithmetic. mechedit starts each
patched row at the layer it patches (on average half the layers) and unembeds only the answer position, so on a
CPU, where one row's arithmetic is a sizeable part of a batch-1 forward, the ratio is bounded by about
(batch-1 forward) / (half a row's arithmetic), less the one forward's fixed cost shared by few entries. The last
two columns measure this: "rows only" times the same forwards with the same rows and no patching, setup or
scoring, and "bound" is transformer_lens's time over it. Sweeps with few entries (``v``: n_layers ×
n_kv_heads) stay below 10× on a CPU thread for that reason. Where one row is cheap next to the fixed cost
(small models with many entries; any model on a GPU) the gain is large.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # transformer_lens.patching wraps its loop in tqdm

import torch

TL_FUNCTIONS = {  # our component -> (transformer_lens.patching function, permutation of its axes to ours)
    "resid_pre": ("get_act_patch_resid_pre", None),
    "attn_out": ("get_act_patch_attn_out", None),
    "mlp_out": ("get_act_patch_mlp_out", None),
    "z": ("get_act_patch_attn_head_out_all_pos", None),
    "k": ("get_act_patch_attn_head_k_all_pos", None),
    "v": ("get_act_patch_attn_head_v_all_pos", None),
    "pattern": ("get_act_patch_attn_head_pattern_all_pos", None),
    "z_by_pos": ("get_act_patch_attn_head_out_by_pos", (0, 2, 1)),  # TL (layer, pos, head) -> (layer, head, pos)
    "v_by_pos": ("get_act_patch_attn_head_v_by_pos", (0, 2, 1)),
    "pattern_by_pos": ("get_act_patch_attn_head_pattern_by_pos", None),
}
CLOCK = [time.perf_counter]  # set by --clock: wall time, or this process's CPU time
SUBJECT = "Voupeis Draexmir"
TEMPLATE = "{} was born in the city of"

# built-in random models (the weights do not matter for speed): name -> (description, LlamaConfig arguments)
BUILT_IN = {
    "tiny": ("random Llama as in the tests (3 layers, d_model 32, 4 query / 2 key-value heads)",
             dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3)),
    "embedded-size": ("random Llama of the embedded model's size (8 layers, d_model 128, d_mlp 512, 4 query / 2 "
                      "key-value heads)", dict(hidden_size=128, intermediate_size=512, num_hidden_layers=8)),
}


def built_in_model(name: str, directory: Path):
    """A random Llama with grouped-query attention and the toy world's tokenizer, saved to ``directory`` and
    loaded; plus a clean/corrupted prompt pair that aligns token for token."""
    import transformers as tf

    import mechedit
    from mechedit.toy.tokenizer import build_tokenizer

    world = mechedit.World.generate(0)
    tok = build_tokenizer(world)
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(tok), num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, **BUILT_IN[name][1])
    tf.LlamaForCausalLM(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    m = mechedit.load(directory)
    clean = TEMPLATE.format(SUBJECT)
    corrupted = next(TEMPLATE.format(s) for s in world.subjects
                     if s != SUBJECT and len(m.encode(TEMPLATE.format(s))) == len(m.encode(clean)))
    return m, clean, corrupted


def time_tl(m, component: str, clean: str, corrupted: str, answer: int, foil: int) -> tuple[float, torch.Tensor]:
    import transformer_lens.patching as tlp

    name, perm = TL_FUNCTIONS[component]
    clean_x = torch.tensor([m.encode(clean)], device=m.device)
    corrupted_x = torch.tensor([m.encode(corrupted)], device=m.device)

    def metric(logits):
        return logits[0, -1, answer] - logits[0, -1, foil]

    with torch.no_grad():
        _, cache = m.bridge.run_with_cache(clean_x)
        _sync(m.device)
        t0 = CLOCK[0]()
        out = getattr(tlp, name)(m.bridge, corrupted_x, cache, metric)
        _sync(m.device)
        seconds = CLOCK[0]() - t0
    out = out.permute(*perm) if perm else out
    return seconds, out.float().cpu()


def time_mechedit(m, component: str, clean: str, corrupted: str, batch_size: int):
    from mechedit.tracing import PatchingConfig, activation_patching

    _sync(m.device)
    t0 = CLOCK[0]()
    r = activation_patching(m, clean, corrupted, config=PatchingConfig(components=(component,), batch_size=batch_size))
    _sync(m.device)
    return CLOCK[0]() - t0, r


def time_rows_only(m, component: str, clean: str, corrupted: str, batch_size: int) -> float:
    """The forwards mechedit's engine runs for ``component`` with the same rows in them (the clean and corrupted
    reference rows, each patched row joining at its layer) but no patching, setup or scoring: what batching
    cannot remove. transformer_lens's time over this bounds the speed-up any engine of this kind can reach."""
    from mechedit.tracing import patching as P

    cfg = P.PatchingConfig(components=(component,), batch_size=batch_size)
    x = torch.tensor([m.encode(clean)], device=m.device)  # (1, T): the input without a target
    variants = P.blocks(m, P.check_components(m, cfg), cfg, x.shape[1])
    corrupted_rows = P.entry_states(m, torch.tensor([m.encode(corrupted)], device=m.device), None, None)
    first = P.Site(0, "resid_pre").hook_name
    _sync(m.device)
    t0 = CLOCK[0]()
    for chunk in P.plan_chunks(variants, batch_size):
        layers = torch.tensor([b.layer for b in variants for _ in b.index])[chunk.start: chunk.stop]
        entry, counts = layers.unique_consecutive(return_counts=True)
        fwd = [(first, P._reference_rows(corrupted_rows))]
        fwd += [(P.Site(layer, "resid_pre").hook_name, P._append_copies(1, n))
                for layer, n in zip(entry.tolist(), counts.tolist())]
        with torch.no_grad(), P.hooks(m, fwd):
            P.answer_logits(m, x, 1)
    _sync(m.device)
    return CLOCK[0]() - t0


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bench(m, what: str, clean: str, corrupted: str, components: list[str], batch_size: int, repeat: int) -> None:
    # warm-up (the first forwards allocate), and the answer and foil both sides score
    _, first = time_mechedit(m, components[0], clean, corrupted, batch_size)
    answer, foil = first.answer_ids[0], first.foil_id
    print(f"model:   {what}")
    print(f"prompts: {clean!r} vs {corrupted!r} ({len(first.tokens)} tokens); answer {first.answer!r}, "
          f"foil {first.foil!r}; metric: logit difference")
    print(f"{'component':<16}{'entries':>9}{'TL (s)':>10}{'mechedit (s)':>14}{'speed-up':>10}{'max |diff|':>12}"
          f"{'value range':>13}{'rows only (s)':>15}{'bound':>8}")
    tl_total = ours_total = 0.0
    for c in components:
        ours_s = tl_s = rows_s = float("inf")
        for _ in range(repeat):  # interleaved; the fastest of each (least disturbed by other processes)
            seconds, r = time_mechedit(m, c, clean, corrupted, batch_size)
            ours_s = min(ours_s, seconds)
            seconds, tl_out = time_tl(m, c, clean, corrupted, answer, foil)
            tl_s = min(tl_s, seconds)
            rows_s = min(rows_s, time_rows_only(m, c, clean, corrupted, batch_size))
        diff = float((r.values[c] - tl_out).abs().max())
        spread = float(r.values[c].max() - r.values[c].min())
        tl_total, ours_total = tl_total + tl_s, ours_total + ours_s
        print(f"{c:<16}{r.values[c].numel():>9}{tl_s:>10.3f}{ours_s:>14.3f}{tl_s / ours_s:>9.1f}×{diff:>12.2e}"
              f"{spread:>13.3f}{rows_s:>15.3f}{tl_s / rows_s:>7.1f}×")
    print(f"{'all':<16}{'':>9}{tl_total:>10.3f}{ours_total:>14.3f}{tl_total / ours_total:>9.1f}×")
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None,
                    help=f"model to load (default: the built-in random models {', '.join(BUILT_IN)})")
    ap.add_argument("--clean", default=None, help="clean prompt (with --model)")
    ap.add_argument("--corrupted", default=None, help="corrupted prompt with as many tokens as the clean one")
    ap.add_argument("--components", default="resid_pre,attn_out,z,v,z_by_pos,pattern_by_pos",
                    help=f"comma-separated, among {','.join(TL_FUNCTIONS)}")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=128, help="mechedit rows per forward")
    ap.add_argument("--repeat", type=int, default=3,
                    help="time each side this many times, interleaved, and keep the fastest (default 3): on a "
                         "shared CPU the fastest run is the one least slowed by other processes")
    ap.add_argument("--clock", choices=("wall", "cpu"), default=None,
                    help="what to time: 'wall' (elapsed time) or 'cpu' (this process's CPU time, which other "
                         "processes on a shared machine disturb far less; single-threaded CPU runs only). "
                         "Default: cpu for a CPU run with one thread, else wall")
    ap.add_argument("--built-in", default=",".join(BUILT_IN),
                    help=f"without --model: which built-in random models, comma-separated (default all: "
                         f"{','.join(BUILT_IN)})")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    components = [c.strip() for c in args.components.split(",") if c.strip()]
    unknown = [c for c in components if c not in TL_FUNCTIONS]
    if unknown:
        ap.error(f"unknown components {unknown}; choose among {list(TL_FUNCTIONS)}")
    if args.model is not None and (args.clean is None or args.corrupted is None):
        ap.error("--model needs --clean and --corrupted")
    kind = torch.device(args.device).type
    clock = args.clock or ("cpu" if kind == "cpu" and args.threads == 1 else "wall")
    if clock == "cpu" and (kind != "cpu" or args.threads != 1):
        ap.error("--clock cpu measures one thread's work on the CPU: use it with --device cpu --threads 1")
    CLOCK[0] = time.process_time if clock == "cpu" else time.perf_counter
    device = torch.cuda.get_device_name() if kind == "cuda" else (platform.processor() or platform.machine())
    print(f"device:  {args.device} ({device}); torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"mechedit batch size {args.batch_size}; fastest of {args.repeat} interleaved runs per side; "
          f"clock: {clock} time\n")

    import mechedit

    with tempfile.TemporaryDirectory() as tmp:
        names = [n.strip() for n in args.built_in.split(",") if n.strip()]
        if args.model is None and (not names or any(n not in BUILT_IN for n in names)):
            ap.error(f"--built-in takes names among {list(BUILT_IN)}, got {args.built_in!r}")
        runs = [(args.model, None)] if args.model is not None else [(None, name) for name in names]
        for model, name in runs:
            if name is not None:
                m, clean, corrupted = built_in_model(name, Path(tmp) / name)
                what = BUILT_IN[name][0]
            else:
                m, clean, corrupted = mechedit.load(model, device=args.device), args.clean, args.corrupted
                what = f"{model} ({m.architecture}, {m.n_layers} layers, {m.n_heads} heads / {m.n_kv_heads} kv)"
            if name is not None and kind != "cpu":
                m.hf_model.to(args.device)
            bench(m, what, clean, corrupted, components, args.batch_size, args.repeat)


if __name__ == "__main__":
    main()
