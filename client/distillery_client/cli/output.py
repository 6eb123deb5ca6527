"""What ``distill`` prints: the API's JSON with ``--json``, rich tables otherwise; errors as one plain line.

rich is imported only for human output, so ``--json`` works with the bare SDK installed.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from distillery_client.types import APIObject, Job

#: A column: its title, and the object's field name or a function of the object.
Column = tuple[str, "str | Callable[[Any], Any]"]

INSTALL_HINT = "pip install 'distillery-client[cli]'"


class RichMissing(RuntimeError):
    def __init__(self) -> None:
        super().__init__(f"tables and progress bars need the 'rich' package: {INSTALL_HINT} (or pass --json)")


def job_kind(job: Job) -> str:
    steps = job.spec.get("steps") if isinstance(job.spec, dict) else None
    return "+".join(str(s.get("kind", "?")) for s in steps if isinstance(s, dict)) if isinstance(steps, list) else ""


def job_fraction(job: Job) -> str:
    return f"{job.progress.fraction:.0%}" if job.progress is not None and job.progress.fraction is not None else ""


MODEL_COLUMNS: Sequence[Column] = [("id", "id"), ("name", "name"), ("format", "format"), ("task", "task"),
                                   ("parameters", "num_parameters"), ("bytes", "size_bytes"), ("created", "created_at")]
DATASET_COLUMNS: Sequence[Column] = [("id", "id"), ("name", "name"), ("format", "format"), ("rows", "num_rows"),
                                     ("labels", "has_labels"), ("bytes", "size_bytes"), ("created", "created_at")]
JOB_COLUMNS: Sequence[Column] = [("id", "id"), ("status", "status"), ("kind", job_kind), ("done", job_fraction),
                                 ("created", "created_at"), ("error", lambda j: j.error.code if j.error else "")]
ARTIFACT_COLUMNS: Sequence[Column] = [("id", "id"), ("kind", "kind"), ("format", "format"), ("step", "step_index"),
                                      ("file", "filename"), ("bytes", "size_bytes"),
                                      ("sha256", lambda a: a.sha256[:16])]
METRIC_COLUMNS: Sequence[Column] = [("step", "step"), ("epoch", "epoch"), ("name", "name"),
                                    ("value", lambda m: f"{m.value:.6g}")]
WEBHOOK_COLUMNS: Sequence[Column] = [("id", "id"), ("url", "url"), ("events", lambda w: ", ".join(w.events)),
                                     ("enabled", "enabled"), ("created", "created_at")]
DELIVERY_COLUMNS: Sequence[Column] = [("id", "id"), ("event", "event_type"), ("status", "status"),
                                      ("attempts", "attempt"), ("HTTP", "response_status"),
                                      ("ms", "latency_ms"), ("next attempt", "next_attempt_at"), ("error", "last_error")]


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


class Output:
    def __init__(self, as_json: bool):
        self.as_json = as_json
        self._console: Any = None

    @property
    def console(self) -> Any:
        """The rich console for human output (RichMissing when rich is not installed)."""
        if self._console is None:
            try:
                from rich.console import Console
            except ImportError:
                raise RichMissing() from None
            self._console = Console(highlight=False)
        return self._console

    def print_json(self, value: Any, *, lines: bool = False) -> None:
        """``value`` (objects as the API sent them) as indented JSON, or as one compact line."""
        value = value.to_dict() if isinstance(value, APIObject) else value
        if isinstance(value, list):
            value = [v.to_dict() if isinstance(v, APIObject) else v for v in value]
        print(json.dumps(value, separators=(",", ":")) if lines else json.dumps(value, indent=2), flush=True)

    def new_table(self, **options: Any) -> Any:
        """A rich Table (RichMissing first when rich is not installed)."""
        self.console  # noqa: B018 - raises RichMissing before the import below would fail less clearly
        from rich.table import Table

        return Table(**options)

    def show(self, obj: APIObject, title: str | None = None) -> None:
        """One object: JSON, or a two-column table of its fields."""
        if self.as_json:
            return self.print_json(obj)
        table = self.new_table(show_header=False, title=title, title_justify="left")
        table.add_column(style="bold")
        table.add_column(overflow="fold")
        for key, value in obj.to_dict().items():
            table.add_row(key, cell(value))
        self.console.print(table)

    def table(self, items: Iterable[APIObject], columns: Sequence[Column]) -> None:
        """A list: a JSON array, or a table with ``columns``."""
        rows = list(items)
        if self.as_json:
            return self.print_json(rows)
        table = self.new_table()
        for title, _ in columns:
            table.add_column(title, overflow="fold")
        for obj in rows:
            table.add_row(*(cell(getattr(obj, get) if isinstance(get, str) else get(obj)) for _, get in columns))
        self.console.print(table)

    def outcome(self, value: Any, text: str) -> None:
        """The result of an action: ``value`` as JSON, or ``text`` for people."""
        if self.as_json:
            self.print_json(value)
        else:
            self.say(text)

    def say(self, text: str) -> None:
        """A line for people (nothing with --json: stdout stays parseable)."""
        if not self.as_json:
            self.console.print(text, markup=False)


def error(text: str) -> None:
    """An error line on stderr (plain: it must print even without rich)."""
    print(f"distill: error: {text}", file=sys.stderr, flush=True)
