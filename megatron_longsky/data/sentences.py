"""Sentence splitting with nltk's Punkt, offline.

Punkt is unsupervised: when an installed model (``punkt_tab``) is found it is used,
otherwise a Punkt model is trained on a sample of the input itself (no download),
together with the English prose every Python carries (``pydoc_data.topics``) so that
a small or repetitive sample does not turn ordinary words into "abbreviations".
Splitting keeps every character: the pieces concatenate back to the document, so
the whitespace between sentences is kept at the end of the sentence before it.
"""

from __future__ import annotations

import logging
from typing import Iterable

log = logging.getLogger(__name__)

DEFAULT_SAMPLE_CHARS = 2_000_000


class SentenceSplitter:
    def __init__(self, punkt, source: str):
        self._punkt = punkt
        self.source = source  # how the model was obtained, for logs and metadata

    def split(self, text: str) -> list[str]:
        starts = [start for start, _ in self._punkt.span_tokenize(text)][1:]
        if not starts:
            return [text]
        bounds = [0, *starts, len(text)]
        return [text[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


# The languages nltk's Punkt models exist for (punkt_tab); --lang names one of them.
PUNKT_LANGUAGES = ("czech", "danish", "dutch", "english", "estonian", "finnish", "french", "german", "greek",
                   "italian", "malayalam", "norwegian", "polish", "portuguese", "russian", "slovene", "spanish",
                   "swedish", "turkish")


def installed_punkt(language: str = "english"):
    """nltk's installed Punkt model for ``language``, or None when absent."""
    import nltk
    from nltk.tokenize.punkt import PunktTokenizer

    try:
        nltk.data.find(f"tokenizers/punkt_tab/{language}/")
    except LookupError:
        return None
    return PunktTokenizer(language)


def reference_prose() -> list[str]:
    """English prose present on any Python installation (may be empty on stripped builds)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return []
    return [topics[name] for name in sorted(topics)]


def train_punkt(texts: Iterable[str], sample_chars: int = DEFAULT_SAMPLE_CHARS, with_reference: bool = True):
    """Train Punkt on up to ``sample_chars`` characters of ``texts`` (plus the reference prose)."""
    from nltk.tokenize.punkt import PunktSentenceTokenizer, PunktTrainer

    trainer = PunktTrainer()
    trainer.INCLUDE_ALL_COLLOCS = True
    if with_reference:
        for text in reference_prose():
            trainer.train(text, finalize=False)
    used = 0
    for text in texts:
        piece = text[: max(0, sample_chars - used)]
        if not piece:
            break
        trainer.train(piece, finalize=False)
        used += len(piece)
    trainer.finalize_training()
    return PunktSentenceTokenizer(trainer.get_params()), used


def load_sentence_splitter(sample_texts: Iterable[str] = (), language: str = "english",
                           sample_chars: int = DEFAULT_SAMPLE_CHARS) -> SentenceSplitter:
    """The installed Punkt model if present, else Punkt trained on ``sample_texts``."""
    punkt = installed_punkt(language)
    if punkt is not None:
        log.info("sentence splitting: nltk's installed punkt_tab model (%s)", language)
        return SentenceSplitter(punkt, f"nltk punkt_tab/{language}")
    punkt, used = train_punkt(sample_texts, sample_chars)
    log.info("sentence splitting: no installed punkt model; trained Punkt on %d characters of the input", used)
    return SentenceSplitter(punkt, f"punkt trained on {used} characters of the input plus pydoc topics")
