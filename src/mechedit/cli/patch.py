"""`mechedit patch`: activation patching between a clean and a corrupted run of one fact
(:func:`mechedit.tracing.patching.activation_patching`), a terminal summary of where the effect peaks, and
files in ``--out``."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from mechedit.cli import app
from mechedit.cli.info import ModelOpt
from mechedit.cli.trace import (
    OutOpt, PromptOpt, SubjectOpt, TargetOpt, comma_list, default_fact, progress_bar, write_result,
)
from mechedit.errors import InputError



@app.command()
def patch(
    model: ModelOpt = None,
    prompt: PromptOpt = None,
    subject: SubjectOpt = None,
    target: TargetOpt = None,
    corrupted_prompt: Annotated[Optional[str], typer.Option(
        help="The corrupted prompt: as many tokens as --prompt, differing in the detail that changes the answer "
             "(default: Gaussian noise on the subject's embeddings, as causal tracing).")] = None,
    components: Annotated[str, typer.Option(
        help="Comma-separated components: resid_pre, resid_mid, resid_post, attn_out, mlp_out (per layer and "
             "position); z, q, k, v, pattern (per head); z_by_pos ... pattern_by_pos (per head and position); "
             "mlp_pre, mlp_post (per neuron).")] = "resid_pre,attn_out,mlp_out,z",
    direction: Annotated[str, typer.Option(
        help="denoise: patch clean activations into the corrupted run (what is enough); noise: corrupted into "
             "the clean run (what is needed).")] = "denoise",
    metric: Annotated[str, typer.Option(help="logit_diff (answer minus foil), prob (p(answer)) or kl (to the "
                                        "clean run); scores are normalised so clean = 1, corrupted = 0.")
                      ] = "logit_diff",
    foil: Annotated[Optional[str], typer.Option(help="logit_diff's foil token (default: the corrupted run's most "
                                                "likely other token).")] = None,
    samples: Annotated[int, typer.Option(help="Noise samples averaged per entry (noise corruption only).")] = 10,
    noise: Annotated[Optional[float], typer.Option(help="Noise std; default 3x the std of subject "
                                                   "embeddings.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the noise.")] = 0,
    top_k: Annotated[int, typer.Option(help="Entries listed per component (and neuron bars).")] = 10,
    batch_size: Annotated[int, typer.Option(help="Patched runs per forward pass (memory is bounded by this).")
                          ] = 128,
    out: OutOpt = None,
) -> None:
    """Activation patching: copy one activation at a time between a clean and a corrupted run, and see which
    ones move the answer."""
    from mechedit.model import load
    from mechedit.tracing import patching as lib

    cfg = lib.PatchingConfig(components=comma_list(components), direction=direction, metric=metric,
                             batch_size=batch_size, top_k=top_k, samples=samples, noise=noise, seed=seed)
    m = load(model)
    if prompt is None and subject is None and corrupted_prompt is None:
        prompt, subject = default_fact(m)
    if prompt is None:
        raise InputError("pass --prompt (and --subject, or --corrupted-prompt)")
    if subject is None and corrupted_prompt is None:
        raise InputError("pass --subject (the words to corrupt with noise) or --corrupted-prompt")
    bar, progress = progress_bar("patching")
    with bar:
        result = lib.activation_patching(m, prompt, corrupted_prompt, subject=subject, target=target, foil=foil,
                                         components=cfg.components, config=cfg, progress=progress)
    print_patch_summary(result)
    if out is not None:
        write_result(result, out)


def print_patch_summary(result, n: int = 3) -> None:
    corrupted = repr(result.corrupted_prompt) if result.corrupted_prompt is not None else "noise on the subject"
    typer.echo(f"{result.clean_prompt!r} -> {result.answer!r}, corrupted: {corrupted}; {result.config.metric}: "
               f"clean {result.clean_metric:.4f}, corrupted {result.corrupted_metric:.4f} ({result.direction}; "
               "score 1 = clean, 0 = corrupted)")
    for name in result.scores:
        hits = result.top(name, n)
        if not hits:
            typer.echo(f"  {name:14s} no finite scores (clean and corrupted runs score the same)")
            continue
        where = ", ".join(f"{h.site}" + ("" if h.position is None else f" at {result.tokens[h.position]!r} "
                                               f"(position {h.position})") + f": {h.score:.3f}" for h in hits)
        typer.echo(f"  {name:14s} peaks at {where}")
