"""End-of-run figures of pretraining (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss(history: list[dict], path: str, vocab_size: int | None = None):
    """Training and held-out loss against the optimizer step, and MaxVio (max over layers, mean over layers)."""
    plt = _pyplot()
    train = [(r["step"], r["loss"]) for r in history if r.get("loss") is not None]
    objective = [(r["step"], r["train_objective"]) for r in history if r.get("train_objective") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in history if r.get("eval_loss") is not None]
    maxvio = [(r["step"], max(r["maxvio"]), sum(r["maxvio"]) / len(r["maxvio"])) for r in history if r.get("maxvio")]

    fig, (ax, ax_vio) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    if train:
        ax.plot(*zip(*train), label="training LM loss")
    if objective and any(o != t for (_, o), (_, t) in zip(objective, train)):
        ax.plot(*zip(*objective), alpha=0.5, linewidth=0.8, label="training objective (with MTP / aux losses)")
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out LM loss")
    if vocab_size:
        ax.axhline(math.log(vocab_size), color="grey", linestyle=":", label="uniform over the vocabulary")
    ax.set_ylabel("cross-entropy (nats)")
    ax.legend()
    ax.grid(alpha=0.3)
    if maxvio:
        steps, worst, mean = zip(*maxvio)
        ax_vio.plot(steps, worst, label="max over MoE layers")
        ax_vio.plot(steps, mean, label="mean over MoE layers")
        ax_vio.legend()
    ax_vio.set_ylabel("MaxVio")
    ax_vio.set_xlabel("optimizer step")
    ax_vio.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_expert_load(panels: list[tuple[str, list[list[float]]]], layer_names: list[str], path: str):
    """Heat maps of the load of every expert relative to the mean load of its layer (1 = balanced), one per panel:
    `(title, [layers][experts] token counts)`."""
    plt = _pyplot()
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    panels = [(title, np.asarray(load, dtype=float)) for title, load in panels if load]
    if not panels:
        panels = [("no routed tokens recorded", np.ones((max(len(layer_names), 1), 1)))]
    relative = [load / np.clip(load.mean(axis=1, keepdims=True), 1e-9, None) for _, load in panels]
    vmax = max(2.0, max(float(r.max()) for r in relative))
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax)
    layers, experts = relative[0].shape
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(max(6.0, 0.18 * experts + 2.5), (0.35 * layers + 1.4) * len(panels)), squeeze=False
    )
    for ax, (title, _), rel in zip(axes[:, 0], panels, relative):
        image = ax.imshow(rel, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("MoE layer")
        ax.set_yticks(range(layers), layer_names[:layers] if len(layer_names) >= layers else range(layers))
        ax.set_xlabel("expert")
        fig.colorbar(image, ax=ax, label="load / mean load")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
