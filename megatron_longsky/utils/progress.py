"""Progress for long commands: a tqdm bar on a terminal, periodic lines in a batch log.

    with progress_bar(total=n, desc="needle", unit="sample") as bar:
        for ...:
            bar.update(1)

On a terminal this is tqdm. When the output is not a terminal (a Slurm job log, a pipe),
tqdm would print nothing useful, so every ``interval`` seconds (``LONGSKY_PROGRESS_INTERVAL``,
default 60) one line is written instead, and one at the end (for work that took longer than
one interval)::

    needle: 120/440 sample (27.3%) | 0.41 sample/s | elapsed 0:04:52 | ETA 0:13:01
    needle: done, 440 sample in 0:17:50 (0.41 sample/s)
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO, Optional

DEFAULT_INTERVAL_S = 60.0


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _amount(value: float, scale: bool) -> str:
    if not scale:
        return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}"
    for unit in ("", "k", "M", "G", "T"):
        if abs(value) < 1000 or unit == "T":
            return f"{value:.3g}{unit}" if unit else f"{value:.4g}"
        value /= 1000
    return str(value)


class LineProgress:
    """tqdm's interface (update, n, total, format_dict, set_postfix_str, close) as log lines."""

    def __init__(self, total: Optional[float] = None, desc: str = "", unit: str = "it", unit_scale: bool = False,
                 file: Optional[IO[str]] = None, interval: Optional[float] = None):
        self.total = total
        self.desc = desc
        self.unit = unit
        self.unit_scale = unit_scale
        self.file = file or sys.stderr
        if interval is None:
            interval = float(os.environ.get("LONGSKY_PROGRESS_INTERVAL", DEFAULT_INTERVAL_S))
        self.interval = interval
        self.n = 0
        self.postfix = ""
        self._start = time.monotonic()
        self._last_line = self._start
        self._closed = False
        self._printed = False

    @property
    def format_dict(self) -> dict:
        return {"n": self.n, "total": self.total, "elapsed": time.monotonic() - self._start}

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = text

    def set_postfix(self, refresh: bool = True, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last_line >= self.interval:
            self._last_line = now
            self._printed = True
            self._write(self.line(now - self._start))

    def line(self, elapsed: float) -> str:
        rate = self.n / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: {_amount(self.n, self.unit_scale)}"]
        if self.total:
            parts[0] += f"/{_amount(self.total, self.unit_scale)} {self.unit} ({100 * self.n / self.total:.1f}%)"
        else:
            parts[0] += f" {self.unit}"
        parts.append(f"{_amount(rate, self.unit_scale)} {self.unit}/s")
        parts.append(f"elapsed {_clock(elapsed)}")
        if self.total and rate > 0:
            parts.append(f"ETA {_clock((self.total - self.n) / rate)}")
        if self.postfix:
            parts.append(self.postfix)
        return " | ".join(parts)

    def _write(self, text: str) -> None:
        print(text, file=self.file, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if sys.exc_info()[0] is not None:
            return  # closed while an error unwinds (a finally block): the error is the last word, not "done"
        if not self._printed and time.monotonic() - self._start < self.interval:
            return  # work shorter than one interval: a "done" line would only add noise
        elapsed = time.monotonic() - self._start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        self._write(f"{self.desc}: done, {_amount(self.n, self.unit_scale)} {self.unit} in {_clock(elapsed)} "
                    f"({_amount(rate, self.unit_scale)} {self.unit}/s)")

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self._closed = True  # no "done" line for a failed run
        self.close()


class _Silent(LineProgress):
    def _write(self, text: str) -> None:
        pass


def progress_bar(total: Optional[float] = None, desc: str = "", unit: str = "it", enabled: bool = True,
                 unit_scale: bool = False, file: Optional[IO[str]] = None, **tqdm_kwargs):
    """A tqdm bar when ``file`` (default stderr) is a terminal, else a :class:`LineProgress`;
    nothing is shown when ``enabled`` is False (the counters still work)."""
    stream = file or sys.stderr
    if not enabled:
        return _Silent(total, desc, unit, unit_scale, stream)
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, file=stream, **tqdm_kwargs)
    return LineProgress(total, desc, unit, unit_scale, stream)
