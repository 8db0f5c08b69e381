"""What every quickstart stage sees: settings, run directory, earlier stages' results."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_longsky.quickstart.config import QuickstartConfig
from megatron_longsky.quickstart.runner import StageRunner


@dataclass
class Context:
    cfg: QuickstartConfig
    run_dir: Path
    runner: StageRunner

    def path(self, relative: str) -> Path:
        path = self.run_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def tokenizer_config(self):
        from megatron_longsky.tokenizer import TokenizerConfig

        tok = self.runner.results("tokenizer")
        return TokenizerConfig(type=tok.get("type", "byte"), model=tok.get("model"))

    def tokenizer(self):
        from megatron_longsky.tokenizer import build_tokenizer

        return build_tokenizer(self.tokenizer_config())
