"""Attribution-patching figures: the estimates drawn like activation patching's maps, and the agreement of
estimates with exact patching (one scatter per component, the diagonal = perfect agreement)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from mechedit.tracing.attribution import AgreementReport, AttributionResult


def plot_attribution(result: "AttributionResult") -> "go.Figure":
    """The estimates as :func:`~mechedit.viz.patching.plot_patching` draws exact patching."""
    from mechedit.viz.patching import plot_patching

    return plot_patching(result, title="Attribution patching (first-order estimate)")


def plot_agreement(report: "AgreementReport") -> "go.Figure":
    """One scatter panel per component: attribution estimate (x) against exact patching (y), both normalised
    (1 = clean, 0 = corrupted), with the diagonal y = x; panel titles give Spearman's ρ and the top-k overlap."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    names = list(report.components)
    n_cols = min(3, len(names))
    n_rows = -(-len(names) // n_cols)
    titles = [f"{n}: ρ={a.spearman:.2f}, top-{a.k} overlap {a.top_k_overlap:.0%}"
              for n, a in report.components.items()]
    fig = make_subplots(rows=n_rows, cols=n_cols, subplot_titles=titles, horizontal_spacing=0.08,
                        vertical_spacing=0.12 if n_rows > 1 else 0.0)
    for i, name in enumerate(names):
        row, col = divmod(i, n_cols)
        x, y = report.estimate[name].tolist(), report.exact[name].tolist()
        finite = [v for v in x + y if math.isfinite(v)]
        lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
        fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line=dict(color="grey", dash="dot"),
                                 hoverinfo="skip", showlegend=False), row=row + 1, col=col + 1)
        fig.add_trace(go.Scatter(x=x, y=y, mode="markers", name=name, marker=dict(size=5, opacity=0.7),
                                 hovertemplate="estimate %{x:.4f}<br>exact %{y:.4f}<extra>" + name + "</extra>"),
                      row=row + 1, col=col + 1)
        fig.update_xaxes(title_text="attribution estimate", row=row + 1, col=col + 1)
        fig.update_yaxes(title_text="exact patching", row=row + 1, col=col + 1)
    fig.update_layout(title=dict(text=f"Attribution vs activation patching ({report.direction}, {report.metric})"),
                      width=max(420, 360 * n_cols), height=80 + 340 * n_rows, showlegend=False)
    return fig
