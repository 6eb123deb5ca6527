"""The SDK is its own distribution: importing it (and the CLI) pulls in neither torch nor the server.

Run here in the project's environment, where torch and the server's packages *are* installed, so an import
of them anywhere in the SDK would show. tests/client/test_e2e.py installs it into a venv that lacks them.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

CLIENT = Path(__file__).resolve().parents[2] / "client"
SERVER_PACKAGES = {"torch", "numpy", "app", "worker", "engine", "jobspec", "fastapi", "pydantic", "sqlalchemy",
                   "celery"}


def test_importing_the_sdk_and_cli_imports_nothing_of_the_server(tmp_path):
    code = ("import sys; import distillery_client, distillery_client.cli, distillery_client.cli.commands; "
            "print('\\n'.join(sys.modules))")
    # From an empty directory: the repository root on sys.path would make the server's packages importable.
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    loaded = {m.split(".")[0] for m in out.stdout.split()}
    assert "distillery_client" in loaded and "httpx" in loaded
    assert not loaded & SERVER_PACKAGES, loaded & SERVER_PACKAGES


def test_the_distribution_depends_on_httpx_only():
    project = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "distillery-client"
    assert [d.split(">")[0] for d in project["dependencies"]] == ["httpx"]
    assert [d.split(">")[0] for d in project["optional-dependencies"]["cli"]] == ["rich"]
    assert project["scripts"] == {"distill": "distillery_client.cli:main"}
