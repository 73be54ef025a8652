"""Plotly drawing of a circuit: the residual-stream DAG, bottom (input) to top (logits)."""

from __future__ import annotations

import numpy as np

from poisonmech.circuits.graph import parse_name, split_edge

_DASH = {None: "solid", "q": "dot", "k": "dash", "v": "solid"}
_KIND_COLOUR = {"input": "#555555", "head": "#4c72b0", "mlp": "#dd8452", "logits": "#555555"}


def node_positions(graph) -> dict[str, tuple[float, float]]:
    """x: head index (MLPs to the right, input and logits centred); y: position along the residual stream."""
    centre = (graph.n_heads - 1) / 2 + (0.5 if graph.has_mlp else 0.0)
    pos = {"input": (centre, 0.0), "logits": (centre, 2.0 * graph.n_layers + 1)}
    for layer in range(graph.n_layers):
        for h in range(graph.n_heads):
            pos[f"a{layer}.h{h}"] = (float(h), 2.0 * layer + 1)
        if graph.has_mlp:
            pos[f"m{layer}"] = (float(graph.n_heads) + 0.5, 2.0 * layer + 1.8)
    return pos


def plot_circuit(circuit, title: str | None = None, max_edges: int | None = 200):
    """Nodes of the graph (circuit nodes filled, others faint) and the circuit's edges.

    Edge colour: blue for positive scores (towards the clean behaviour), red for negative;
    width: |score| relative to the largest; dash: the head input (q dotted, k dashed, v and
    others solid). Hovering an edge's midpoint shows its name and score. At most
    ``max_edges`` edges (the highest |score|) are drawn.
    """
    import plotly.graph_objects as go

    graph = circuit.graph
    pos = node_positions(graph)
    edges = list(circuit.edges)
    scores = np.array([circuit.score(e) for e in edges]) if edges else np.zeros(0)
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
        fig.add_trace(go.Scatter(
            x=[x0, x1], y=[y0, y1], mode="lines", hoverinfo="skip", showlegend=False,
            line={"color": "#2b6cb0" if s >= 0 else "#c53030", "width": 0.5 + 5.5 * abs(s) / top,
                  "dash": _DASH[info.channel]}, opacity=0.8))
        mids_x.append((x0 + x1) / 2)
        mids_y.append((y0 + y1) / 2)
        mids_text.append(f"{e}<br>score {s:.4g}")
    fig.add_trace(go.Scatter(x=mids_x, y=mids_y, mode="markers", marker={"size": 6, "opacity": 0.0},
                             hovertext=mids_text, hoverinfo="text", showlegend=False))
    in_circuit = set(circuit.nodes)
    names = list(graph.nodes)
    fig.add_trace(go.Scatter(
        x=[pos[n][0] for n in names], y=[pos[n][1] for n in names], mode="markers+text", text=names,
        textposition="middle right", hoverinfo="text", showlegend=False,
        marker={"size": 18, "color": [_KIND_COLOUR[parse_name(n).kind] for n in names],
                "opacity": [1.0 if n in in_circuit else 0.2 for n in names], "line": {"width": 1, "color": "white"}}))
    fig.update_layout(template="plotly_white", title=title or f"circuit: {circuit!r}",
                      xaxis={"visible": False}, yaxis={"visible": False}, height=220 + 90 * graph.n_layers)
    return fig
