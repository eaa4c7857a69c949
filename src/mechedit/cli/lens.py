"""`mechedit lens`: the logit lens on one prompt (:func:`mechedit.tracing.lens.logit_lens`), a terminal
summary of the depth where the answer emerges, and files in ``--out``."""

from __future__ import annotations

from typing import Annotated

import typer

from mechedit.cli import app
from mechedit.cli.info import ModelOpt
from mechedit.cli.trace import OutOpt, PromptOpt, SubjectOpt, TargetOpt, default_fact, write_result
from mechedit.errors import InputError


@app.command()
def lens(
    model: ModelOpt = None,
    prompt: PromptOpt = None,
    subject: SubjectOpt = None,
    target: TargetOpt = None,
    top_k: Annotated[int, typer.Option(help="Most probable tokens kept per depth and position.")] = 5,
    out: OutOpt = None,
) -> None:
    """Logit lens: decode the residual stream after every layer through the final norm and unembedding, and
    see at which depth the answer appears."""
    from mechedit.model import load
    from mechedit.tracing import lens as lib

    m = load(model)
    if prompt is None and subject is None:
        prompt, subject = default_fact(m)
    if prompt is None:
        raise InputError("pass --prompt (--subject is optional: it marks the subject's tokens)")
    result = lib.logit_lens(m, prompt, target, top_k, subject=subject)
    print_lens_summary(result)
    if out is not None:
        write_result(result, out)


def print_lens_summary(result) -> None:
    from mechedit.viz.logit_lens import depth_labels

    rows = depth_labels(result.n_depths)
    depth = result.emergence()
    when = f"first the top token at depth {depth} ({rows[depth]})" if depth is not None else "never the top token"
    typer.echo(f"{result.prompt!r} -> {result.answer!r}: at the last token the answer is {when}; "
               f"p(answer) at the last depth {float(result.answer_prob[-1]):.4f}")
    typer.echo(f"  {'depth':>12s}  {'top token (p)':24s} {'p(answer)':>10s} {'rank':>6s}")
    for d in range(result.n_depths):
        top = f"{result.top_tokens[d][-1][0]!r} ({float(result.top_probs[d, -1, 0]):.3f})"
        typer.echo(f"  {rows[d]:>12s}  {top:24s} {float(result.answer_token_prob[d, -1]):10.4f} "
                   f"{int(result.answer_rank[d, -1]):6d}")
