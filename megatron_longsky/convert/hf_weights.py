"""Read Hugging Face weight files one tensor at a time.

safetensors (a single ``model.safetensors`` or shards listed in
``model.safetensors.index.json``) are memory-mapped: a tensor is read when asked for.
Pickle ``.bin`` files run code when loaded, so they are refused unless the caller
opts in (``allow_pickle``); even then they load with ``weights_only=True``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_longsky.convert.hf_config import ConversionError

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"


def _read_index(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        weight_map = data["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ConversionError(f"{path}: not a weight index with a 'weight_map' ({exc})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) and v
                                                   for k, v in weight_map.items()):
        raise ConversionError(f"{path}: 'weight_map' must map each tensor name to a shard file name, "
                              f"got {type(weight_map).__name__} {str(weight_map)[:80]}")
    missing = sorted({f for f in weight_map.values() if not (path.parent / f).exists()})
    if missing:
        raise ConversionError(f"{path} names shard file(s) that do not exist: {missing}")
    return dict(weight_map)


class HFWeights:
    """``names()`` lists the tensors; ``get(name)`` reads one (a CPU tensor)."""

    def __init__(self, hf_dir: str | Path, allow_pickle: bool = False):
        self.dir = Path(hf_dir)
        self._handles: dict[str, object] = {}
        self._pickled: dict[str, dict] = {}
        if (self.dir / SAFE_INDEX).exists():
            self.weight_map = _read_index(self.dir / SAFE_INDEX)
            self.kind = "safetensors"
        elif (self.dir / SAFE_SINGLE).exists():
            self.kind = "safetensors"
            self.weight_map = {name: SAFE_SINGLE for name in self._open(SAFE_SINGLE).keys()}
        elif (self.dir / PICKLE_INDEX).exists() or (self.dir / PICKLE_SINGLE).exists():
            if not allow_pickle:
                raise ConversionError(
                    f"{self.dir} holds pickle (.bin) weights only; loading a pickle can execute code. "
                    "Convert them to safetensors, or pass --allow-pickle if you trust the source"
                )
            self.kind = "pickle"
            if (self.dir / PICKLE_INDEX).exists():
                self.weight_map = _read_index(self.dir / PICKLE_INDEX)
            else:
                self.weight_map = {name: PICKLE_SINGLE for name in self._load_pickle(PICKLE_SINGLE)}
        else:
            raise ConversionError(
                f"{self.dir}: no weights found (expected {SAFE_SINGLE}, {SAFE_INDEX} or pickle .bin files)"
            )

    def _open(self, file: str):
        if file not in self._handles:
            from safetensors import safe_open

            try:
                self._handles[file] = safe_open(str(self.dir / file), framework="pt", device="cpu")
            except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
                raise ConversionError(f"{self.dir / file}: cannot read safetensors ({exc})") from exc
        return self._handles[file]

    def _load_pickle(self, file: str) -> dict:
        if file not in self._pickled:
            # mmap keeps untouched tensors on disk; weights_only refuses arbitrary objects.
            self._pickled[file] = torch.load(self.dir / file, map_location="cpu", mmap=True, weights_only=True)
        return self._pickled[file]

    def names(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise ConversionError(f"{self.dir}: tensor {name!r} not found in the checkpoint")
        file = self.weight_map[name]
        if self.kind == "safetensors":
            handle = self._open(file)
            try:
                return handle.get_tensor(name)
            except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
                raise ConversionError(f"{self.dir / file}: cannot read tensor {name!r} ({exc})") from None
        tensors = self._load_pickle(file)
        if name not in tensors:
            raise ConversionError(f"{self.dir / file}: tensor {name!r} listed in the index is not in the file")
        return tensors[name]

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.weight_map:
            raise ConversionError(f"{self.dir}: tensor {name!r} not found in the checkpoint")
        if self.kind == "safetensors":
            file = self.weight_map[name]
            handle = self._open(file)
            try:
                return tuple(handle.get_slice(name).get_shape())
            except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
                raise ConversionError(f"{self.dir / file}: cannot read tensor {name!r} ({exc})") from None
        return tuple(self.get(name).shape)
