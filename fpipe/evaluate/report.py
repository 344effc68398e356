"""What an evaluation run leaves in the workdir: results.json, results.md and results.png.

``results.json``: ``{"provenance": {...}, "protocols": {protocol: {layer: numbers}}}``.
``results.md``: top-1 (and mean per-class accuracy) as a layer × protocol table, plus low-shot
mean ± std per k. ``results.png``: top-1 per layer for each protocol; low-shot top-1 vs k.
"""
import json
import os

from absl import logging

from fpipe import files


def columns(results):
    """``[(title, protocol, key)]``: one column per protocol, per k for knn and low-shot."""
    cols = []
    for protocol, per_layer in results.items():
        first = next(iter(per_layer.values()), {})
        if protocol in ("knn", "low_shot"):
            name = "kNN" if protocol == "knn" else "low-shot"
            cols += [(f"{name} {k}", protocol, k) for k in first]
        else:
            cols.append((protocol, protocol, None))
    return cols


def value(results, protocol, key, layer, metric="top1"):
    entry = results[protocol].get(layer)
    if entry is None:
        return None
    return (entry[key] if key else entry).get(metric)


def table(results, layers, metric="top1"):
    """A markdown table: a row per layer, a column per protocol (variant)."""
    cols = columns(results)
    lines = ["| layer | " + " | ".join(c[0] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for layer in layers:
        cells = []
        for _, protocol, key in cols:
            v = value(results, protocol, key, layer, metric)
            std = value(results, protocol, key, layer, metric + "_std") if protocol == "low_shot" else None
            cells.append("" if v is None else f"{v:.1f}" + (f" ± {std:.1f}" if std is not None else ""))
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(results, layers, provenance):
    parts = ["# Evaluation results", "",
             f"Features: `{provenance['features_from']}` (fingerprint {provenance['fingerprint_id']}); "
             f"splits: {', '.join(f'{k} {v}' for k, v in provenance['splits'].items())}.", "",
             "## Top-1 accuracy (%)", "", table(results, layers), "",
             "## Mean per-class accuracy (%)", "", table(results, layers, "mean_per_class"), ""]
    chosen = []
    for layer in layers:
        if "linear" in results:
            r = results["linear"][layer]
            chosen.append(f"- linear, {layer}: lr {r['lr']:g}, wd {r['wd']:g} (val top-1 {r['val_top1']:.1f})")
        if "logreg" in results:
            r = results["logreg"][layer]
            chosen.append(f"- logreg, {layer}: C {r['C']:g} (val top-1 {r['val_top1']:.1f})")
    if chosen:
        parts += ["## Chosen on the validation split", "", *chosen, ""]
    return "\n".join(parts)


def plot(path, results, layers):
    """results.png: top-1 per layer per protocol; low-shot top-1 (mean ± std) vs k per layer."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    per_layer = [(title, protocol, key) for title, protocol, key in columns(results) if protocol != "low_shot"]
    low = results.get("low_shot")
    panels = bool(per_layer) + bool(low)  # a run of low-shot alone gets no empty per-layer panel
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels if panels > 1 else 6, 4), squeeze=False)
    axes = iter(axes[0])
    if per_layer:
        ax = next(axes)
        for title, protocol, key in per_layer:
            ys = [value(results, protocol, key, layer) for layer in layers]
            ax.plot(range(len(layers)), ys, marker="o", label=title)
        ax.set(xticks=range(len(layers)), xticklabels=layers, xlabel="layer", ylabel="test top-1 (%)",
               title="Accuracy per layer")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if low:
        ax = next(axes)
        for layer in layers:
            ks = sorted(low[layer], key=lambda k: int(k.split("=")[1]))
            xs = [int(k.split("=")[1]) for k in ks]
            ax.errorbar(xs, [low[layer][k]["top1"] for k in ks], yerr=[low[layer][k]["top1_std"] for k in ks],
                        marker="o", capsize=3, label=layer)
        ax.set(xscale="log", xlabel="labelled samples per class (k)", ylabel="test top-1 (%)",
               title="Low-shot accuracy (mean ± std over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    files.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def write(workdir, results, layers, provenance):
    """results.json, results.md and results.png in ``workdir``; returns the markdown."""
    files.atomic_write(os.path.join(workdir, "results.json"),
                       lambda f: json.dump({"provenance": provenance, "protocols": results}, f, indent=2), mode="w")
    md = markdown(results, layers, provenance)
    files.atomic_write(os.path.join(workdir, "results.md"), lambda f: f.write(md), mode="w")
    try:
        plot(os.path.join(workdir, "results.png"), results, layers)
    except ImportError:
        logging.warning("matplotlib is not installed: no results.png (pip install -r requirements.txt).")
    return md
