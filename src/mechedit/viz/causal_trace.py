"""ROME-style causal-trace heatmaps: one panel per kind, tokens down the side (subject tokens marked ``*``),
layers along the bottom, colour from the corrupted score (``low_score``) up to the panel's highest score."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from mechedit.tracing.causal import CausalTraceResult

_SPACING = 0.1  # gap between panels (paper fraction)

# kind -> (panel title, x-axis title, colour scale); ROME's wording and colours
_STYLE = {
    "hidden": ("Restoring the hidden state", "single restored layer", "Purples"),
    "mlp": ("Restoring MLP output", "centre of {w} restored MLP layers", "Greens"),
    "attn": ("Restoring attention output", "centre of {w} restored attention layers", "Reds"),
}


def token_labels(tokens: list[str], subject_range: tuple[int, int]) -> list[str]:
    """Token strings for an axis: whitespace made visible, subject tokens suffixed with ``*`` (as in ROME)."""
    start, end = subject_range
    return [repr(t)[1:-1] + ("*" if start <= i < end else "") for i, t in enumerate(tokens)]


def plot_causal_trace(result: "CausalTraceResult") -> "go.Figure":
    """A plotly Figure with one heatmap trace per traced kind."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    kinds = list(result.scores)
    labels = token_labels(result.tokens, result.subject_range)
    n_tokens = len(labels)
    # shared token axis: labels once, on the left panel; the gaps between panels hold the colour bars
    fig = make_subplots(rows=1, cols=len(kinds), subplot_titles=[_STYLE[k][0] for k in kinds],
                        shared_yaxes=True, horizontal_spacing=_SPACING if len(kinds) > 1 else 0.0)
    for i, kind in enumerate(kinds, start=1):
        _, x_title, colours = _STYLE[kind]
        s = result.scores[kind]  # (L, T)
        z = s.T.tolist()  # rows = tokens, columns = layers
        zmax = max(float(s.max()), result.low_score + 1e-9)
        fig.add_trace(go.Heatmap(
            z=z, x=list(range(s.shape[0])), y=list(range(n_tokens)), colorscale=colours,
            zmin=result.low_score, zmax=zmax, name=kind,
            customdata=[[lab] * s.shape[0] for lab in labels],
            hovertemplate="token %{customdata} (position %{y})<br>layer %{x}<br>p = %{z:.4f}<extra>" + kind
                          + "</extra>",
            colorbar=dict(title=dict(text=f"p({result.answer.strip()})", side="right"), thickness=14, len=0.9,
                          x=_colorbar_x(i, len(kinds))),
        ), row=1, col=i)
        fig.update_xaxes(title_text=x_title.format(w=result.config.window), row=1, col=i)
        # numeric y with tick text: repeated tokens (" the" twice) stay separate rows
        fig.update_yaxes(tickvals=list(range(n_tokens)), ticktext=labels, autorange="reversed", row=1, col=i)
    fig.update_layout(
        title=dict(text=f"Causal trace: {result.prompt!r} → {result.answer!r}  "
                        f"(clean p={result.high_score:.3f}, corrupted p={result.low_score:.3f})"),
        width=max(420, 380 * len(kinds)), height=max(320, 60 + 26 * n_tokens),
    )
    return fig


def _colorbar_x(col: int, n_cols: int) -> float:
    """x (paper coordinates) just right of subplot ``col`` of ``n_cols`` equal columns."""
    spacing = _SPACING if n_cols > 1 else 0.0
    width = (1 - spacing * (n_cols - 1)) / n_cols
    return col * width + (col - 1) * spacing + 0.01
