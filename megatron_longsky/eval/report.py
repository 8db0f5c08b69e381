"""Needle-test reports: heatmap PNG, JSON of every cell and sample, Markdown summary."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Mapping

from megatron_longsky.eval.needle import NeedleResult
from megatron_longsky.utils.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text


def accuracy_matrix(result: NeedleResult) -> list[list[float]]:
    """Rows: depths (top = 0%), columns: lengths."""
    return [[result.cell(n, d).accuracy for n in result.lengths] for d in result.depths]


def _draw_heatmap(ax, result: NeedleResult, title: str, ylabel: bool = True):
    from matplotlib.colors import LinearSegmentedColormap

    cmap = LinearSegmentedColormap.from_list("needle", ["#d7301f", "#fdd49e", "#1a9850"])
    matrix = accuracy_matrix(result)
    image = ax.imshow(matrix, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    if len(result.lengths) * len(result.depths) <= 400:  # readable: print each cell's accuracy
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.2g}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(result.lengths)), [str(n) for n in result.lengths], rotation=45)
    ax.set_yticks(range(len(result.depths)), [f"{d:g}" for d in result.depths])
    ax.set_xlabel("context length (tokens)")
    if ylabel:
        ax.set_ylabel("needle depth (%)")
    ax.set_title(f"{title}\naccuracy {result.accuracy:.1%}")
    return image


def _png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return buf.getvalue()


def heatmaps_png(results: Mapping[str, NeedleResult]) -> bytes:
    """One PNG with a heatmap per result, side by side (e.g. one per training stage)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = len(results)
    width = 2.0 + (1.0 + 0.8 * max(len(r.lengths) for r in results.values())) * n
    fig, axes = plt.subplots(1, n, figsize=(width, 5), squeeze=False)
    image = None
    for i, (ax, (title, result)) in enumerate(zip(axes[0], results.items())):
        image = _draw_heatmap(ax, result, title, ylabel=i == 0)
    fig.colorbar(image, ax=list(axes[0]), label="accuracy")
    data = _png_bytes(fig)
    plt.close(fig)
    return data


def markdown_summary(result: NeedleResult, title: str = "Needle in a haystack") -> str:
    cfg = result.config
    longest = result.longest_length_all_passed()
    lines = [
        f"# {title}{': ' + result.model if result.model else ''}",
        "",
        f"- mode: {cfg.get('mode')}; samples per cell: {cfg.get('samples')}; seed: {cfg.get('seed')}; "
        f"needles: {cfg.get('num_needles')}; distractors: {cfg.get('num_distractors')}",
        f"- haystack: {cfg.get('haystack_source', cfg.get('haystack'))}",
        f"- overall accuracy: **{result.accuracy:.1%}** over {len(result.cells)} cells",
        f"- longest length with all cells passed: **{longest if longest is not None else 'none'}**",
        "",
        "| length | accuracy | cells passed |",
        "|---:|---:|---:|",
    ]
    for n in result.lengths:
        cells = [c for c in result.cells if c.length == n]
        passed = sum(c.accuracy == 1.0 for c in cells)
        lines.append(f"| {n} | {result.length_accuracy(n):.1%} | {passed}/{len(cells)} |")
    lines += ["", "Accuracy by depth (rows, %) and length (columns):", "",
              "| depth | " + " | ".join(str(n) for n in result.lengths) + " |",
              "|---:|" + "---:|" * len(result.lengths)]
    for d, row in zip(result.depths, accuracy_matrix(result)):
        lines.append(f"| {d:g} | " + " | ".join(f"{a:.2f}" for a in row) + " |")
    return "\n".join(lines) + "\n"


def write_report(result: NeedleResult, out_dir: str | Path, name: str = "needle",
                 title: str = "Needle in a haystack") -> dict:
    """Write ``<name>.png``, ``<name>.json`` and ``<name>.md`` under ``out_dir``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"png": out / f"{name}.png", "json": out / f"{name}.json", "md": out / f"{name}.md"}
    atomic_write_bytes(paths["png"], heatmaps_png({result.model or "model": result}))
    atomic_write_json(paths["json"], result.to_dict())
    atomic_write_text(paths["md"], markdown_summary(result, title))
    return {k: str(v) for k, v in paths.items()}


def load_result(path: str | Path) -> NeedleResult:
    """Read a report JSON back (to redraw or compare runs)."""
    from megatron_longsky.eval.needle import CellResult, SampleResult

    data = json.loads(Path(path).read_text(encoding="utf-8"))
    cells = [
        CellResult(c["length"], c["depth_percent"], [
            SampleResult.from_dict(s) for s in c["samples"]
        ])
        for c in data["cells"]
    ]
    return NeedleResult(config=data["config"], cells=cells, model=data.get("model", ""))


def comparison_markdown(results: Mapping[str, NeedleResult]) -> str:
    """One row per result (e.g. per training stage): accuracy per length, overall, longest."""
    lengths = sorted({n for r in results.values() for n in r.lengths})
    lines = ["| model | " + " | ".join(str(n) for n in lengths) + " | overall | longest all passed |",
             "|---|" + "---:|" * (len(lengths) + 2)]
    for title, r in results.items():
        cells = [f"{r.length_accuracy(n):.1%}" if n in r.lengths else "-" for n in lengths]
        longest = r.longest_length_all_passed()
        lines.append(f"| {title} | " + " | ".join(cells) + f" | {r.accuracy:.1%} | {longest or 'none'} |")
    return "\n".join(lines) + "\n"


def write_comparison(results: Mapping[str, NeedleResult], out_dir: str | Path, name: str = "needle_comparison") -> dict:
    """Heatmaps side by side (``<name>.png``) and the accuracy table (``<name>.md``)."""
    out = Path(out_dir)
    paths = {"png": out / f"{name}.png", "md": out / f"{name}.md"}
    atomic_write_bytes(paths["png"], heatmaps_png(results))
    atomic_write_text(paths["md"], f"![needle heatmaps]({paths['png'].name})\n\n" + comparison_markdown(results))
    return {k: str(v) for k, v in paths.items()}
