"""The directory where the API processes keep their Prometheus samples (prometheus_client multiprocess mode).

Kept apart from :mod:`app.api.prometheus` on purpose: importing that module creates the metrics (and their
files), so the process that starts the server empties the directory through this one first.
"""

from __future__ import annotations

import os
from pathlib import Path

from app.settings import Settings


def configure(settings: Settings) -> Path:
    """Point prometheus_client's multiprocess mode at the settings' metrics dir (made if missing)."""
    path = settings.resolved_metrics_dir
    path.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    return path


def prepare(settings: Settings) -> Path:
    """Empty the metrics dir before the server's processes start (what earlier servers left would be summed);
    call before anything in this process imports :mod:`app.api.prometheus`."""
    path = configure(settings)
    for f in path.glob("*.db"):
        f.unlink(missing_ok=True)
    return path
