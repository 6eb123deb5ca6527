"""engine/ may only import torch, numpy, onnx, onnxruntime, safetensors, pyarrow, PIL, transformers, tokenizers, gguf, the
standard library, ``jobspec`` (the job spec's pydantic models) and ``safezip`` (the stdlib-only archive check it shares with the API), and must never
unpickle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[2] / "engine"
ALLOWED = {"torch_pruning", "matplotlib", "torch", "numpy", "onnx", "onnxruntime", "safetensors", "pyarrow", "PIL",
           "safezip", "engine", "jobspec", "pydantic", "transformers", "tokenizers", "gguf"}


def _modules():
    for path in sorted(ENGINE.rglob("*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def test_imports_stay_inside_the_layer():
    stdlib = set(sys.stdlib_module_names)
    bad = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: inside the engine package
                    continue
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in ALLOWED and top not in stdlib:
                    bad.append(f"{path.name}: {name}")
    assert not bad, bad


def test_nothing_is_unpickled():
    bad = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in {"pickle", "dill", "cloudpickle", "joblib"} for n in names):
                    bad.append(f"{path.name}:{node.lineno} imports a pickle module")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                kw = {k.arg: k.value for k in node.keywords}
                target = ast.unparse(node.func)
                if target == "torch.load" and not (
                    isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                ):
                    bad.append(f"{path.name}:{node.lineno} torch.load without weights_only=True")
                if target in {"np.load", "numpy.load"} and not (
                    isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is False
                ):
                    bad.append(f"{path.name}:{node.lineno} np.load without allow_pickle=False")
    assert not bad, bad


def test_importing_the_package_does_not_import_torch():
    code = "import sys, engine; assert 'torch' not in sys.modules, 'torch imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ENGINE.parents[1], timeout=60)
