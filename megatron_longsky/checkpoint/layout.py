"""Where things live in a checkpoint directory.

    <root>/latest                      names the newest *complete* iteration directory;
                                       rewritten atomically only after it is fully saved
    <root>/iter_0000100/config.yaml    the job config: model:, tokenizer:, parallel:, ...
    <root>/iter_0000100/model/         megatron-core dist_checkpointing of the model
    <root>/iter_0000100/optimizer/     dist_checkpointing of the optimizer (training only)
    <root>/iter_0000100/trainer/       scheduler, data position, RNG states (training only)

A model-only checkpoint (e.g. made by ``convert_checkpoint.py import``) has just
``config.yaml`` and ``model/``.

Only complete iterations carry an ``iter_N`` name: a save is staged as
``.iter_N.partial`` and renamed in, pruning renames ``iter_N`` to ``.iter_N.deleting``
before deleting it, and :func:`clean_checkpoint_root` (run when training starts)
removes what a killed process left: staging and trash directories, ``latest``
temporaries, and any ``iter_N`` that is incomplete. Both load at any TP/PP layout: dist_checkpointing
stores global tensors and reshards on load.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import yaml

from megatron_longsky.config import ConfigError, load_yaml
from megatron_longsky.errors import UserError

from megatron_longsky.utils.atomic import atomic_write_text

ITERATION_PREFIX = "iter_"
LATEST = "latest"
CONFIG = "config.yaml"
MODEL = "model"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")


class CheckpointError(UserError, ValueError):
    """A checkpoint path that does not hold what it should."""


def iteration_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"{ITERATION_PREFIX}{iteration:07d}"


def write_latest(root: str | Path, iteration: int) -> None:
    atomic_write_text(Path(root) / LATEST, iteration_dir(root, iteration).name + "\n")


def read_latest(root: str | Path) -> Path | None:
    path = Path(root) / LATEST
    if not path.exists():
        return None
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file (it should name an iteration directory)")
    data = path.read_bytes()[:4096]
    try:
        name = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not UTF-8 text ({data[:40]!r}): it should name an iteration "
                              "directory such as iter_0000100") from None
    if not _ITER_RE.match(name):
        raise CheckpointError(f"{path}: does not name an iteration directory: {name[:80]!r}")
    target = Path(root) / name
    if not (target / MODEL).is_dir():
        raise CheckpointError(f"{path} points at {target}, which has no {MODEL}/ directory")
    if not is_complete_iteration(target):
        missing = [str(p.relative_to(target)) for p in _required_files(target) if not p.is_file()]
        raise CheckpointError(f"{path} points at {target}, which is incomplete (missing {', '.join(missing)}): "
                              "a truncated or half-copied checkpoint")
    return target


def is_complete_iteration(ckpt_dir: str | Path) -> bool:
    """Whether ``ckpt_dir`` holds every file a save writes last in each part (so not a
    directory a killed prune left half deleted)."""
    return all(path.is_file() for path in _required_files(ckpt_dir))


def _required_files(ckpt_dir: str | Path) -> list[Path]:
    ckpt_dir = Path(ckpt_dir)
    required = [ckpt_dir / CONFIG, ckpt_dir / MODEL / "metadata.json"]
    if (ckpt_dir / "trainer").exists() or (ckpt_dir / "optimizer").exists():  # a training checkpoint
        required += [ckpt_dir / "trainer" / "state.json", ckpt_dir / "optimizer" / "metadata.json"]
    return required


def list_iterations(root: str | Path) -> list[int]:
    """The complete iterations under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _ITER_RE.match(child.name)
        if match and child.is_dir() and is_complete_iteration(child):
            found.append(int(match.group(1)))
    return sorted(found)


_TRASH_SUFFIX = ".deleting"


def remove_tree(path: Path) -> None:
    """Delete a directory so that a kill midway never leaves it under its own name."""
    trash = path.with_name(f".{path.name.lstrip('.')}{_TRASH_SUFFIX}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def clean_checkpoint_root(root: str | Path) -> list[str]:
    """Remove what a killed save or prune left in ``root``; returns the names removed.

    Call from one process, before the run reads or writes checkpoints. A re-save of an
    iteration killed between its two renames (``iter_N`` moved to ``.iter_N.old``, the new
    one not yet in) gets the old one back."""
    root = Path(root)
    if not root.is_dir():
        return []
    removed = []
    for child in sorted(root.iterdir()):
        name = child.name
        if name.startswith(f".{LATEST}.tmp"):
            child.unlink(missing_ok=True)
        elif name.startswith(f".{ITERATION_PREFIX}") and name.endswith(".old"):
            final = root / name[1:-len(".old")]
            if not final.exists() and is_complete_iteration(child):
                os.replace(child, final)
                continue
            shutil.rmtree(child, ignore_errors=True)
        elif name.startswith(f".{ITERATION_PREFIX}") and name.endswith((".partial", _TRASH_SUFFIX)):
            shutil.rmtree(child, ignore_errors=True)
        elif _ITER_RE.match(name) and child.is_dir() and not is_complete_iteration(child):
            remove_tree(child)
        else:
            continue
        removed.append(name)
    return removed


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint root (with ``latest``) or an iteration directory -> the iteration directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if (path / MODEL).is_dir():
        if not is_complete_iteration(path):
            missing = [str(p.relative_to(path)) for p in _required_files(path) if not p.is_file()]
            raise CheckpointError(f"checkpoint {path} is incomplete (missing {', '.join(missing)}): "
                                  "a truncated or half-copied checkpoint")
        return path
    latest = read_latest(path)
    if latest is not None:
        return latest
    raise CheckpointError(
        f"{path} is neither a checkpoint root with a '{LATEST}' file nor an iteration "
        f"directory with a '{MODEL}/' subdirectory"
    )


def write_checkpoint_config(ckpt_dir: str | Path, config: dict) -> None:
    atomic_write_text(Path(ckpt_dir) / CONFIG, yaml.safe_dump(config, sort_keys=False))


# The files of a tokenizer directory (Hugging Face, sentencepiece) a checkpoint keeps a copy of.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
)
TOKENIZER_DIR = "tokenizer"


def store_tokenizer(ckpt_dir: str | Path, entry: dict) -> dict:
    """Copy the tokenizer that ``entry`` (a ``tokenizer:`` config: type, model, merges) names
    into ``<ckpt_dir>/tokenizer/`` and return the entry with paths relative to the checkpoint,
    so the checkpoint carries its tokenizer wherever it moves (``convert export``, ``needle``
    from another directory, after the original files moved). An entry naming no file (the
    byte tokenizer) or files already inside a checkpoint comes back unchanged."""
    ckpt_dir = Path(ckpt_dir)
    model, merges = entry.get("model"), entry.get("merges")
    if not model or not Path(model).exists():
        return dict(entry)
    source = Path(model)
    target = ckpt_dir / TOKENIZER_DIR
    target.mkdir(parents=True, exist_ok=True)
    if source.is_dir():  # a Hugging Face tokenizer directory
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, target / name)
        stored = {**entry, "model": TOKENIZER_DIR}
    else:
        # tokenizer.json reads its directory's config files (special tokens, chat template) too.
        siblings = [n for n in TOKENIZER_FILES if n != source.name] if source.name == "tokenizer.json" else []
        for name in siblings:
            if (source.parent / name).is_file():
                shutil.copy2(source.parent / name, target / name)
        shutil.copy2(source, target / source.name)
        stored = {**entry, "model": f"{TOKENIZER_DIR}/{source.name}"}
    if merges and Path(merges).is_file():
        shutil.copy2(merges, target / Path(merges).name)
        stored["merges"] = f"{TOKENIZER_DIR}/{Path(merges).name}"
    return stored


def read_checkpoint_config(ckpt_dir: str | Path) -> dict:
    """The checkpoint's ``config.yaml``. Files kept inside the checkpoint (e.g. an imported
    model's ``tokenizer/``) are recorded relative to it and returned as paths that
    exist wherever the checkpoint now lives."""
    path = Path(ckpt_dir) / CONFIG
    if not path.exists():
        raise CheckpointError(f"{path} is missing: not a megatron_longsky checkpoint")
    try:
        data = load_yaml(path)
    except ConfigError as exc:  # invalid YAML or text, a top level that is not a mapping
        raise CheckpointError(f"checkpoint config {exc}") from None
    tokenizer = data.get("tokenizer")
    if isinstance(tokenizer, dict):
        for key in ("model", "merges"):
            if isinstance(tokenizer.get(key), str):
                inside = Path(ckpt_dir) / tokenizer[key]
                if not Path(tokenizer[key]).is_absolute() and inside.exists():
                    tokenizer = {**tokenizer, key: str(inside)}
        data["tokenizer"] = tokenizer
    return data


def prune_checkpoints(root: str | Path, keep: int) -> list[int]:
    """Delete all but the newest ``keep`` iterations (never the one ``latest`` names)."""
    if keep <= 0:
        return []
    latest = read_latest(root)
    iterations = list_iterations(root)
    removed = []
    for it in iterations[:-keep]:
        target = iteration_dir(root, it)
        if latest is not None and target.resolve() == latest.resolve():
            continue
        remove_tree(target)
        removed.append(it)
    return removed
