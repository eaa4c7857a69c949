"""The edit-layer sweep on one layer axis: the MLP causal-trace effect per layer (top) and ROME's three rewrite
scores when the edit is made at each layer (bottom; success solid, magnitude dotted), with the trace peak (what
``layer="auto"`` edits) and the best edit layer marked on both panels (Hase et al. 2023: they need not agree)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from mechedit.editing.sweep import LayerSweepResult

_SCORES = (("efficacy", "Efficacy", "#1f77b4"), ("paraphrase", "Paraphrase", "#2ca02c"),
           ("neighborhood", "Neighbourhood", "#d62728"))
_TRACE_COLOUR = "#3f8f3f"  # the causal-trace figure's MLP green


def plot_layer_sweep(result: LayerSweepResult) -> go.Figure:
    """A plotly Figure with two rows sharing the layer axis."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    info = result.trace_info
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.1, row_heights=[0.4, 0.6],
                        subplot_titles=[(f"Causal trace: restoring MLP output ({info.get('window')} layers) at "
                                         f"{info.get('token', '')!r}"), "ROME edit at each layer: rewrite scores"])
    layers = list(range(result.n_layers))
    fig.add_trace(go.Bar(x=layers, y=result.trace_effects, name="trace effect", marker_color=_TRACE_COLOUR,
                         customdata=result.trace_scores,
                         hovertemplate="layer %{x}<br>indirect effect %{y:.4f}<br>p(answer) %{customdata:.4f}"
                                       "<extra></extra>"), row=1, col=1)
    for key, label, colour in _SCORES:
        for part, dash in (("success", "solid"), ("magnitude", "dot")):
            ys = [row[f"{key}_{part}"] for row in result.rows]
            if all(y is None for y in ys):
                continue
            fig.add_trace(go.Scatter(x=result.layers, y=ys, mode="lines+markers", name=f"{label} {part}",
                                     legendgroup=key, line=dict(color=colour, dash=dash), connectgaps=False,
                                     hovertemplate=f"layer %{{x}}<br>{label.lower()} {part} %{{y:.4f}}<extra></extra>"),
                          row=2, col=1)
    refused = [layer for layer, row in zip(result.layers, result.rows) if row["error"] is not None]
    if refused:
        fig.add_trace(go.Scatter(x=refused, y=[0.0] * len(refused), mode="markers", name="edit refused",
                                 marker=dict(symbol="x", size=10, color="black"),
                                 hovertext=[row["error"] for row in result.rows if row["error"] is not None],
                                 hoverinfo="text"), row=2, col=1)
    best = result.best_layer
    marks = [(result.trace_peak, f"trace peak (layer {result.trace_peak})", "#3f8f3f", "dash")]
    if best is not None:
        marks.append((best, f"best edit (layer {best})", "#444444", "dot"))
    for layer, text, colour, dash in marks:
        for r in (1, 2):
            fig.add_vline(x=layer, line=dict(color=colour, dash=dash, width=2), row=r, col=1)
        fig.add_annotation(x=layer, y=1.0, yref="y domain", text=text, showarrow=False, yanchor="bottom",
                           font=dict(color=colour), row=1, col=1)
    fig.update_yaxes(title_text="p(answer) − corrupted", row=1, col=1)
    fig.update_yaxes(title_text="score", range=[-1.05, 1.05], row=2, col=1)
    fig.update_xaxes(title_text="layer", tickmode="linear", dtick=1, row=2, col=1)
    req = result.request
    prompt = req["template"].replace("{}", req["subject"])
    fig.update_layout(
        title=dict(text=f"Where to edit: {prompt!r} → {req['target_new']!r} ({result.model_name})<br><sup>trace: "
                        f"clean p={result.trace_high:.3f}, corrupted p={result.trace_low:.3f}; scores: success "
                        f"(solid), magnitude (dotted)</sup>"),
        width=760, height=620, legend=dict(groupclick="togglegroup"), bargap=0.2,
    )
    return fig
