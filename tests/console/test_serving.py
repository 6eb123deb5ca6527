"""The console's files as the API serves them: strict security headers, no inline script or markup-from-data,
modules that resolve, nothing under /console that reads data (it is only a client of /v1)."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

from app.console.serve import SECURITY_HEADERS, STATIC_DIR

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
       "frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
SCRIPTS = sorted(STATIC_DIR.rglob("*.js"))


def _secured(response) -> None:
    assert response.headers["content-security-policy"] == CSP
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"


def test_console_page_and_modules_are_served_with_security_headers(client):
    assert client.get("/console", follow_redirects=False).headers["location"].endswith("/console/")
    page = client.get("/console/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="js/main.js">' in page.text
    _secured(page)
    for path in ("js/main.js", "js/pages/job.js", "console.css"):
        asset = client.get(f"/console/{path}")
        assert asset.status_code == 200, path
        _secured(asset)
    assert client.get("/console/js/main.js").headers["content-type"].startswith("text/javascript")
    assert SECURITY_HEADERS["Content-Security-Policy"] == CSP


def test_console_serves_only_its_own_files(client):
    for path in ("/console/../app/settings.py", "/console/%2e%2e/%2e%2e/pyproject.toml", "/console/nope.js"):
        assert client.get(path).status_code == 404, path
    # The console is a client of the API: without a key the API still answers 401 (nothing under /console
    # stands in for it).
    assert client.get("/v1/jobs").status_code == 401
    console_routes = [r for r in client.app.routes if getattr(r, "path", "").startswith("/console")]
    assert [type(r).__name__ for r in console_routes] == ["Mount"]


def test_no_inline_script_and_no_markup_from_strings():
    html = (STATIC_DIR / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\ssrc=)", html), "inline <script> in index.html"
    assert not re.search(r"<[^>]+\s(style|on\w+)=|<style", html), "inline style or event handler in index.html"
    banned = re.compile(r"\.(innerHTML|outerHTML)\b|insertAdjacentHTML|document\.write|\beval\(|new Function\(|"
                        r"setAttribute\(\s*['\"]style|\.cssText\b")
    for script in SCRIPTS:
        code = "\n".join(line for line in script.read_text().splitlines() if not line.lstrip().startswith("//"))
        found = banned.findall(code)
        assert not found, f"{script.name} builds markup or code from strings: {found}"


def test_every_module_import_resolves():
    imports = re.compile(r"""^\s*import\s[^;]*?from\s+["'](\.[^"']+)["']""", re.MULTILINE | re.DOTALL)
    for script in SCRIPTS:
        for target in imports.findall(script.read_text()):
            assert (script.parent / target).resolve().is_file(), f"{script.name} imports missing {target}"


def test_every_console_file_is_packaged():
    """The image installs the project as a wheel (Dockerfile): a file outside the package-data globs would be
    missing from the compose stack's /console."""
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["app.console"]
    for path in STATIC_DIR.rglob("*"):
        if path.is_file():
            relative = path.relative_to(STATIC_DIR.parent).as_posix()
            assert any(fnmatch.fnmatchcase(relative, g) and relative.count("/") == g.count("/") for g in globs), relative
