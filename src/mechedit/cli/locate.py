"""`mechedit locate`: the rank-one edit layer and the adapter modules for one fact
(:func:`mechedit.locating.locate`), a terminal summary of both decisions and why, and files in ``--out``."""

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
def locate(
    model: ModelOpt = None,
    prompt: PromptOpt = None,
    subject: SubjectOpt = None,
    target: TargetOpt = None,
    window: Annotated[Optional[int], typer.Option(
        help="MLP layers restored together in the causal trace (default: n_layers/5, at least 1).")] = None,
    samples: Annotated[int, typer.Option(help="Noise samples per traced or patched cell (ROME: 10).")] = 10,
    noise: Annotated[Optional[float], typer.Option(help="Noise std; default 3x the std of subject "
                                                   "embeddings.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the noise.")] = 0,
    adapter_size: Annotated[int, typer.Option(help="Modules chosen for the restricted adapter.")] = 10,
    adapter_kinds: Annotated[Optional[str], typer.Option(
        help="Comma-separated module kinds the adapter may use (attn_q, attn_k, attn_v or attn_qkv, attn_out, "
             "mlp_in0, mlp_in1, mlp_out; default: all the architecture has).")] = None,
    position: Annotated[str, typer.Option(
        help="Patching effect per layer: 'max' over the prompt's positions, or at the 'last_subject' token.")
                        ] = "max",
    patch_metric: Annotated[str, typer.Option(help="Patching metric: prob, logit_diff or kl.")] = "prob",
    patch_weight: Annotated[float, typer.Option(help="Weight of the normalised patching effect.")] = 0.5,
    grad_weight: Annotated[float, typer.Option(help="Weight of the normalised gradient norm.")] = 0.5,
    batch_size: Annotated[int, typer.Option(help="Rows per forward pass (memory is bounded by this).")] = 128,
    out: OutOpt = None,
) -> None:
    """Locate a fact: the layer for a rank-one edit (ROME's MLP peak at the last subject token) and the modules
    for a restricted adapter (patching effect and gradient norm combined), each with the evidence that chose it."""
    import mechedit.locating as lib
    from mechedit.model import load

    cfg = lib.LocateConfig(window=window, samples=samples, noise=noise, seed=seed, adapter_size=adapter_size,
                           adapter_kinds=None if adapter_kinds is None else comma_list(adapter_kinds),
                           position=position, patch_metric=patch_metric, patch_weight=patch_weight,
                           grad_weight=grad_weight, batch_size=batch_size)
    m = load(model)
    if prompt is None and subject is None:
        prompt, subject = default_fact(m)
    if prompt is None or subject is None:
        raise InputError("pass both --prompt and --subject")
    bar, progress = progress_bar("locating")
    with bar:
        result = lib.locate(m, prompt, subject, target, config=cfg, progress=progress)
    print_locate_summary(result)
    if out is not None:
        write_result(result, out)


def print_locate_summary(result) -> None:
    s0, s1 = result.subject_range
    typer.echo(f"{result.prompt!r} -> {result.answer!r}: clean p={result.high_score:.4f}, corrupted "
               f"p={result.low_score:.4f}; subject tokens {s0}..{s1 - 1} ({''.join(result.tokens[s0:s1])!r})")
    num = result.edit_decision.numbers
    typer.echo(f"edit layer {result.edit_layer} ({result.edit_module}): MLP restoration at the last subject token "
               f"{num['token']!r} peaks there, p={num['peak_score']:.4f} (indirect effect "
               f"{num['peak_indirect_effect']:+.4f}, window {num['window']})")
    typer.echo(f"adapter modules ({len(result.adapter_modules)}; combined = {result.config.patch_weight:g} · "
               f"patching + {result.config.grad_weight:g} · gradient, each normalised to [0, 1]):")
    for r in result.ranking[:len(result.adapter_modules)]:
        typer.echo(f"  {r.rank:3d}. {r.module:40s} combined {r.combined:.3f}  (patching {r.patch_effect:.3f} at "
                   f"{result.tokens[r.position]!r}, gradient norm {r.grad_norm:.4g})")
