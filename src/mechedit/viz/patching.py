"""Activation-patching figures: one panel per component, stacked.

- residual sites: position × layer heatmap (tokens down the side; tokens that differ between the clean and the
  corrupted input marked ``*``),
- heads at every position: head × layer heatmap,
- heads by position: position × (layer, head) heatmap,
- neurons: bars of the top-k neurons (by effect: highest score when denoising, lowest when noising).

All heatmaps share one diverging colour scale centred on 0 (the corrupted run); 1 is the clean run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from mechedit.tracing.patching import SiteScores


def token_labels(tokens: list[str], marked: list[int]) -> list[str]:
    """Token strings for an axis: whitespace made visible, ``marked`` positions suffixed with ``*``."""
    marked = set(marked)
    return [repr(t)[1:-1] + ("*" if i in marked else "") for i, t in enumerate(tokens)]


def plot_patching(result: "SiteScores", title: str | None = None) -> "go.Figure":
    """A plotly Figure with one panel per component of ``result`` (activation or attribution patching)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from mechedit.tracing.patching import COMPONENTS

    names = list(result.scores)
    labels = token_labels(result.tokens, result.differing)
    heights = [_panel_rows(result, n, len(labels)) for n in names]
    fig = make_subplots(rows=len(names), cols=1, row_heights=heights, vertical_spacing=min(0.08, 0.3 / len(names)),
                        subplot_titles=[_panel_title(n, COMPONENTS[n].axes) for n in names])
    for row, name in enumerate(names, start=1):
        axes, s = COMPONENTS[name].axes, result.scores[name]  # s (L, ...)
        n_layers = s.shape[0]
        if axes == ("neuron",):
            hits = result.top(name)
            fig.add_trace(go.Bar(x=[f"L{h.site.layer} N{h.site.neuron}" for h in hits], y=[h.score for h in hits],
                                 name=name, hovertext=[str(h.site) for h in hits],
                                 hovertemplate="%{hovertext}<br>score %{y:.4f}<extra></extra>"), row=row, col=1)
            fig.update_yaxes(title_text="score", row=row, col=1)
            continue
        if axes == ("position",):
            z, x, y, ytext = s.T, list(range(n_layers)), list(range(len(labels))), labels  # (T, L)
            fig.update_xaxes(title_text="layer", row=row, col=1)
        elif axes == ("head",):
            z, x = s.T, list(range(n_layers))  # (H, L)
            y, ytext = list(range(s.shape[1])), [f"head {h}" for h in range(s.shape[1])]
            fig.update_xaxes(title_text="layer", row=row, col=1)
        else:  # ("head", "position"): columns are (layer, head) pairs
            n_heads = s.shape[1]
            z = s.permute(2, 0, 1).reshape(s.shape[2], n_layers * n_heads)  # (T, L*H)
            x = [f"L{layer} H{h}" for layer in range(n_layers) for h in range(n_heads)]
            y, ytext = list(range(len(labels))), labels
        fig.add_trace(go.Heatmap(z=z.tolist(), x=x, y=y, coloraxis="coloraxis", name=name,
                                 hovertemplate="%{x} / %{y}<br>score %{z:.4f}<extra>" + name + "</extra>"),
                      row=row, col=1)
        fig.update_yaxes(tickvals=y, ticktext=ytext, autorange="reversed", row=row, col=1)
    what = "Activation patching" if title is None else title
    corrupted = repr(result.corrupted_prompt) if result.corrupted_prompt is not None else "noise on the subject"
    fig.update_layout(
        title=dict(text=f"{what} ({result.config.direction}, {result.config.metric}): {result.clean_prompt!r} → "
                        f"{result.answer!r}; corrupted: {corrupted}<br><sup>clean {result.clean_metric:.3f}, "
                        f"corrupted {result.corrupted_metric:.3f}; score 1 = clean, 0 = corrupted</sup>"),
        coloraxis=dict(colorscale="RdBu", reversescale=True, cmid=0.0, colorbar=dict(title=dict(text="score"))),
        height=max(360, 120 + sum(heights) * 22), width=900, showlegend=False,
    )
    return fig


def _panel_rows(result: "SiteScores", name: str, n_tokens: int) -> int:
    from mechedit.tracing.patching import COMPONENTS

    axes = COMPONENTS[name].axes
    if axes == ("neuron",):
        return 8
    return result.scores[name].shape[1] + 2 if axes == ("head",) else n_tokens + 2


def _panel_title(name: str, axes: tuple[str, ...]) -> str:
    what = {("position",): "position × layer", ("head",): "head × layer (all positions)",
            ("head", "position"): "position × (layer, head)", ("neuron",): "top neurons (all positions)"}[axes]
    return f"{name}: {what}"
