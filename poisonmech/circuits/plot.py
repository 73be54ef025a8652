"""Plotly drawing of a circuit: the residual-stream DAG, bottom (input) to top (logits)."""

from __future__ import annotations

import numpy as np

from poisonmech.circuits.graph import parse_name, split_edge

_DASH = {None: "solid", "q": "dot", "k": "dash", "v": "solid"}
_KIND_COLOUR = {"input": "#555555", "head": "#4c72b0", "mlp": "#dd8452", "logits": "#555555"}
_CHANNEL_DX = {None: 0.0, "q": -0.18, "k": 0.0, "v": 0.18}  # q / k / v edges end side by side at a head


def node_positions(graph) -> dict[str, tuple[float, float]]:
    """x: head index (MLPs to the right, input and logits centred); y: position along the residual stream
    (a layer's heads at ``2 layer + 1``, its MLP at ``2 layer + 2``, so edges into an MLP never cross its heads;
    in a parallel block the MLP sits beside the heads, at ``2 layer + 1``: it reads what they read). A
    key/value group of grouped-query attention (``a1.g0``, where its k / v edges end) sits at the middle
    of its heads."""
    centre = (graph.n_heads - 1) / 2 + (0.5 if graph.has_mlp else 0.0)
    pos = {"input": (centre, 0.0), "logits": (centre, 2.0 * graph.n_layers + 1)}
    r = graph.group_size
    for layer in range(graph.n_layers):
        for h in range(graph.n_heads):
            pos[f"a{layer}.h{h}"] = (float(h), 2.0 * layer + 1)
        if graph.grouped:
            for g in range(graph.kv_heads):
                pos[f"a{layer}.g{g}"] = (g * r + (r - 1) / 2, 2.0 * layer + 1)
        if graph.has_mlp:
            pos[f"m{layer}"] = (float(graph.n_heads) + 0.5, 2.0 * layer + (1 if graph.parallel else 2))
    return pos


def circuit_title(circuit, faithfulness=None) -> str:
    """``"backdoor circuit: 10 of 98 edges (eap-ig), faithfulness 0.95, complement 0.03 (patching)"``.

    Faithfulness from ``faithfulness`` (a :class:`~poisonmech.circuits.ablation.Faithfulness`), else
    from the circuit's ``info["faithfulness"]`` (:meth:`Circuit.with_faithfulness`); left out if neither.
    """
    text = f"{circuit.name}: {circuit.n_edges} of {circuit.graph.n_edges} edges"
    if circuit.label:
        text += f" ({circuit.method})"
    if faithfulness is not None:
        f = {"ablation": faithfulness.ablation, "circuit": faithfulness.circuit_faithfulness,
             "complement": faithfulness.complement_faithfulness}
    else:
        f = circuit.faithfulness_info
    if f:
        text += f", faithfulness {f['circuit']:.2f}, complement {f['complement']:.2f} ({f['ablation']} ablation)"
    return text


def plot_circuit(circuit, title: str | None = None, max_edges: int | None = 200, faithfulness=None):
    """Nodes of the graph (circuit nodes filled, others faint) and the circuit's edges.

    Edge colour: blue for positive scores (towards the clean behaviour), red for negative (grey
    for a circuit without scores); width: |score| relative to the largest; dash: the head input
    (q dotted, k dashed, v and others solid; they end left, centre and right of the head).
    Hovering an edge's midpoint shows its name and score. At most ``max_edges`` edges (the
    highest |score|) are drawn. Node labels are annotations on a white box, so they stay
    readable above the edges. Title: :func:`circuit_title`.
    """
    import plotly.graph_objects as go

    graph = circuit.graph
    pos = node_positions(graph)
    edges = list(circuit.edges)
    scored = circuit.has_scores
    scores = np.array([circuit.score(e) for e in edges]) if edges and scored else np.ones(len(edges))
    if max_edges is not None and len(edges) > max_edges:
        keep = np.argsort(-np.abs(scores), kind="stable")[:max_edges]
        edges, scores = [edges[i] for i in keep], scores[keep]
    top = float(np.abs(scores).max()) if len(scores) and np.abs(scores).max() > 0 else 1.0

    fig = go.Figure()
    mids_x, mids_y, mids_text = [], [], []
    for e, s in zip(edges, scores):
        src, dst = split_edge(e)
        info = parse_name(dst)
        (x0, y0), (x1, y1) = pos[src], pos[info.node]
        x1 += _CHANNEL_DX[info.channel]
        colour = ("#2b6cb0" if s >= 0 else "#c53030") if scored else "#718096"
        fig.add_trace(go.Scatter(
            x=[x0, x1], y=[y0, y1], mode="lines", hoverinfo="skip", showlegend=False,
            line={"color": colour, "width": 0.5 + 5.5 * abs(s) / top, "dash": _DASH[info.channel]}, opacity=0.7))
        mids_x.append((x0 + x1) / 2)
        mids_y.append((y0 + y1) / 2)
        mids_text.append(f"{e}<br>score {s:.4g}" if scored else e)
    fig.add_trace(go.Scatter(x=mids_x, y=mids_y, mode="markers", marker={"size": 6, "opacity": 0.0},
                             hovertext=mids_text, hoverinfo="text", showlegend=False))
    in_circuit = set(circuit.nodes)
    names = list(graph.nodes)
    fig.add_trace(go.Scatter(
        x=[pos[n][0] for n in names], y=[pos[n][1] for n in names], mode="markers", hovertext=names,
        hoverinfo="text", showlegend=False,
        marker={"size": 18, "color": [_KIND_COLOUR[parse_name(n).kind] for n in names],
                "opacity": [1.0 if n in in_circuit else 0.2 for n in names], "line": {"width": 1, "color": "white"}}))
    # annotations are drawn above every trace: the labels sit on top of the edges, beside their node
    for n in names:
        x, y = pos[n]
        fig.add_annotation(x=x, y=y, text=n, showarrow=False, xanchor="left", xshift=12, yshift=10,
                           font={"size": 11, "color": "#1a202c" if n in in_circuit else "#a0aec0"},
                           bgcolor="rgba(255,255,255,0.85)", borderpad=1)
    x_max = max(x for x, _ in pos.values())
    fig.update_layout(template="plotly_white", title=title or circuit_title(circuit, faithfulness),
                      xaxis={"visible": False, "range": [-0.6, x_max + 1.0]},
                      yaxis={"visible": False, "range": [-0.6, 2.0 * graph.n_layers + 1.6]},
                      height=260 + 110 * graph.n_layers, margin={"l": 20, "r": 20, "t": 60, "b": 20})
    return fig
