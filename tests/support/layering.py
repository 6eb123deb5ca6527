"""Which forbidden packages a package's modules pull in — every module of it, not only its ``__init__``.

One subprocess imports the package's modules one by one (``pkgutil.walk_packages``) and, after each, names
the forbidden top-level packages that appeared in ``sys.modules``, so a violation points at the module that
caused it (the first one to import it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

_PROBE = r"""
import importlib, json, pkgutil, sys
package, forbidden = sys.argv[1], set(sys.argv[2].split(","))
root = importlib.import_module(package)
names = [package] + sorted(m.name for m in pkgutil.walk_packages(root.__path__, package + "."))
seen, found = set(), {}
for name in names:
    importlib.import_module(name)
    loaded = {m.split(".")[0] for m in sys.modules} & forbidden
    if loaded - seen:
        found[name] = sorted(loaded - seen)
        seen |= loaded
print(json.dumps({"modules": names, "violations": found}))
"""


def forbidden_imports(package: str, forbidden: set[str], pythonpath: str | None = None) -> tuple[list[str], dict]:
    """(every module imported, {module: [forbidden packages it brought in]})."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-c", _PROBE, package, ",".join(sorted(forbidden))],
                         capture_output=True, text=True, env=env, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["modules"], result["violations"]
