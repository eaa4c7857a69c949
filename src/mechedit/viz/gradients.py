"""Gradient-norm figures: bars per module (layers along the bottom, one bar per module kind) above heatmaps of
the activation-gradient norms, one per residual component (tokens down the side, layers along the bottom)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mechedit.viz.causal_trace import token_labels

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from mechedit.tracing.gradients import GradientNormResult


def plot_gradient_norms(result: "GradientNormResult") -> "go.Figure":
    """A plotly Figure: one ``Bar`` trace per module kind (top), one ``Heatmap`` per site component (below)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    kinds, comps = list(result.modules), list(result.sites)
    n_layers = result.n_layers
    layers = list(range(n_layers))
    labels = token_labels(result.tokens, result.subject_range or (0, 0))
    n_cols = max(1, len(comps))
    specs = [[{"colspan": n_cols}] + [None] * (n_cols - 1)]
    titles = ["‖∂ log p / ∂ module parameters‖"]
    if comps:
        specs.append([{} for _ in comps])
        titles += [f"‖∂ log p / ∂ {c}‖" for c in comps]
    fig = make_subplots(rows=len(specs), cols=n_cols, specs=specs, subplot_titles=titles,
                        row_heights=[0.4, 0.6] if comps else None, vertical_spacing=0.12,
                        horizontal_spacing=0.04 if len(comps) > 1 else 0.0)
    for kind in kinds:
        fig.add_trace(go.Bar(
            x=layers, y=result.modules[kind].tolist(), name=kind, customdata=result.module_names[kind],
            hovertemplate="layer %{x}<br>%{customdata}<br>norm = %{y:.4g}<extra>" + kind + "</extra>",
        ), row=1, col=1)
    fig.update_xaxes(title_text="layer", tickvals=layers, row=1, col=1)
    fig.update_yaxes(title_text="gradient norm", row=1, col=1)
    for i, comp in enumerate(comps, start=1):
        g = result.sites[comp]  # (L, T)
        fig.add_trace(go.Heatmap(
            z=g.T.tolist(), x=layers, y=list(range(len(labels))), coloraxis="coloraxis", name=comp,
            customdata=[[lab] * n_layers for lab in labels],
            hovertemplate="token %{customdata} (position %{y})<br>layer %{x}<br>norm = %{z:.4g}<extra>" + comp
                          + "</extra>",
        ), row=2, col=i)
        fig.update_xaxes(title_text="layer", tickvals=layers, row=2, col=i)
        fig.update_yaxes(tickvals=list(range(len(labels))), ticktext=labels if i == 1 else None,
                         showticklabels=i == 1, autorange="reversed", row=2, col=i)
    fig.update_layout(
        title=dict(text=f"Gradient norms of log p({result.answer!r}) for {result.prompt!r}  "
                        f"(log p = {result.log_prob:.3f})"),
        barmode="group", coloraxis=dict(colorscale="Blues", colorbar=dict(title=dict(text="norm"))),
        width=max(600, 260 * n_cols), height=360 + (40 + 22 * len(labels) if comps else 0),
    )
    return fig
