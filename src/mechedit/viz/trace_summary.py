"""ROME's averaged causal-trace picture (Meng et al. 2022, Figure 2): one heatmap per kind, token roles down the
side (first / middle / last subject token, first subsequent token, further tokens, last token), layers along
the bottom, colour the average indirect effect (0 = the corrupted run)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mechedit.viz.causal_trace import _STYLE

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from mechedit.tracing.summary import TraceSummary

_SPACING = 0.12  # gap between panels (paper fraction), room for each panel's colour bar


def plot_trace_summary(summary: "TraceSummary") -> "go.Figure":
    """A plotly Figure with one ``Heatmap`` per kind."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from mechedit.tracing.summary import ROLES

    kinds = list(summary.effects)
    labels = [f"{ROLES[r]} ({n})" for r, n in zip(summary.roles, summary.counts)]
    n = len(kinds)
    width = (1 - _SPACING * (n - 1)) / n
    fig = make_subplots(rows=1, cols=n, shared_yaxes=True, horizontal_spacing=_SPACING if n > 1 else 0.0,
                        subplot_titles=[_STYLE[k][0] for k in kinds])  # short: each fits over its panel
    for i, kind in enumerate(kinds, start=1):
        _, x_title, colours = _STYLE[kind]
        e = summary.effects[kind]  # (R, L)
        fig.add_trace(go.Heatmap(
            z=[[None if v != v else v for v in row] for row in e.tolist()], x=list(range(e.shape[1])),
            y=list(range(len(labels))), colorscale=colours, zmin=0.0,
            zmax=max(float(e.nan_to_num(nan=0.0).max()), 1e-9), name=kind,
            customdata=[[lab] * e.shape[1] for lab in labels],
            hovertemplate="%{customdata}<br>layer %{x}<br>average indirect effect %{z:.4f}<extra>" + kind
                          + "</extra>",
            colorbar=dict(title=dict(text="AIE", side="right"), thickness=12, len=0.9,
                          x=i * width + (i - 1) * _SPACING + 0.01),
        ), row=1, col=i)
        fig.update_xaxes(title_text=x_title.format(w=summary.window), row=1, col=i)
        fig.update_yaxes(tickvals=list(range(len(labels))), ticktext=labels, autorange="reversed", row=1, col=i)
    fig.update_layout(
        title=dict(text=f"Average indirect effect of restoring each state, over {summary.n_records} "
                        f"fact{'' if summary.n_records == 1 else 's'} ({summary.model_name})<br><sup>mean clean "
                        f"p={summary.high_score:.3f}, corrupted p={summary.low_score:.3f}; rows: token role "
                        "(records with it)</sup>"),
        width=max(520, 420 * n), height=400, margin=dict(t=110),  # room for the two-line title above the panels
    )
    return fig
