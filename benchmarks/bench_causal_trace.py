"""Benchmark: the batched causal trace against the one-cell-per-forward reference, and its peak memory.

Part 1, speed. The full grid (every kind, layer and token; ``--samples`` noise samples, ROME's 10 by default)
is traced by :func:`mechedit.tracing.causal_trace` (``--batch-size`` rows per forward) and by
:func:`mechedit.tracing.causal_trace_reference` (one forward per (cell, sample)), with the same noise; the
script prints both times, their ratio and the largest absolute difference of the scores. The batched trace
runs equal cells once (a window wider than the model restores every layer from several centres), so it may run
fewer distinct rows than the grid has; the reference runs every row.

On a large model the reference takes long (SmolLM2-135M: ~3 kinds × 30 layers × ~12 tokens × 10 samples ≈
11,000 forwards). ``--reference-cells N`` then times the reference's per-forward code on N cells chosen at random
(seeded) and extrapolates to the whole grid, and compares scores on those cells only; the output says so.
The subset runs the same code per forward as ``causal_trace_reference`` (noise on the subject embeddings, the
restored states written back, one row, the whole answer's probability); on a model where the full reference
also runs, the script checks the subset's scores against it.

Part 2, memory. For each batch size and each grid size (the grid grows with the number of noise samples), a
fresh subprocess loads the model, runs the clean prompt once, resets the peak resident set size (Linux:
``/proc/self/clear_refs``), traces, and reports the rise of the peak (``VmHWM``) over the resident size before the
trace; on CUDA, ``torch.cuda.max_memory_allocated`` above what was allocated before. Memory should grow with
the batch size and stay flat as the grid grows.

    python benchmarks/bench_causal_trace.py                                  # the embedded model
    python benchmarks/bench_causal_trace.py --model random-embedded-size     # a random Llama of its shape
    python benchmarks/bench_causal_trace.py --model path/to/hf_dir --prompt "..." --subject "..."
    python benchmarks/bench_causal_trace.py --model smollm2-135m --reference-cells 40 --memory-batch-sizes 16,64

Threads default to 1 (``--threads``): the figures are per core and do not depend on what else the machine runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_PROMPT = ("The Eiffel Tower is located in the city of", "The Eiffel Tower")
RANDOM_MODEL = "random-embedded-size"  # a random Llama shaped like the embedded model (its ToyModelConfig)


# -- the model and the fact --------------------------------------------------------------------------------------


def random_embedded_size(directory: Path) -> Path:
    """A random-weight Llama with the embedded model's shape and the toy world's tokenizer, saved to
    ``directory`` (weights do not matter for speed or memory)."""
    import mechedit
    from mechedit.toy.tokenizer import build_tokenizer
    from mechedit.toy.train import ToyModelConfig, make_model

    tok = build_tokenizer(mechedit.World.generate(0))
    make_model(ToyModelConfig(), len(tok), tok).eval().save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def the_fact(m, prompt: str | None, subject: str | None) -> tuple[str, str]:
    """The prompt and subject to trace: as given; else the embedded world's first fact when the model directory
    holds a world.json; else the Eiffel Tower."""
    if prompt is not None or subject is not None:
        if prompt is None or subject is None:
            raise SystemExit("pass both --prompt and --subject")
        return prompt, subject
    if m.path is not None and (m.path / "world.json").exists():
        from mechedit.toy.world import World

        world = World.load(m.path / "world.json")
        fact = world.facts[0]
        return world.relations[fact.relation]["train"][0].format(fact.subject), fact.subject
    return DEFAULT_PROMPT


def describe(m) -> str:
    return (f"{m.name} ({m.architecture}, {m.n_layers} layers, d_model {m.d_model}, {m.n_heads} heads / "
            f"{m.n_kv_heads} kv, vocabulary {m.d_vocab})")


def sync(m) -> None:
    if m.device.type == "cuda":
        torch.cuda.synchronize()


# -- the reference on a subset of cells ---------------------------------------------------------------------------


def reference_subset(m, prompt: str, subject: str, target: str, config, cells: list[tuple[str, int, int]]):
    """``causal_trace_reference``'s per-forward code on ``cells`` ((kind, layer, position) each) only.

    Returns (seconds for the cells' forwards, {cell: score}, forwards run)."""
    from mechedit.tracing.causal import _grid_hooks, _setup, kind_hook, reference_cell, window_layers
    from mechedit.tracing.common import clean_run

    p, _, noise = _setup(m, prompt, subject, target, config)
    _, clean = clean_run(m, p, _grid_hooks(m, config))

    def corrupted_prob(sample: int, restores: list[tuple[str, int]]) -> float:  # as in causal_trace_reference
        return reference_cell(m, p, noise[sample], clean, restores)

    scores = {}
    sync(m)
    t0 = time.perf_counter()
    for kind, layer, pos in cells:
        layers = [layer] if kind == "hidden" else window_layers(layer, config.window, m.n_layers)
        restores = [(kind_hook(kind, lyr), pos) for lyr in layers]
        scores[kind, layer, pos] = sum(corrupted_prob(s, restores) for s in range(config.samples)) / config.samples
    sync(m)
    return time.perf_counter() - t0, scores, len(cells) * config.samples


# -- part 1: speed -------------------------------------------------------------------------------------------------


def bench_speed(m, prompt: str, subject: str, config, reference_cells: int | None, seed: int) -> None:
    from mechedit.tracing import causal_trace, causal_trace_reference

    # warm-up (first forwards allocate; the answer is fixed once for both sides)
    warm = causal_trace(m, prompt, subject, None, config.__class__(**{**config.to_dict(), "samples": 1}))
    target = warm.answer
    sync(m)
    calls: list[tuple[int, int]] = []  # (rows done, rows to run) after each forward
    t0 = time.perf_counter()
    fast = causal_trace(m, prompt, subject, target, config, progress=lambda done, total: calls.append((done, total)))
    sync(m)
    fast_s = time.perf_counter() - t0
    n_layers, n_tokens = fast.n_layers, len(fast.tokens)
    grid = [(k, layer, pos) for k in config.kinds for layer in range(n_layers) for pos in range(n_tokens)]
    forwards = (1 + len(grid)) * config.samples  # the corrupted baseline is one more "cell"
    print(f"fact:    {prompt!r} -> {fast.answer!r}; subject {subject!r}, tokens {fast.subject_range[0]}.."
          f"{fast.subject_range[1] - 1} of {n_tokens}; clean p={fast.high_score:.4g}, corrupted p={fast.low_score:.4g}")
    print(f"grid:    {len(config.kinds)} kinds × {n_layers} layers × {n_tokens} tokens = {len(grid)} cells, "
          f"{config.samples} samples, window {config.window}: {forwards} (cell, sample) rows")
    print(f"batched: {fast_s:8.3f} s  ({config.batch_size} rows per forward, {len(calls) - 1} forwards over "
          f"{calls[-1][1]} distinct rows, plus one noised run; clean run and setup included)")

    if reference_cells is None or reference_cells >= len(grid):
        t0 = time.perf_counter()
        ref = causal_trace_reference(m, prompt, subject, target, config)
        sync(m)
        ref_s = time.perf_counter() - t0
        diff = max(float((fast.scores[k] - ref.scores[k]).abs().max()) for k in config.kinds)
        diff = max(diff, abs(fast.low_score - ref.low_score), abs(fast.high_score - ref.high_score))
        spread = max(float(fast.scores[k].max() - fast.scores[k].min()) for k in config.kinds)
        print(f"reference: {ref_s:8.3f} s  (one forward per row: {forwards} forwards, full grid)")
        print(f"speed-up:  {ref_s / fast_s:8.1f}×   max |score difference| {diff:.2e} (scores span {spread:.3g}, "
              f"low/high included)")
        # the subset code against the full reference, on a few cells: what --reference-cells relies on
        cells = random.Random(seed).sample(grid, min(8, len(grid)))
        _, sub, _ = reference_subset(m, prompt, subject, target, config, cells)
        check = max(abs(sub[c] - float(ref.scores[c[0]][c[1], c[2]])) for c in cells)
        print(f"check:     the --reference-cells code matches causal_trace_reference on {len(cells)} random cells "
              f"to {check:.1e}")
        return

    cells = random.Random(seed).sample(grid, reference_cells)
    sub_s, sub, sub_forwards = reference_subset(m, prompt, subject, target, config, cells)
    per_forward = sub_s / sub_forwards
    ref_s = per_forward * forwards
    diff = max(abs(sub[c] - float(fast.scores[c[0]][c[1], c[2]])) for c in cells)
    by_kind = {k: sum(1 for c in cells if c[0] == k) for k in config.kinds}
    print(f"reference: {ref_s:8.3f} s  EXTRAPOLATED: {sub_s:.3f} s for {reference_cells} random cells (seed {seed}; "
          + ", ".join(f"{n} {k}" for k, n in by_kind.items())
          + f") × {config.samples} samples = {sub_forwards} forwards, {per_forward * 1e3:.2f} ms each, "
          f"× {forwards} forwards of the full grid")
    print(f"speed-up:  {ref_s / fast_s:8.1f}×  (against the extrapolated reference)   max |score difference| "
          f"{diff:.2e} on the {reference_cells} cells")


# -- part 2: memory ------------------------------------------------------------------------------------------------


def _vm(field: str) -> int:
    """A /proc/self/status field in bytes (Linux)."""
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def memory_probe(model: str, device: str, prompt: str, subject: str, target: str, config_json: str) -> dict:
    """In this (fresh) process: the peak memory a causal trace adds, in bytes."""
    import mechedit
    from mechedit.tracing import CausalTraceConfig, causal_trace
    from mechedit.tracing.common import clean_run, prepare_prompt

    config = CausalTraceConfig.from_dict(json.loads(config_json))
    m = mechedit.load(model or None, device=device)  # "" = the embedded model
    clean_run(m, prepare_prompt(m, prompt, subject, target), [])  # warm: first forward's one-off allocations
    if m.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before, how = torch.cuda.memory_allocated(), "torch.cuda.max_memory_allocated"
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
        before, how = _vm("VmRSS"), "peak resident set (VmHWM) over resident before"
    t0 = time.perf_counter()
    causal_trace(m, prompt, subject, target, config)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if m.device.type == "cuda" else _vm("VmHWM")
    return {"added": peak - before, "how": how, "seconds": seconds}


def bench_memory(model_arg: str, device: str, threads: int, prompt: str, subject: str, target: str, config,
                 batch_sizes: list[int], samples: list[int], n_cells: int) -> None:
    if device == "cpu" and not Path("/proc/self/clear_refs").exists():
        print("memory: skipped (needs Linux /proc/self/clear_refs to reset the peak resident set)")
        return
    header = "".join(f"{f'S={s} ({(1 + n_cells) * s} rows)':>22}" for s in samples)
    print(f"\npeak memory added by the trace, MiB (one fresh process per cell of the table; threads {threads}):")
    print(f"{'batch size':>12}{header}")
    how = None
    for bs in batch_sizes:
        row = []
        for s in samples:
            cfg = json.dumps({**config.to_dict(), "batch_size": bs, "samples": s})
            cmd = [sys.executable, __file__, "--memory-probe", model_arg, device, prompt, subject, target, cfg]
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if out.returncode != 0:
                raise SystemExit(f"memory probe failed (batch {bs}, samples {s}):\n{out.stderr[-2000:]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            how = res["how"]
            row.append(f"{res['added'] / 2**20:12.1f} ({res['seconds']:5.1f} s)")
        print(f"{bs:>12}" + "".join(f"{c:>22}" for c in row))
    print(f"({how}; a row should stay flat as the grid grows, and grow with the batch size)")


# -- main ----------------------------------------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-probe":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        print(json.dumps(memory_probe(*sys.argv[2:8])))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model to load (default: the embedded model); "
                    f"'{RANDOM_MODEL}': a random Llama of the embedded model's shape")
    ap.add_argument("--prompt", default=None)
    ap.add_argument("--subject", default=None)
    ap.add_argument("--samples", type=int, default=10, help="noise samples (ROME: 10)")
    ap.add_argument("--window", type=int, default=10, help="MLP/attention window (ROME: 10)")
    ap.add_argument("--batch-size", type=int, default=256, help="rows per forward of the batched trace")
    ap.add_argument("--reference-cells", type=int, default=None,
                    help="time the reference on this many random cells and extrapolate (default: the full grid)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the noise and the choice of reference cells")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--memory-batch-sizes", default="16,64,256", help="comma-separated; '' skips part 2")
    ap.add_argument("--memory-samples", default="5,20", help="comma-separated noise-sample counts (grid sizes)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    import mechedit
    from mechedit.tracing import CausalTraceConfig
    from mechedit.tracing.common import prepare_prompt

    kind = torch.device(args.device).type
    where = torch.cuda.get_device_name() if kind == "cuda" else (platform.processor() or platform.machine())
    print(f"device:  {args.device} ({where}, {os.cpu_count()} CPUs); torch {torch.__version__}; "
          f"threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        model_arg = args.model
        if model_arg == RANDOM_MODEL:
            model_arg = str(random_embedded_size(Path(tmp) / RANDOM_MODEL))
        try:
            m = mechedit.load(model_arg, device=args.device)
        except mechedit.MecheditError as e:
            raise SystemExit(f"{e}\n(the embedded model may not be built yet: pass --model DIR or "
                             f"--model {RANDOM_MODEL})")
        print(f"model:   {describe(m)}" + (" [random weights]" if args.model == RANDOM_MODEL else ""))
        prompt, subject = the_fact(m, args.prompt, args.subject)
        config = CausalTraceConfig(samples=args.samples, window=args.window, batch_size=args.batch_size,
                                   seed=args.seed)
        bench_speed(m, prompt, subject, config, args.reference_cells, args.seed)
        if args.memory_batch_sizes.strip():
            target = prepare_prompt(m, prompt, subject).answer  # fixed for every probe
            n_cells = len(config.kinds) * m.n_layers * len(m.encode(prompt))
            bench_memory(model_arg or "", args.device, args.threads, prompt, subject, target, config,
                         [int(x) for x in args.memory_batch_sizes.split(",")],
                         [int(x) for x in args.memory_samples.split(",")], n_cells)


if __name__ == "__main__":
    main()
