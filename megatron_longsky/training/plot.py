"""Loss curve PNG from a ``metrics.jsonl``: ``longsky plot-loss metrics.jsonl -o loss.png``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from megatron_longsky.training.metrics import MetricsFileError, read_metric_records, read_metrics
from megatron_longsky.utils.atomic import atomic_path


def _valid_points(path: Path) -> list[tuple[int, float]]:
    points = {r["iteration"]: r["valid_loss"] for r in read_metric_records(path) if "valid_loss" in r}
    return sorted(points.items())


def plot_loss(metrics_path: str | Path, out_path: str | Path, title: str | None = None,
              overwrite: bool = True) -> Path:
    """Training loss per iteration (skipped steps left out), plus valid loss if recorded.

    ``out_path`` is never the metrics file (any spelling) nor a device or directory; an
    existing PNG is replaced only with ``overwrite`` (the command line's ``--overwrite``)."""
    from megatron_longsky.utils.output_paths import check_outputs

    check_outputs([out_path], [metrics_path], overwrite)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics_path = Path(metrics_path)
    records = [r for r in read_metrics(metrics_path) if not r.get("skipped")]
    if not records:
        raise MetricsFileError(f"{metrics_path} holds no training records")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["iteration"] for r in records], [r["loss"] for r in records], label="train loss")
    valid = _valid_points(metrics_path)
    if valid:
        ax.plot(*zip(*valid), "o-", label="valid loss")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (per token)")
    ax.set_title(title or metrics_path.parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return out_path


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="longsky plot-loss", description=__doc__)
    parser.add_argument("metrics", help="metrics.jsonl written by longsky train")
    parser.add_argument("-o", "--output", default=None, help="PNG path (default: beside metrics, loss.png)")
    parser.add_argument("--title", default=None)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing PNG")
    args = parser.parse_args(argv)
    out = args.output or str(Path(args.metrics).with_name("loss.png"))
    print(plot_loss(args.metrics, out, args.title, overwrite=args.overwrite))
    return 0
