"""The locator's figure, three panels stacked:

1. the edit layer: the causal trace's MLP indirect effect at the last subject token per layer (the column ROME
   reads), the chosen layer in a darker colour;
2. the combined score per (module kind, layer) as a heatmap, the adapter's modules marked with their rank;
3. the top of the ranking as stacked bars: the weighted patching part and the weighted gradient part of each
   module's combined score, the adapter's modules in full colour.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from mechedit.locating import LocateResult


def plot_locate(result: "LocateResult") -> "go.Figure":
    """A plotly Figure: a ``Bar`` (edit layer), a ``Heatmap`` (combined scores), two stacked ``Bar`` s (ranking)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    trace = result.evidence.causal_trace
    numbers = result.edit_decision.numbers
    column = numbers["scores"]
    layers = list(range(len(column)))
    effects = [s - result.low_score for s in column]
    pos = numbers["position"]
    kinds = list(result.adapter_decision.numbers["kinds"])  # the architecture table's order
    top = result.ranking[:max(2 * len(result.adapter_modules), 10)]
    fig = make_subplots(rows=3, cols=1, vertical_spacing=0.1, row_heights=[0.3, 0.35, 0.35], subplot_titles=[
        f"Edit layer {result.edit_layer}: MLP indirect effect at the last subject token "
        f"{trace.tokens[pos]!r} (window {numbers['window']})",
        f"Combined score per module (numbers: the {len(result.adapter_modules)} adapter modules by rank)",
        "Top of the ranking: weighted patching + weighted gradient parts",
    ])

    fig.add_trace(go.Bar(
        x=layers, y=effects, name="MLP indirect effect", showlegend=False,
        marker_color=["#1b7837" if layer == result.edit_layer else "#a6dba0" for layer in layers],
        customdata=column, hovertemplate="layer %{x}<br>p = %{customdata:.4f}<br>indirect effect %{y:+.4f}"
                                         "<extra></extra>",
    ), row=1, col=1)
    fig.update_xaxes(title_text="centre of restored MLP layers", tickvals=layers, row=1, col=1)
    fig.update_yaxes(title_text="p − corrupted p", row=1, col=1)

    by_cell = {(r.kind, r.layer): r for r in result.ranking}
    chosen = {m: i + 1 for i, m in enumerate(result.adapter_modules)}
    z = [[by_cell[k, layer].combined for layer in layers] for k in kinds]
    text = [[str(chosen.get(by_cell[k, layer].module, "")) for layer in layers] for k in kinds]
    custom = [[[by_cell[k, layer].module, by_cell[k, layer].patch_effect, by_cell[k, layer].grad_norm]
               for layer in layers] for k in kinds]
    fig.add_trace(go.Heatmap(
        z=z, x=layers, y=kinds, text=text, texttemplate="%{text}", colorscale="Viridis", zmin=0, zmax=1,
        customdata=custom, name="combined", colorbar=dict(title=dict(text="combined"), len=0.3, y=0.5),
        hovertemplate="%{customdata[0]}<br>combined %{z:.3f}<br>patching effect %{customdata[1]:.4f}<br>"
                      "gradient norm %{customdata[2]:.4g}<extra></extra>",
    ), row=2, col=1)
    fig.update_xaxes(title_text="layer", tickvals=layers, row=2, col=1)
    fig.update_yaxes(autorange="reversed", row=2, col=1)  # kinds top-down in the table's order

    wp, wg = result.config.patch_weight, result.config.grad_weight
    names = [r.module for r in top]
    opacity = [1.0 if r.module in chosen else 0.4 for r in top]
    for label, part, colour in (("patching", [wp * r.patch_score / (wp + wg) for r in top], "#2166ac"),
                                ("gradient", [wg * r.grad_score / (wp + wg) for r in top], "#b2182b")):
        fig.add_trace(go.Bar(x=names, y=part, name=label, marker=dict(color=colour, opacity=opacity),
                             hovertemplate="%{x}<br>" + label + " part %{y:.3f}<extra></extra>"), row=3, col=1)
    fig.update_yaxes(title_text="combined score", row=3, col=1)
    fig.update_layout(
        barmode="stack", legend=dict(x=1.02, y=0.1, title=dict(text="combined score")),
        title=dict(text=f"Locate: {result.prompt!r} → {result.answer!r}<br><sup>clean p={result.high_score:.4g}, "
                        f"corrupted p={result.low_score:.4g}; edit module {result.edit_module}</sup>"),
        width=max(760, 60 * len(layers) + 260), height=1150, margin=dict(b=220),
    )
    return fig
