"""The quickstart's REPORT.md: what ran, the figures, and the pictures."""

from __future__ import annotations

from pathlib import Path

from megatron_longsky.utils.atomic import atomic_write_text


def table(headers: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def image(path: str | Path, run_dir: Path, alt: str) -> str:
    rel = Path(path).resolve().relative_to(run_dir.resolve())
    return f"![{alt}]({rel.as_posix()})"


def write_report(run_dir: Path, sections: list[str]) -> Path:
    path = run_dir / "REPORT.md"
    atomic_write_text(path, "\n\n".join(s.strip() for s in sections if s and s.strip()) + "\n")
    return path
