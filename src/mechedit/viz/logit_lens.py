"""The logit-lens grid: depth up the side (embeddings at the bottom, the last block's output at the top),
prompt tokens along the bottom, the lens's top token written in each cell, the colour the probability of the
answer's first token; hovering shows the top token's probability and the answer's probability and rank."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mechedit.viz.causal_trace import token_labels

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from mechedit.tracing.lens import LogitLensResult


def depth_labels(n_depths: int) -> list[str]:
    """``embeddings``, then ``block 0``, ``block 1``, ... (the residual stream after that block)."""
    return ["embeddings"] + [f"block {d}" for d in range(n_depths - 1)]


def plot_logit_lens(result: "LogitLensResult") -> "go.Figure":
    """A plotly Figure with one ``Heatmap`` (depths × positions)."""
    import plotly.graph_objects as go

    n_depths, n_tokens = result.answer_token_prob.shape
    labels = token_labels(result.tokens, result.subject_range or (0, 0))
    rows = depth_labels(n_depths)
    text = [[repr(result.top_tokens[d][pos][0])[1:-1] for pos in range(n_tokens)] for d in range(n_depths)]
    custom = [[[float(result.top_probs[d, pos, 0]), int(result.answer_rank[d, pos]), labels[pos], rows[d]]
               for pos in range(n_tokens)] for d in range(n_depths)]
    answer = result.answer.strip() or repr(result.answer)
    fig = go.Figure(go.Heatmap(
        z=result.answer_token_prob.tolist(), x=list(range(n_tokens)), y=list(range(n_depths)), text=text,
        texttemplate="%{text}", textfont=dict(size=10), customdata=custom, colorscale="Blues", zmin=0.0,
        zmax=max(float(result.answer_token_prob.max()), 1e-9), name="logit lens",
        colorbar=dict(title=dict(text=f"p({answer})", side="right")),
        hovertemplate=("%{customdata[3]}, token %{customdata[2]} (position %{x})<br>"
                       "top token %{text} (p = %{customdata[0]:.4f})<br>"
                       f"answer {answer!r}: p = %{{z:.4f}}, rank %{{customdata[1]}}<extra></extra>"),
    ))
    fig.update_xaxes(tickvals=list(range(n_tokens)), ticktext=labels, title_text="token")
    fig.update_yaxes(tickvals=list(range(n_depths)), ticktext=rows, title_text="residual stream after")
    fig.update_layout(
        title=dict(text=f"Logit lens: {result.prompt!r} → {result.answer!r}"),
        width=max(480, 140 + 70 * n_tokens), height=max(320, 120 + 28 * n_depths),
    )
    return fig
