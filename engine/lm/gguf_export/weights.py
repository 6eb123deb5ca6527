"""Reading the Hugging Face model directory: its JSON files, and the safetensors weights (one file or shards)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.errors import ExportFailed, Unsupported


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportFailed(f"{what}: {path.name} is missing from the model directory") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportFailed(f"{what}: {path.name} is not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise ExportFailed(f"{what}: {path.name} is not a JSON object")
    return data


class _Weights(contextlib.AbstractContextManager):
    """The checkpoint's tensors by name, opened lazily (safetensors memory-maps; one tensor is read at a time)."""

    def __init__(self, model_dir: Path):
        self._stack = contextlib.ExitStack()
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._get: dict[str, Callable[[], Any]] = {}
        self.source = ""
        try:
            self._open(model_dir)
        except (ExportFailed, Unsupported):
            self._stack.close()
            raise
        except Exception as e:  # a corrupt safetensors header, a bad pickle: the input is broken
            self._stack.close()
            raise ExportFailed(f"cannot read the model weights ({self.source or 'model directory'}): "
                               f"{type(e).__name__}: {e}") from None

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _open(self, model_dir: Path) -> None:
        from safetensors import safe_open

        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index, "model weights").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ExportFailed("model.safetensors.index.json has no weight_map")
            parts = sorted(set(map(str, weight_map.values())))
            missing = [p for p in parts if not (model_dir / p).is_file() or Path(p).name != p]
            if missing:
                raise ExportFailed(f"model weights: shard(s) {', '.join(missing)} named in model.safetensors.index.json "
                                   f"are missing")
        elif (model_dir / "model.safetensors").is_file():
            weight_map, parts = None, ["model.safetensors"]
        else:
            raise ExportFailed("model weights: no model.safetensors (or shards with model.safetensors.index.json) in the "
                               "model directory")
        for part in parts:
            self.source = part
            f = self._stack.enter_context(safe_open(str(model_dir / part), framework="pt"))
            for name in f.keys():
                if name in self.shapes:
                    raise ExportFailed(f"model weights: tensor {name!r} appears in more than one shard")
                self.shapes[name] = tuple(f.get_slice(name).get_shape())
                self._get[name] = lambda f=f, name=name: f.get_tensor(name)
        if weight_map is not None and set(weight_map) != set(self.shapes):
            lost = sorted(set(weight_map) - set(self.shapes))[:5]
            extra = sorted(set(self.shapes) - set(weight_map))[:5]
            raise ExportFailed(f"model weights: the shards do not match model.safetensors.index.json (missing {lost}, "
                               f"not indexed {extra})")

    def load(self, name: str) -> Any:
        return self._get[name]()
