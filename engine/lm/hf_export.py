"""The ``hf`` export of a causal-LM student: a Hugging Face model directory, zipped flat.

* :func:`export_hf` (model, tokenizer, ``out_zip``) writes ``config.json``, ``generation_config.json``,
  ``model.safetensors`` (or its shards and index) and the tokenizer's files into one zip with no directory prefix,
  members in name order with fixed timestamps, so the same model and tokenizer give the same bytes. Weights are
  safetensors only (nothing that unpickles) and keep the model's dtype: float32 as trained unless the model was cast.
  Returns ``{"files": [...], "bytes": ...}``.
* :func:`verify_hf` (``out_zip``, the in-memory model, example token ids) loads the zip the way a user would,
  ``AutoModelForCausalLM`` / ``AutoTokenizer`` / ``pipeline("text-generation")`` from the unzipped directory with
  ``local_files_only=True`` (never ``trust_remote_code``), compares logits with the in-memory model and generates a
  few tokens; any failure is :class:`ExportFailed` naming the step. Returns ``{"max_abs_diff", "generated"}``.

The result loads in transformers (and the tools built on it: vLLM, TGI, llama.cpp's converter) with no Distillery
code, as DistilGPT2 itself is published.
"""

from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from engine.errors import ExportFailed, error_summary
from engine.inspection.zipcheck import refuse_unsafe_zip

#: Files a transformers model directory may hold whose loading runs pickle; never written, refused when found.
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
#: Fixed member timestamp (the zip format's earliest) so that the archive depends on the files only.
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
#: The prompt :func:`verify_hf` generates from, and how many new tokens it asks for.
PROMPT = "The"
NEW_TOKENS = 4


def export_hf(model: Any, tokenizer: Any, out_zip: Path) -> dict[str, Any]:
    """``model.save_pretrained`` (safetensors) + ``tokenizer.save_pretrained`` zipped flat into ``out_zip``.

    Returns ``{"files": [member names in archive order], "bytes": size of the zip}``. Raises ExportFailed when
    saving fails, when no tokenizer is given (the directory would not load in a pipeline) or when anything but
    safetensors weights appears (a pickled checkpoint is never delivered).
    """
    if tokenizer is None:
        raise ExportFailed("the hf export needs the tokenizer (a model directory without one does not load in "
                           "transformers' text-generation pipeline)")
    out_zip = Path(out_zip)
    with tempfile.TemporaryDirectory(prefix="distillery-hf-") as tmp:
        directory = Path(tmp)
        try:
            # safe_serialization: explicit, though transformers 5 writes safetensors whatever it is told.
            model.save_pretrained(directory, safe_serialization=True)
            tokenizer.save_pretrained(directory)
        except Exception as exc:  # any library failure becomes the export's error
            raise ExportFailed(f"the hf export could not be saved: {error_summary(exc)}") from None
        files = sorted(f for f in directory.rglob("*") if f.is_file())
        pickled = [f.name for f in files if f.name.endswith(PICKLED_SUFFIXES)]
        if pickled:
            raise ExportFailed(f"the hf export would contain pickled weights ({', '.join(pickled)}); only "
                               "safetensors are delivered")
        nested = [str(f.relative_to(directory)) for f in files if f.parent != directory]
        if nested:
            raise ExportFailed(f"the hf export must be flat, but saving wrote {', '.join(nested)}")
        if not any(f.name.endswith(".safetensors") for f in files):
            raise ExportFailed("the hf export has no .safetensors weights after save_pretrained")
        out_zip.parent.mkdir(parents=True, exist_ok=True)
        # Written aside and renamed: a failure half-way never leaves a truncated zip under the export's name.
        partial = out_zip.with_name(out_zip.name + ".partial")
        names = []
        try:
            with zipfile.ZipFile(partial, "w") as z:
                for f in files:
                    info = zipfile.ZipInfo(f.name, date_time=ZIP_EPOCH)
                    info.external_attr = 0o644 << 16  # a regular file, rw-r--r--, whatever the umask was
                    # Weights barely compress and may be gigabytes: stored; the JSON and tokenizer files deflate well.
                    info.compress_type = zipfile.ZIP_STORED if f.suffix == ".safetensors" else zipfile.ZIP_DEFLATED
                    with open(f, "rb") as src, z.open(info, "w", force_zip64=f.stat().st_size > 2**31) as dst:
                        while chunk := src.read(1 << 20):
                            dst.write(chunk)
                    names.append(f.name)
            partial.replace(out_zip)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise ExportFailed(f"the hf export could not be written to {out_zip.name}: {error_summary(exc)}") from None
    return {"files": names, "bytes": out_zip.stat().st_size}


def verify_hf(out_zip: Path, model: Any, example_ids: torch.Tensor, *, atol: float = 1e-4) -> dict[str, Any]:
    """Reload the ``hf`` export as a user would and check it against ``model``.

    Unzips ``out_zip`` (after the engine's archive check) to a temporary directory, loads it with
    ``AutoModelForCausalLM`` and ``AutoTokenizer`` (``local_files_only=True``), requires every weight to be found
    (no missing, unexpected or reshaped tensor: transformers would otherwise initialise them at random), compares
    the logits on ``example_ids`` (int64 [batch, seq]) with ``model``'s in eval mode (its own mode is restored), and
    generates a few tokens greedily through ``pipeline("text-generation", device="cpu")``.

    Returns ``{"max_abs_diff": float, "generated": str}``; raises ExportFailed naming the step that failed.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    out_zip = Path(out_zip)
    refuse_unsafe_zip(out_zip, "export_failed", "the hf export")
    with tempfile.TemporaryDirectory(prefix="distillery-hf-verify-") as tmp:
        directory = Path(tmp)
        with zipfile.ZipFile(out_zip) as z:
            nested = [name for name in z.namelist() if "/" in name]
            if nested:
                raise ExportFailed(f"the hf export must be flat, found {', '.join(nested[:5])}")
            z.extractall(directory)
        try:
            loaded, info = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True,
                                                                output_loading_info=True)
        except Exception as exc:
            raise ExportFailed(f"the hf export does not load with AutoModelForCausalLM: {error_summary(exc)}") from None
        problems = {kind: sorted(map(str, info.get(kind) or ())) for kind in ("missing_keys", "unexpected_keys",
                                                                              "mismatched_keys", "error_msgs")}
        problems = {kind: keys for kind, keys in problems.items() if keys}
        if problems:
            detail = "; ".join(f"{kind}: {', '.join(keys[:5])}" + (" ..." if len(keys) > 5 else "")
                               for kind, keys in problems.items())
            raise ExportFailed(f"the hf export's weights do not match its config ({detail})")
        try:
            AutoTokenizer.from_pretrained(directory, local_files_only=True)
        except Exception as exc:
            raise ExportFailed(f"the hf export's tokenizer does not load with AutoTokenizer: "
                               f"{error_summary(exc)}") from None

        max_abs_diff = _logit_difference(loaded, model, example_ids)
        if not max_abs_diff <= atol:  # also catches NaN
            raise ExportFailed(f"the hf export's logits differ from the trained model's by {max_abs_diff:.3g} "
                               f"(more than {atol:g})")
        del loaded
        try:
            generator = pipeline("text-generation", model=str(directory), tokenizer=str(directory), device="cpu",
                                 local_files_only=True)
            # pipeline() reads local_files_only for its loads but also leaves it among the generation arguments,
            # where generate() rejects it (transformers 5.x); it has done its job once the pipeline is built.
            for params in (getattr(generator, "_preprocess_params", None), getattr(generator, "_forward_params", None)):
                if isinstance(params, dict):
                    params.pop("local_files_only", None)
            # min_new_tokens: a tiny model may well predict EOS first; the check is that generation runs.
            out = generator(PROMPT, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
            generated = out[0]["generated_text"]
        except Exception as exc:
            raise ExportFailed(f"the hf export does not generate with transformers' text-generation pipeline: "
                               f"{error_summary(exc)}") from None
        if not isinstance(generated, str):
            raise ExportFailed(f"the hf export's text-generation pipeline returned {type(generated).__name__}, "
                               "not text")
    return {"max_abs_diff": max_abs_diff, "generated": generated}


def _logit_difference(loaded: Any, model: Any, example_ids: torch.Tensor) -> float:
    """max |logits(loaded) - logits(model)| over ``example_ids``, both in eval mode, compared in float32 on the CPU."""
    was_training = model.training
    model.eval()
    loaded.eval()
    try:
        ids = example_ids.to(torch.long)
        device = next(model.parameters()).device
        with torch.no_grad():
            expected = model(input_ids=ids.to(device)).logits.float().cpu()
            got = loaded(input_ids=ids.cpu()).logits.float()
    except Exception as exc:
        raise ExportFailed(f"the hf export could not be compared with the trained model: {error_summary(exc)}") from None
    finally:
        model.train(was_training)
    if got.shape != expected.shape:
        raise ExportFailed(f"the hf export's logits have shape {tuple(got.shape)}, the trained model's "
                           f"{tuple(expected.shape)}")
    return float((got - expected).abs().max())
