"""Render an `OutlierReport` twice: `report.json` (the numbers) and `report.html` with PNG plots.

Plots use matplotlib's Agg backend (no display needed), imported only when a report is written.
The page leads with what a person looks for: a heatmap of per-channel activation absmax over
all layers (outlier channels show as vertical stripes), the max/median ratio of every layer
before and after the passes, the channels shared across layers, then one plot per layer.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from qpass.report.outliers import LayerEntry, LayerState, OutlierReport

BEFORE_COLOR = "#9a9a9a"
AFTER_COLOR = "#1f77b4"
OUTLIER_COLOR = "#d62728"


def write_json(report: OutlierReport, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.write_text(json.dumps(report.to_dict(), indent=1))
    return path


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def short_labels(labels: list[str]) -> dict[str, str]:
    """Labels without the dotted prefix they all share ('encoder.layer.0.attention.self.query' ->
    '0.attention.self.query'): tick labels must be short, and the shared prefix says nothing.
    """
    split = [label.split(".") for label in labels]
    common = 0
    while split and all(len(p) > common + 1 and p[common] == split[0][common] for p in split):
        common += 1
    return {label: ".".join(p[common:]) for label, p in zip(labels, split, strict=True)}


def _ratio(state: LayerState) -> np.ndarray:
    return state.act.absmax / max(state.act.median, 1e-12)


def plot_heatmaps(report: OutlierReport, folder: Path) -> list[tuple[str, str]]:
    """One heatmap per input width: rows = layers, columns = channels, colour = absmax / median (log)."""
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    short = short_labels([layer.label for layer in report.layers])
    out = []
    widths = sorted({layer.in_features for layer in report.layers})
    moments = ["before"] + (["after"] if any(layer.after is not None for layer in report.layers) else [])
    for width in widths:
        layers = [layer for layer in report.layers if layer.in_features == width]
        grids = {
            m: np.stack(
                [_ratio(layer.before if m == "before" else (layer.after or layer.before)) for layer in layers]
            )
            for m in moments
        }
        vmax = max(max(float(g.max()) for g in grids.values()), 2.0)
        fig, axes = plt.subplots(
            1, len(moments), figsize=(7 * len(moments), 0.28 * len(layers) + 1.6), squeeze=False, sharey=True
        )
        cmap = plt.get_cmap("magma").with_extremes(under="black")  # below the median: not of interest
        image = None
        for ax, m in zip(axes[0], moments, strict=True):
            image = ax.imshow(
                grids[m], aspect="auto", interpolation="nearest", cmap=cmap, norm=LogNorm(vmin=1.0, vmax=vmax)
            )
            ax.set_title(f"{m} the passes" if report.recipe else "activation absmax / median", fontsize=10)
            ax.set_xlabel("input channel")
            ax.set_yticks(range(len(layers)), [short[layer.label] for layer in layers], fontsize=7)
        fig.colorbar(image, ax=axes[0].tolist(), label="absmax / median channel", shrink=0.9, extend="min")
        name = f"heatmap_{width}.png"
        fig.savefig(folder / name, dpi=90, bbox_inches="tight")
        plt.close(fig)
        out.append((name, f"layers with {width} input channels"))
    return out


def plot_overview(report: OutlierReport, folder: Path) -> str:
    """Max/median activation ratio and kurtosis of every layer, before vs after."""
    plt = _pyplot()
    n = len(report.layers)
    x = np.arange(n)
    has_after = any(layer.after is not None for layer in report.layers)
    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 0.32 * n + 2), 6.4), sharex=True)
    width = 0.4 if has_after else 0.8
    for ax, key, title in (
        (axes[0], "max_ratio", "activation max / median channel"),
        (axes[1], "kurtosis", "kurtosis of per-channel activation absmax"),
    ):
        before = [getattr(layer.before.act, key) for layer in report.layers]
        ax.bar(x - (width / 2 if has_after else 0), before, width, color=BEFORE_COLOR, label="before")
        if has_after:
            after = [getattr((layer.after or layer.before).act, key) for layer in report.layers]
            ax.bar(x + width / 2, after, width, color=AFTER_COLOR, label=f"after {report.recipe}")
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].axhline(report.ratio_threshold, color=OUTLIER_COLOR, ls="--", lw=1, label="outlier threshold")
    axes[0].legend(fontsize=8, loc="upper right")
    short = short_labels([layer.label for layer in report.layers])
    axes[1].set_xticks(x, [short[layer.label] for layer in report.layers], rotation=90, fontsize=7)
    name = "overview.png"
    fig.savefig(folder / name, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return name


def plot_layer(report: OutlierReport, layer: LayerEntry, index: int, folder: Path) -> str:
    """Per-channel absmax of the layer's activation and weight; outlier channels marked."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(9, 4.6), sharex=True)
    channels = np.arange(layer.in_features)
    for ax, kind in ((axes[0], "act"), (axes[1], "weight")):
        before = getattr(layer.before, kind)
        ax.plot(channels, before.absmax, color=BEFORE_COLOR, lw=0.9, label="before")
        if layer.after is not None:
            after = getattr(layer.after, kind)
            ax.plot(channels, after.absmax, color=AFTER_COLOR, lw=0.9, label=f"after {report.recipe}")
        outs = before.outliers()
        if outs:
            idx = [o.channel for o in outs]
            ax.scatter(idx, before.absmax[idx], color=OUTLIER_COLOR, s=14, zorder=3, label="outlier (before)")
            for o in outs[:4]:
                ax.annotate(
                    str(o.channel),
                    (o.channel, o.absmax),
                    fontsize=7,
                    xytext=(3, 2),
                    textcoords="offset points",
                )
        ax.set_ylabel("activation absmax" if kind == "act" else "weight absmax", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper right")
    axes[1].set_xlabel("input channel")
    name = f"layer_{index:03d}.png"
    fig.savefig(folder / name, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return name


_CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1300px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 12px; }
th, td { border: 1px solid #ddd; padding: 3px 6px; text-align: right; }
th { background: #f3f3f3; } td.name { text-align: left; font-family: monospace; }
tr.changed td { background: #eef6ff; }
td.out { text-align: left; } th.left { text-align: left; }
.grid { display: flex; flex-wrap: wrap; gap: 8px 16px; }
.grid figure { margin: 0; width: calc(50% - 8px); } .grid figcaption { font-size: 13px; font-weight: 600; }
.grid figcaption small { font-weight: 400; color: #666; }
.out { color: #d62728; font-weight: 600; } .good { color: #1a7f37; font-weight: 600; }
.meta { font-size: 13px; } .meta code { background: #f3f3f3; padding: 1px 4px; }
img { max-width: 100%; border: 1px solid #eee; margin: 6px 0; }
pre { background: #f7f7f7; padding: 8px; white-space: pre-wrap; font-size: 12px; }
"""


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def _outlier_cell(state: LayerState | None, which: str) -> str:
    if state is None:
        return "<td></td>"
    profile = getattr(state, which)
    outs = profile.outliers()
    if not outs:
        return "<td>—</td>"
    text = ", ".join(f"{o.channel} ({o.ratio:.0f}×)" for o in outs[:4]) + (" …" if len(outs) > 4 else "")
    return f'<td class="out">{len(outs)}: {text}</td>'


def _num_cells(before: float, after: float | None) -> str:
    if after is None:
        return f"<td>{_fmt(before)}</td>"
    cls = "good" if after < before * 0.95 else ""
    return f'<td>{_fmt(before)}</td><td class="{cls}">{_fmt(after)}</td>'


def _layer_table(report: OutlierReport) -> str:
    has_after = any(layer.after is not None for layer in report.layers)
    span = ' colspan="2"' if has_after else ""
    rs = " rowspan=2" if has_after else ""
    head = (
        f"<tr><th{rs}>#</th><th{rs}>layer</th><th{rs}>in→out</th>"
        f"<th{span}>act max/median</th><th{span}>act kurtosis</th><th{span}>weight max/median</th>"
        f"<th{rs}>activation outlier channels"
        + (" (before)</th><th rowspan=2>after</th>" if has_after else "</th>")
        + "</tr>"
    )
    sub = "<tr>" + "<th>before</th><th>after</th>" * 3 + "</tr>" if has_after else ""
    rows = []
    short = short_labels([layer.label for layer in report.layers])
    for i, layer in enumerate(report.layers):
        a = layer.after
        cls = ' class="changed"' if layer.changed else ""
        rows.append(
            f"<tr{cls}><td>{i}</td><td class='name' title='{html.escape(layer.label)}'>"
            f"<a href='#layer{i}'>{html.escape(short[layer.label])}</a></td>"
            f"<td>{layer.in_features}→{layer.out_features}</td>"
            + _num_cells(layer.before.act.max_ratio, a.act.max_ratio if a else None)
            + _num_cells(layer.before.act.kurtosis, a.act.kurtosis if a else None)
            + _num_cells(layer.before.weight.max_ratio, a.weight.max_ratio if a else None)
            + _outlier_cell(layer.before, "act")
            + (_outlier_cell(a, "act") if has_after else "")
            + "</tr>"
        )
    return f"<table>{head}{sub}{''.join(rows)}</table>"


def _shared_table(report: OutlierReport) -> str:
    rows = []
    after = {(s.width, s.channel): len(s.layers) for s in report.shared("after")} if report.recipe else {}
    short = short_labels([layer.label for layer in report.layers])
    for s in report.shared("before"):
        names = ", ".join(html.escape(short[n]) for n in s.layers)
        tail = f"<td>{after.get((s.width, s.channel), 0)}</td>" if report.recipe else ""
        rows.append(
            f"<tr><td class='out'>{s.channel}</td><td>{s.width}</td><td>{len(s.layers)}</td>{tail}"
            f"<td class='name'>{names}</td></tr>"
        )
    if not rows:
        return "<p>No activation outlier channel is shared by two or more layers.</p>"
    tail_head = "<th>layers after</th>" if report.recipe else ""
    return (
        f"<table><tr><th>channel</th><th>width</th><th>layers</th>{tail_head}<th class='left'>where</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def _pass_details(line: str) -> str:
    """A pass summary: counts visible, the (long) list of skip reasons folded away."""
    head, sep, reasons = line.partition(" skipped: ")
    reasons, _, verified = reasons.partition(" [verified")
    verified = f" [verified{verified}" if verified else ""
    if not sep:
        return f"<p class='meta'><code>{html.escape(line)}</code></p>"
    return (
        f"<details class='meta'><summary><code>{html.escape(head)} skipped{html.escape(verified)}</code> "
        "(click for the reasons)"
        f"</summary><pre>{html.escape(reasons.replace('; ', chr(10)))}</pre></details>"
    )


def render_html(report: OutlierReport, folder: Path) -> Path:
    """Write the PNGs and `report.html` into `folder`; returns the HTML path."""
    heatmaps = plot_heatmaps(report, folder)
    overview = plot_overview(report, folder)
    layer_pngs = [plot_layer(report, layer, i, folder) for i, layer in enumerate(report.layers)]
    n_out = sum(1 for layer in report.layers if layer.before.act.outliers())
    changed = sum(1 for layer in report.layers if layer.changed)
    recipe = (
        f"<p class='meta'>After: the passes of recipe <code>{html.escape(report.recipe)}</code> "
        f"(quantization not applied); {changed} of {len(report.layers)} layers changed (shaded rows).</p>"
        + "".join(_pass_details(line) for line in report.passes)
        if report.recipe
        else "<p class='meta'>Before any pass (give <code>--recipe</code> to see the effect of a recipe).</p>"
    )
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>qpass outliers: {html.escape(report.model)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Outlier channels: {html.escape(report.model)}</h1>",
        f"<p class='meta'>{report.samples} calibration samples; {len(report.layers)} linear layers; "
        f"{n_out} with activation outlier channels (absmax ≥ {report.ratio_threshold:g}× the median "
        "channel). Kurtosis: of the per-channel absmax values (3 for a Gaussian).</p>",
        recipe,
        "<h2>Activation absmax per channel</h2><p class='meta'>Each row is a layer, each column an input "
        "channel; bright vertical stripes are outlier channels.</p>",
        *(
            f"<p class='meta'>{html.escape(cap)}</p><img src='{name}' alt='{html.escape(cap)}'>"
            for name, cap in heatmaps
        ),
        f"<h2>Per layer</h2><img src='{overview}' alt='max/median ratio and kurtosis per layer'>",
        _layer_table(report),
        "<h2>Outlier channels shared across layers</h2>",
        _shared_table(report),
        "<h2>Layers</h2><div class='grid'>",
    ]
    for i, (layer, png) in enumerate(zip(report.layers, layer_pngs, strict=True)):
        parts.append(
            f"<figure id='layer{i}'><figcaption>{i}. {html.escape(layer.label)} <small>({html.escape(layer.op)}, "
            f"{layer.in_features}→{layer.out_features})</small></figcaption>"
            f"<img src='{png}' alt='{html.escape(layer.label)}'></figure>"
        )
    parts.append("</div></body></html>")
    path = folder / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def write_report(report: OutlierReport, folder: str | os.PathLike) -> tuple[Path, Path]:
    """`report.json` and `report.html` (with its PNGs) in `folder` (created if missing)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return write_json(report, folder / "report.json"), render_html(report, folder)
