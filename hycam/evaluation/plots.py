"""The figures of the paper's analysis of a trained model, as PNG files (training's loss curves are
`loss_curves`').

Three figures: the modulation weights A_fusion of one layer for one prompt; expert utilisation per
task and layer; a t-SNE of attention outputs with and without CAM. Each has a function that
measures (a forward pass with hooks that live only inside it), one that draws the figure and one
that saves it. Drawing uses matplotlib's `Figure` on an Agg canvas, never pyplot, so importing
this module changes no global backend.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from hycam.data import collate
from hycam.inject import decoder_layers


# ---- modulation weights ---------------------------------------------------------------------------

def _hycam_of(model: nn.Module, layer: int) -> nn.Module:
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer {layer} is out of range: the model has {len(layers)} decoder layers")
    modules = getattr(layers[layer].self_attn, "hycam_modules", None)
    if modules is None:
        raise ValueError(f"decoder layer {layer} has no HyCAM module (not a HyCAM checkpoint, or not in its layers)")
    cam = modules.active_module()  # the adapter the model applies (peft: one of several)
    return cam


@torch.no_grad()
def modulation_weights(model: nn.Module, input_ids: torch.Tensor, layer: int) -> torch.Tensor:
    """A_fusion of decoder layer `layer` for one prompt `(1, L)`: a `(L, d)` float32 tensor."""
    captured: list[torch.Tensor] = []
    handle = _hycam_of(model, layer).register_forward_hook(lambda _m, _i, out: captured.append(out[0]))  # A_fusion
    try:
        model(input_ids=input_ids.to(next(model.parameters()).device))
    finally:
        handle.remove()
    return captured[0][0].float().cpu()  # (L, d)


def plot_modulation(weights: torch.Tensor, tokens: Sequence[str], path: str | Path, layer: int,
                    max_dims: int | None = None) -> Path:
    """Heat map tokens x hidden dims of A_fusion, centred on 0 (amplified red, attenuated blue).

    `max_dims` keeps the dims of largest mean |A| (the most modulated), in their original order.
    """
    return save_figure(modulation_figure(weights, tokens, layer, max_dims), path)


def modulation_figure(weights: torch.Tensor, tokens: Sequence[str], layer: int, max_dims: int | None = None) -> Figure:
    values = weights.numpy()
    dims = np.arange(values.shape[1])
    if max_dims is not None and max_dims < len(dims):
        dims = np.sort(np.argsort(-np.abs(values).mean(0), kind="stable")[:max_dims])
    shown = values[:, dims]
    limit = float(np.abs(shown).max()) or 1.0
    fig = Figure(figsize=(min(3 + 0.05 * len(dims), 16), 1.5 + 0.22 * len(tokens)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(shown, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
    every = max(1, math.ceil(len(tokens) / 60))
    ax.set_yticks(range(0, len(tokens), every), [repr(t)[1:-1] for t in tokens][::every], fontsize=7)
    ax.set(xlabel="hidden dim" if max_dims is None else f"hidden dim (top {len(dims)} by mean |A|, index order)",
           title=f"A_fusion of layer {layer}")
    fig.colorbar(image, ax=ax, label="modulation weight")
    return fig


# ---- expert utilisation ---------------------------------------------------------------------------

def _batches(examples: Sequence[dict], batch_size: int, pad_token_id: int):
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], pad_token_id)
        yield batch["input_ids"], batch["attention_mask"]


@torch.no_grad()
def expert_utilisation(model: nn.Module, examples_by_task: dict[str, Sequence[dict]], pad_token_id: int,
                       batch_size: int = 8) -> dict[str, dict]:
    """Per task and HyCAM layer, over every non-padding token of the examples:
    `token_share[l][k]` (share of tokens whose argmax expert is k), `mean_gate[l][k]` (mean routing
    probability p_k) and `entropy[l]` (mean routing entropy, nats; log N_s is uniform)."""
    device = next(model.parameters()).device
    stats = {}
    for task, examples in examples_by_task.items():
        sums: dict[str, torch.Tensor] = {}
        tokens = 0
        for ids, mask in _batches(examples, batch_size, pad_token_id):
            ask = {"output_hycam_routing": True} if getattr(model, "hycam_config", None) else {}
            probs = model(input_ids=ids.to(device), attention_mask=mask.to(device), **ask).get("hycam_router_probs")
            if probs is None:
                raise ValueError("the model has no routers: expert utilisation needs HyCAM with num_specialized > 0")
            probs = probs.double()[:, mask.to(device).bool()]  # (layers, tokens, N_s)
            batch = {"token_share": F.one_hot(probs.argmax(-1), probs.size(-1)).sum(1),  # (layers, N_s)
                     "mean_gate": probs.sum(1),  # (layers, N_s)
                     "entropy": -torch.special.xlogy(probs, probs).sum(-1).sum(1)}  # (layers,)
            sums = {name: sums.get(name, 0) + value for name, value in batch.items()}
            tokens += probs.size(1)
        stats[task] = {"tokens": tokens, **{name: (value / tokens).tolist() for name, value in sums.items()}}
    return stats


def _js_bits(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence in bits (0: the same distribution, 1: disjoint) along the last axis."""
    m = (p + q) / 2

    def kl(a: np.ndarray) -> np.ndarray:
        return np.where(a > 0, a * np.log2(np.where(a > 0, a, 1) / np.where(m > 0, m, 1)), 0).sum(-1)

    return (kl(p) + kl(q)) / 2


def routing_divergence(stats: dict[str, dict]) -> dict[str, list[float]]:
    """Per layer, how differently the tasks route: the mean over task pairs of the Jensen-Shannon
    divergence between their mean-gate distributions (`between_tasks`), and each task's divergence from
    the token-weighted routing of all tasks (`from_all[task]`), in bits."""
    tasks = list(stats)
    gates = {t: np.array(stats[t]["mean_gate"]) for t in tasks}  # (layers, N_s)
    weights = np.array([stats[t]["tokens"] for t in tasks], dtype=np.float64)
    overall = sum(w * gates[t] for w, t in zip(weights, tasks)) / weights.sum()
    pairs = [(a, b) for i, a in enumerate(tasks) for b in tasks[i + 1:]]
    between = np.mean([_js_bits(gates[a], gates[b]) for a, b in pairs], axis=0) if pairs else overall[:, 0] * 0
    return {"between_tasks": between.tolist(), "from_all": {t: _js_bits(gates[t], overall).tolist() for t in tasks}}


def _layer_ticks(ax, labels: Sequence, most: int) -> None:
    """At most `most` layer labels on the x axis, so that they never overlap."""
    positions = list(range(0, len(labels), max(1, math.ceil(len(labels) / most))))
    ax.set_xticks(positions, [str(labels[i]) for i in positions])


def plot_expert_utilisation(stats: dict[str, dict], path: str | Path, layers: Sequence[int] | None = None) -> Path:
    """`expert_figure` as a PNG file."""
    return save_figure(expert_figure(stats, layers), path)


def expert_figure(stats: dict[str, dict], layers: Sequence[int] | None = None) -> Figure:
    """How routing differs between tasks. Top: per layer, the Jensen-Shannon divergence between tasks'
    mean-gate distributions (mean over pairs) and of each task from all tasks' routing. Below, one map per
    task: its mean gate minus all tasks' mean gate (layer x expert), on one colour scale centred on 0."""
    divergence, tasks = routing_divergence(stats), list(stats)
    gates = {t: np.array(stats[t]["mean_gate"]) for t in tasks}
    weights = np.array([stats[t]["tokens"] for t in tasks], dtype=np.float64)
    overall = sum(w * gates[t] for w, t in zip(weights, tasks)) / weights.sum()
    labels = list(layers) if layers is not None else list(range(overall.shape[0]))
    fig = Figure(figsize=(max(10, 2.6 * len(tasks)), 7.5), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1, 1.1])
    ax = top.subplots()
    ax.plot(range(len(labels)), divergence["between_tasks"], marker="o", color="black", label="between tasks (mean)")
    for task in tasks:
        ax.plot(range(len(labels)), divergence["from_all"][task], linewidth=1, alpha=0.8, label=f"{task} vs all")
    ax.set(title="routing divergence per layer (Jensen-Shannon, bits)", xlabel="layer", ylabel="JS (bits)")
    _layer_ticks(ax, labels, 16)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    limit = max(float(np.abs(gates[t] - overall).max()) for t in tasks) or 1.0
    axes = np.atleast_1d(bottom.subplots(1, len(tasks), sharey=True))
    for ax, task in zip(axes, tasks):
        image = ax.imshow((gates[task] - overall).T, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit,
                          interpolation="nearest")
        ax.set(title=f"{task} ({stats[task]['tokens']:,} tokens)", xlabel="layer", yticks=range(overall.shape[1]))
        _layer_ticks(ax, labels, 6)
    axes[0].set_ylabel("expert")
    bottom.colorbar(image, ax=list(axes), label="mean gate minus all tasks' mean gate")
    return fig


# ---- t-SNE of attention outputs -------------------------------------------------------------------

@torch.no_grad()
def pooled_attention_outputs(model: nn.Module, examples: Sequence[dict], layer: int, pad_token_id: int,
                             batch_size: int = 8) -> np.ndarray:
    """Mean over non-padding tokens of decoder layer `layer`'s attention output, one row a sample.

    The hook is added after HyCAM's, so with HyCAM in the model it sees h_out; without, h_att.
    """
    attention = decoder_layers(model)[layer].self_attn
    device = next(model.parameters()).device
    captured: list[torch.Tensor] = []
    handle = attention.register_forward_hook(
        lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out))
    rows = []
    try:
        for ids, mask in _batches(examples, batch_size, pad_token_id):
            captured.clear()
            model(input_ids=ids.to(device), attention_mask=mask.to(device))
            weight = mask.to(device).unsqueeze(-1).float()  # (B, L, 1)
            rows.append((captured[0].float() * weight).sum(1) / weight.sum(1))  # (B, d)
    finally:
        handle.remove()
    return torch.cat(rows).cpu().numpy()


def plot_tsne(panels: dict[str, np.ndarray], tasks: Sequence[str], path: str | Path,
              seed: int = 0) -> dict[str, float | None]:
    """`tsne_figure` as a PNG file; returns its silhouette scores."""
    fig, scores = tsne_figure(panels, tasks, seed)
    save_figure(fig, path)
    return scores


def tsne_figure(panels: dict[str, np.ndarray], tasks: Sequence[str], seed: int = 0) -> tuple[Figure, dict]:
    """One t-SNE panel per feature set, points coloured by task, and each set's silhouette score by task
    (on the features themselves, cosine; higher = tighter task clusters), None if undefined."""
    from sklearn.manifold import TSNE
    from sklearn.metrics import silhouette_score

    names = sorted(set(tasks))
    labels = np.array([names.index(t) for t in tasks])
    fig = Figure(figsize=(5.5 * len(panels), 5), layout="constrained")
    scores: dict[str, float | None] = {}
    for ax, (title, features) in zip(np.atleast_1d(fig.subplots(1, len(panels))), panels.items()):
        perplexity = min(30.0, max(1.0, (len(features) - 1) / 3))
        points = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)
        defined = 1 < len(names) < len(features)
        scores[title] = float(silhouette_score(features, labels, metric="cosine")) if defined else None
        for index, name in enumerate(names):
            ax.scatter(*points[labels == index].T, s=12, label=name)
        score = "n/a" if scores[title] is None else f"{scores[title]:.3f}"
        ax.set(title=f"{title} (silhouette {score})", xticks=[], yticks=[])
        ax.legend(fontsize="small", markerscale=1.5)
    return fig, scores


DPI = 120
"""Dots per inch of every saved figure."""


def save_figure(fig: Figure, path: str | Path) -> Path:
    """`fig` as a PNG of `DPI` dots per inch at `path` (its folder made); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)  # the figure draws on Agg, whatever pyplot's backend is
    fig.savefig(path, dpi=DPI)
    return path
