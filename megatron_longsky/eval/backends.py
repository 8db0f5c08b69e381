"""What an evaluated model must provide, and the Hugging Face implementation.

An :class:`LMBackend` turns token ids into next-token logits, generates greedily and
gives per-token negative log-likelihoods. :class:`LogitsBackend` derives the last
two from ``logits`` (generation recomputes the full prefix each step: simple, exact,
and fine for the few answer tokens our tasks need). The Megatron backend lives in
:mod:`megatron_longsky.eval.megatron_backend`.
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence, runtime_checkable

import torch

log = logging.getLogger(__name__)


@runtime_checkable
class LMBackend(Protocol):
    def logits(self, token_ids: list[list[int]], last_n: Optional[int] = None) -> torch.Tensor:
        """``[batch, n, vocab]`` float logits of the last ``n`` positions (all when None).

        Rows must have equal length. Position ``i``'s logits predict token ``i + 1``.
        """

    def generate_greedy(self, prompt_ids: list[int], max_new_tokens: int,
                        stop_ids: Sequence[int] = (), vocab_size: Optional[int] = None) -> list[int]:
        """Greedy continuation of ``prompt_ids``; stops after a token in ``stop_ids``
        (which is not returned) or after ``max_new_tokens`` tokens. Only ids below
        ``vocab_size`` (the tokenizer's; None: every logit) are ever picked."""

    def token_nll(self, token_ids: list[int]) -> torch.Tensor:
        """``[len - 1]`` negative log-likelihood of tokens ``1..len-1`` given their prefix."""


def continuation_logits(backend: LMBackend, prompt_ids: list[int], continuation: list[int]) -> torch.Tensor:
    """``[len(continuation), vocab]``: the logits that predict each continuation token."""
    if not continuation:
        raise ValueError("empty continuation")
    full = list(prompt_ids) + list(continuation[:-1])
    return backend.logits([full], last_n=len(continuation))[0]


def greedy_decode(forward: Callable[[list[int]], torch.Tensor], prompt_ids: list[int], max_new_tokens: int,
                  stop_ids: Sequence[int] = (), vocab_size: Optional[int] = None) -> list[int]:
    """The greedy loop every backend shares. ``forward(new_ids)`` feeds ``new_ids`` after
    the tokens fed so far (first the prompt, then one generated token at a time) and
    returns the last position's ``[vocab]`` logits; a backend with a KV cache feeds only
    the new ids to its model, one without re-reads the whole prefix. ``vocab_size``: the
    tokenizer's vocabulary; a model's padded rows beyond it are never picked."""
    if not prompt_ids:
        raise ValueError("generate_greedy needs a non-empty prompt")
    stops = set(int(s) for s in stop_ids)
    out: list[int] = []
    if max_new_tokens < 1:
        return out
    logits = forward(list(prompt_ids))
    while True:
        token = int(logits[:vocab_size].argmax())
        if token in stops:
            break
        out.append(token)
        if len(out) == max_new_tokens:
            break
        logits = forward([token])
    return out


class LogitsBackend:
    """Base class: implement :meth:`logits`; generation and NLL come from it."""

    def logits(self, token_ids: list[list[int]], last_n: Optional[int] = None) -> torch.Tensor:
        raise NotImplementedError

    def generate_greedy(self, prompt_ids: list[int], max_new_tokens: int,
                        stop_ids: Sequence[int] = (), vocab_size: Optional[int] = None) -> list[int]:
        ids: list[int] = []

        def forward(new_ids: list[int]) -> torch.Tensor:  # recompute the whole prefix
            ids.extend(new_ids)
            return self.logits([ids], last_n=1)[0, -1]

        return greedy_decode(forward, prompt_ids, max_new_tokens, stop_ids, vocab_size)

    def token_nll(self, token_ids: list[int]) -> torch.Tensor:
        if len(token_ids) < 2:
            raise ValueError("token_nll needs at least two tokens")
        logits = self.logits([list(token_ids)])[0, :-1].float()
        targets = torch.tensor(token_ids[1:], dtype=torch.long)
        return torch.nn.functional.cross_entropy(logits, targets, reduction="none")


def check_rows(token_ids: list[list[int]]) -> int:
    if not token_ids or not token_ids[0]:
        raise ValueError("logits() needs at least one non-empty row")
    length = len(token_ids[0])
    if any(len(row) != length for row in token_ids):
        raise ValueError("logits() rows must have equal length")
    return length


class HFBackend(LogitsBackend):
    """A ``transformers`` causal LM from a local directory (never a hub download)."""

    def __init__(self, model, device: str | torch.device = "cpu"):
        self.model = model.eval()
        self.device = torch.device(device)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dtype: str = "float32",
                        device: str = "cpu") -> "HFBackend":
        from transformers import AutoModelForCausalLM

        from megatron_longsky.runtime.device import dtype_from_name

        path = Path(model_dir)
        if not (path / "config.json").exists():
            raise FileNotFoundError(errno.ENOENT, "not a Hugging Face model directory (no config.json)", str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype_from_name(dtype, "--dtype"),
                                                     local_files_only=True)
        log.info("HF backend: %s (%s) on %s", path, type(model).__name__, device)
        return cls(model.to(device), device)

    @torch.no_grad()
    def logits(self, token_ids: list[list[int]], last_n: Optional[int] = None) -> torch.Tensor:
        check_rows(token_ids)
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        # logits_to_keep=n computes the LM head on the last n positions only (0 = all).
        out = self.model(input_ids=ids, logits_to_keep=last_n or 0, use_cache=False)
        return out.logits.float().cpu()

    @torch.no_grad()
    def generate_greedy(self, prompt_ids: list[int], max_new_tokens: int,
                        stop_ids: Sequence[int] = (), vocab_size: Optional[int] = None) -> list[int]:
        # transformers' KV cache: one prefill of the long prompt, then one token at a time.
        cache = None

        def forward(new_ids: list[int]) -> torch.Tensor:
            nonlocal cache
            out = self.model(input_ids=torch.tensor([new_ids], dtype=torch.long, device=self.device),
                             past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
            return out.logits[0, -1]

        return greedy_decode(forward, prompt_ids, max_new_tokens, stop_ids, vocab_size)
