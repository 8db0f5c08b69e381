"""Backends for evaluation tests whose answers are computed from the prompt.

:class:`CopyBackend` is an induction head written out in code: at each position it
finds the most recent earlier occurrence of the longest suffix (up to ``max_ngram``
tokens) of the text so far, looking back at most ``window`` tokens, and puts its
logit mass on the token that followed it. With the needle templates (answer prefix
= the needle's own words up to the value) it retrieves the needle's value exactly
when the needle is inside its window, and fails otherwise: a model built to pass
and, with a short window, one built to fail on deep needles.
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_longsky.eval.backends import LogitsBackend, check_rows


class CopyBackend(LogitsBackend):
    def __init__(self, vocab_size: int, window: int | None = None, max_ngram: int = 64, fallback: int = 0):
        self.vocab_size = vocab_size
        self.window = window
        self.max_ngram = max_ngram
        self.fallback = fallback
        self.calls = 0

    def predict(self, arr: np.ndarray, t: int) -> int:
        lo = 0 if self.window is None else max(0, t - self.window)
        cands = np.nonzero(arr[lo:t] == arr[t])[0] + lo
        k = 1
        while len(cands) > 1 and k < self.max_ngram and t - k >= 0:
            ok = cands - k >= 0
            ok[ok] = arr[cands[ok] - k] == arr[t - k]
            if not ok.any():
                break
            cands = cands[ok]
            k += 1
        if len(cands) == 0:
            return self.fallback
        return int(arr[cands.max() + 1])

    def logits(self, token_ids, last_n=None):
        length = check_rows(token_ids)
        self.calls += 1
        n = length if last_n is None else last_n
        out = torch.zeros(len(token_ids), n, self.vocab_size)
        for b, row in enumerate(token_ids):
            arr = np.asarray(row, dtype=np.int64)
            for i, t in enumerate(range(length - n, length)):
                out[b, i, self.predict(arr, t)] = 10.0
        return out


class SolverBackend(CopyBackend):
    """Answers RULER-style questions by parsing the prompt text (byte tokenizer only).

    ``solvers`` map a regex that ends the prompt (the answer prefix) to a function
    ``(text_before_the_prefix, match) -> answer``; the backend then emits
    ``" " + answer`` byte by byte and EOD. Prompts no solver recognises fall back to
    the copying induction head (needle tasks).
    """

    def __init__(self, tokenizer, solvers, **copy_kwargs):
        super().__init__(tokenizer.vocab_size, **copy_kwargs)
        self.tokenizer = tokenizer
        self.solvers = solvers

    def predict(self, arr, t):
        text = self.tokenizer.decode(arr[: t + 1].tolist())
        for pattern, solve in self.solvers:
            matches = list(pattern.finditer(text))
            if matches:
                m = matches[-1]
                full = " " + solve(text[: m.start()], m)
                produced = text[m.end():]
                if len(produced) < len(full) and full.startswith(produced):
                    return ord(full[len(produced)])
                return self.tokenizer.eod_id
        return super().predict(arr, t)
