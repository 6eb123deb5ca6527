"""What a zipped Hugging Face model directory may hold (format ``hf_transformers``). Standard library only.

The API checks an upload with :func:`check_hf_archive` before it is stored, and the engine again before
``from_pretrained`` sees the extracted directory. Only data is accepted: ``config.json``, weights as
``*.safetensors`` (sharded with ``model.safetensors.index.json``), tokenizer and generation files. Refused,
each with what to upload instead:

- Python code (``*.py``, compiled modules) and ``auto_map`` in a config: ``trust_remote_code`` would import it;
- pickles (``pytorch_model.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``, ``*.pkl``, ``training_args.bin``): loading them
  runs code;
- other frameworks' weights (``*.h5``, ``*.msgpack``), since they bring no safetensors.

The archive may hold the files at its root or inside one top-level folder (``zip -r model.zip my-model/``).
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable

#: Suffixes of files that run code when loaded or imported.
CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".so", ".dll", ".dylib", ".pyd", ".sh")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib", ".npy", ".npz")
OTHER_WEIGHTS = (".h5", ".msgpack", ".gguf", ".onnx")
#: Configs that ``from_pretrained`` reads and that could name remote code (``auto_map``).
CONFIG_FILES = ("config.json", "tokenizer_config.json", "generation_config.json", "processor_config.json",
                "preprocessor_config.json")
MAX_CONFIG_BYTES = 16 * 1024 * 1024
HOW_TO_SAVE = ("Save the model with model.save_pretrained(dir, safe_serialization=True) and "
               "tokenizer.save_pretrained(dir), then zip the directory.")


class NotAnHFModel(ValueError):
    """The archive is not an acceptable Hugging Face model directory; the message says why and what to do."""


def hf_root(names: Iterable[str]) -> str | None:
    """The folder inside the archive that holds ``config.json`` (``""`` for the root), or None when there is
    none at the root or one level down."""
    names = [n for n in names if not n.endswith("/")]
    if "config.json" in names:
        return ""
    tops = {n.split("/", 1)[0] for n in names if "/" in n}
    for top in sorted(tops):
        if f"{top}/config.json" in names:
            return top + "/"
    return None


def check_hf_members(names: Iterable[str]) -> str:
    """Refuse code, pickles and other frameworks' weights; require ``config.json`` and safetensors weights.
    Returns the root folder (see :func:`hf_root`); raises :class:`NotAnHFModel`."""
    names = [n for n in names if not n.endswith("/")]
    root = hf_root(names)
    if root is None:
        raise NotAnHFModel(f"no config.json at the archive's root or in one top-level folder. {HOW_TO_SAVE}")
    for name in names:
        base = posixpath.basename(name).lower()
        if base.endswith(CODE_SUFFIXES):
            raise NotAnHFModel(f"{name!r} is code: Distillery never runs a model's own code (trust_remote_code); "
                               f"only architectures built into transformers are accepted. Remove it.")
        if base.endswith(PICKLE_SUFFIXES):
            raise NotAnHFModel(f"{name!r} is a pickle (torch.save / pytorch_model.bin): loading it would run code "
                               f"from the file, so it is refused. {HOW_TO_SAVE}")
        if base.endswith(OTHER_WEIGHTS):
            raise NotAnHFModel(f"{name!r} holds weights in another format; the model's weights must be "
                               f"*.safetensors. {HOW_TO_SAVE}")
    if not any(n.startswith(root) and n.lower().endswith(".safetensors") for n in names):
        raise NotAnHFModel(f"no *.safetensors weights next to config.json. {HOW_TO_SAVE}")
    return root


def check_hf_config(name: str, data: bytes) -> dict:
    """Parse one of :data:`CONFIG_FILES`; refuse ``auto_map`` / remote code. Returns the parsed object."""
    if len(data) > MAX_CONFIG_BYTES:
        raise NotAnHFModel(f"{name} is larger than {MAX_CONFIG_BYTES // 2**20} MiB")
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NotAnHFModel(f"{name} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise NotAnHFModel(f"{name} must hold a JSON object")
    if "auto_map" in value or value.get("trust_remote_code"):
        raise NotAnHFModel(f"{name} names custom code (auto_map): Distillery never runs a model's own code "
                           f"(trust_remote_code); use an architecture built into transformers")
    if posixpath.basename(name) == "config.json":
        model_type = value.get("model_type")
        if not isinstance(model_type, str) or not model_type:
            raise NotAnHFModel("config.json has no 'model_type' (save it with save_pretrained)")
    return value
