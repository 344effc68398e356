"""The evaluation report's plot: one panel per kind of result, none of them empty."""
import warnings

import pytest

from fpipe.evaluate import report

pytest.importorskip("matplotlib")

LAYERS = ["res4", "flatten"]
LOW_SHOT = {layer: {"k=1": {"top1": 50.0 + i, "top1_std": 1.0}, "k=5": {"top1": 80.0 + i, "top1_std": 0.5}}
            for i, layer in enumerate(LAYERS)}
KNN = {layer: {"k=20": {"top1": 70.0 + i}} for i, layer in enumerate(LAYERS)}


def panels(results, tmp_path, monkeypatch):
    """The titles of the plot's panels, and the warnings drawing it raised."""
    from matplotlib import pyplot as plt
    seen = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (seen.extend(ax.get_title() for ax in fig.axes), close(fig)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report.plot(str(tmp_path / "results.png"), results, LAYERS)
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return seen, [str(w.message) for w in caught]


@pytest.mark.parametrize("protocols, want", [
    (("knn",), ["Accuracy per layer"]),
    (("low_shot",), ["Low-shot accuracy (mean ± std over seeds)"]),
    (("knn", "low_shot"), ["Accuracy per layer", "Low-shot accuracy (mean ± std over seeds)"]),
])
def test_the_plot_draws_a_panel_only_for_results_it_has(protocols, want, tmp_path, monkeypatch):
    results = {p: {"knn": KNN, "low_shot": LOW_SHOT}[p] for p in protocols}
    titles, warned = panels(results, tmp_path, monkeypatch)
    assert titles == want
    assert warned == []
