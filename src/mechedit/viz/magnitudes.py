"""Activation-magnitude figures: per component, a heatmap of the fact prompt's norms (tokens down the side,
layers along the bottom) above bars of norm / baseline mean per layer, one bar per comparison ("last",
"subject_last"); hovering a bar shows the baseline mean, std and z-score."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mechedit.viz.causal_trace import token_labels

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from mechedit.tracing.magnitudes import MagnitudeResult

_SPACING = 0.08  # gap between columns (paper fraction)
_COLOURS = {"last": "#1f77b4", "subject_last": "#d62728"}


def plot_magnitudes(result: "MagnitudeResult") -> "go.Figure":
    """A plotly Figure: one ``Heatmap`` per component (top row) and one ``Bar`` per (component, comparison)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    comps = list(result.norms)
    n_cols = len(comps)
    layers = list(range(result.n_layers))
    labels = token_labels(result.tokens, result.subject_range or (0, 0))
    fig = make_subplots(rows=2, cols=n_cols, row_heights=[0.6, 0.4], vertical_spacing=0.12,
                        horizontal_spacing=_SPACING if n_cols > 1 else 0.0,
                        subplot_titles=[f"‖{c}‖ on the prompt" for c in comps]
                        + [f"{c}: norm / baseline mean" for c in comps])
    ratio, z = result.ratio, result.z_score
    for i, comp in enumerate(comps, start=1):
        n = result.norms[comp]  # (L, T)
        fig.add_trace(go.Heatmap(
            z=n.T.tolist(), x=layers, y=list(range(len(labels))), colorscale="Viridis", name=comp,
            customdata=[[lab] * len(layers) for lab in labels],
            hovertemplate="token %{customdata} (position %{y})<br>layer %{x}<br>‖·‖ = %{z:.4g}<extra>" + comp
                          + "</extra>",
            colorbar=dict(thickness=12, len=0.55, y=0.72, x=_colorbar_x(i, n_cols)),
        ), row=1, col=i)
        fig.update_yaxes(tickvals=list(range(len(labels))), ticktext=labels if i == 1 else None,
                         showticklabels=i == 1, autorange="reversed", row=1, col=i)
        fig.update_xaxes(title_text="layer", tickvals=layers, row=1, col=i)
        for j, (name, pos) in enumerate(zip(result.comparisons, result.positions)):
            mean, std = result.baseline_mean[comp][j], result.baseline_std[comp][j]
            fig.add_trace(go.Bar(
                x=layers, y=ratio[comp][j].tolist(), name=f"{name} ({labels[pos]})", legendgroup=name,
                showlegend=i == 1, marker_color=_COLOURS.get(name),
                customdata=[[float(mean[k]), float(std[k]), float(z[comp][j, k])] for k in layers],
                hovertemplate=(f"{comp}, {name} (position {pos})<br>layer %{{x}}<br>ratio %{{y:.3f}}<br>"
                               "baseline mean %{customdata[0]:.4g} ± %{customdata[1]:.3g}<br>"
                               "z = %{customdata[2]:.2f}<extra></extra>"),
            ), row=2, col=i)
        fig.add_hline(y=1.0, line_dash="dot", line_color="grey", row=2, col=i)
        fig.update_xaxes(title_text="layer", tickvals=layers, row=2, col=i)
    fig.update_layout(
        title=dict(text=f"Activation magnitudes: {result.prompt!r} vs {len(result.baseline_prompts)} baseline "
                        "prompts"),
        barmode="group", width=max(520, 330 * n_cols), height=max(480, 300 + 24 * len(labels)),
        legend=dict(orientation="h", y=-0.08),
    )
    return fig


def _colorbar_x(col: int, n_cols: int) -> float:
    """x (paper coordinates) just right of subplot ``col`` of ``n_cols`` equal columns."""
    spacing = _SPACING if n_cols > 1 else 0.0
    width = (1 - spacing * (n_cols - 1)) / n_cols
    return col * width + (col - 1) * spacing + 0.005
