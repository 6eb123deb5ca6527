"""The ``distill`` commands: each takes the client, the output and the parsed arguments, and returns the exit
status (None: 0). Errors are raised; ``distillery_client.cli.main`` turns them into a message and a status."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from distillery_client import Client
from distillery_client.cli import output as o
from distillery_client.cli.output import Output
from distillery_client.cli.watch import print_summary, wait_with_progress
from distillery_client.types import Event


class UsageError(Exception):
    """The command line itself is wrong (a missing file, bad JSON in an option): exit status 2."""


def _json_option(text: str | None, option: str) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{option} is not valid JSON: {exc}") from None


def _existing_file(path: str) -> Path:
    if not Path(path).is_file():
        raise UsageError(f"{path}: no such file")
    return Path(path)


class Standard:
    """``list``, ``get`` and ``delete`` of a resource that has them (models, datasets, webhooks)."""

    def __init__(self, resource: str, noun: str, columns: Sequence[o.Column]):
        self.resource, self.noun, self.columns = resource, noun, columns

    def list(self, client: Client, out: Output, args: argparse.Namespace) -> None:
        out.table(getattr(client, self.resource).list(max_items=args.limit), self.columns)

    def get(self, client: Client, out: Output, args: argparse.Namespace) -> None:
        out.show(getattr(client, self.resource).retrieve(args.id))

    def delete(self, client: Client, out: Output, args: argparse.Namespace) -> None:
        getattr(client, self.resource).delete(args.id)
        out.outcome({"id": args.id, "deleted": True}, f"deleted {self.noun} {args.id}")


models = Standard("models", "model", o.MODEL_COLUMNS)
datasets = Standard("datasets", "dataset", o.DATASET_COLUMNS)
webhooks = Standard("webhooks", "webhook", o.WEBHOOK_COLUMNS)


# --- models ---------------------------------------------------------------------------------------------------

def models_upload(client: Client, out: Output, args: argparse.Namespace) -> None:
    model = client.models.upload(_existing_file(args.file), name=args.name, format=args.format, task=args.task,
                                 architecture=_json_option(args.architecture, "--architecture"))
    out.show(model, title=f"uploaded {model.id}")



# --- datasets -------------------------------------------------------------------------------------------------

def datasets_upload(client: Client, out: Output, args: argparse.Namespace) -> None:
    inputs = [s.strip() for s in args.inputs.split(",") if s.strip()] if args.inputs else None
    dataset = client.datasets.upload(_existing_file(args.file), name=args.name, format=args.format, inputs=inputs,
                                     label_column=args.label_column, options=_json_option(args.options, "--options"))
    out.show(dataset, title=f"uploaded {dataset.id}")


def datasets_register(client: Client, out: Output, args: argparse.Namespace) -> None:
    dataset = client.datasets.create(uri=args.uri, name=args.name, format=args.format)
    out.show(dataset, title=f"registered {dataset.id}")



# --- jobs -----------------------------------------------------------------------------------------------------

def _read_spec(path: str) -> dict[str, Any]:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from None
    spec = _json_option(text, path)
    if not isinstance(spec, dict):
        raise UsageError(f"{path} must hold a JSON object (the job spec)")
    return spec


def _watch(client: Client, out: Output, job_id: str, timeout: float | None) -> None:
    """Wait with progress, then the summary. A failed or cancelled job raises JobFailed (exit 1)."""
    job = wait_with_progress(client, out, job_id, timeout)
    if out.as_json:
        out.print_json(job)
    else:
        print_summary(client, out, job)


def jobs_create(client: Client, out: Output, args: argparse.Namespace) -> None:
    job = client.jobs.create(_read_spec(args.spec), idempotency_key=args.idempotency_key)
    if not args.wait:
        return out.show(job, title=f"created {job.id}")
    out.say(f"created {job.id} ({job.status})")
    _watch(client, out, job.id, args.timeout)


def jobs_list(client: Client, out: Output, args: argparse.Namespace) -> None:
    out.table(client.jobs.list(status=args.status, kind=args.kind, max_items=args.limit), o.JOB_COLUMNS)


def jobs_get(client: Client, out: Output, args: argparse.Namespace) -> None:
    out.show(client.jobs.retrieve(args.id))


def jobs_cancel(client: Client, out: Output, args: argparse.Namespace) -> None:
    job = client.jobs.cancel(args.id)
    out.outcome(job, f"{job.id}: {job.status}")


def jobs_watch(client: Client, out: Output, args: argparse.Namespace) -> None:
    _watch(client, out, args.id, args.timeout)


def _event_line(event: Event) -> str:
    return f"{event.seq:>5}  {event.created_at}  {event.level:<7}  {event.type:<16}  {event.message}"


def jobs_events(client: Client, out: Output, args: argparse.Namespace) -> None:
    for event in client.jobs.events(args.id, follow=args.follow, after=args.after):
        if out.as_json:
            out.print_json(event, lines=True)
        else:
            out.say(_event_line(event))


def jobs_metrics(client: Client, out: Output, args: argparse.Namespace) -> None:
    out.table(client.jobs.metrics(args.id), o.METRIC_COLUMNS)


# --- artifacts ------------------------------------------------------------------------------------------------

def artifacts_list(client: Client, out: Output, args: argparse.Namespace) -> None:
    out.table(client.jobs.artifacts(args.job_id), o.ARTIFACT_COLUMNS)


def artifacts_download(client: Client, out: Output, args: argparse.Namespace) -> None:
    """Every artifact of the job (or those of ``--kind``) into ``--dir``, each checked against its sha256."""
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    done = []
    for art in client.jobs.artifacts(args.job_id):
        if args.kind and art.kind not in args.kind:
            continue
        path = client.artifacts.download(art, directory)
        done.append({"id": art.id, "kind": art.kind, "format": art.format, "path": str(path),
                     "size_bytes": art.size_bytes, "sha256": art.sha256})
        out.say(f"{path}  ({art.kind}, {art.size_bytes} bytes, sha256 ok)")
    if out.as_json:
        out.print_json(done)
    elif not done:
        out.say(f"{args.job_id} has no artifacts" + (f" of kind {', '.join(args.kind)}" if args.kind else ""))


# --- webhooks -------------------------------------------------------------------------------------------------

def webhooks_create(client: Client, out: Output, args: argparse.Namespace) -> None:
    hook = client.webhooks.create(args.url, events=args.events, description=args.description)
    out.show(hook, title=f"created {hook.id}")
    out.say("keep the secret: it is shown only this once (it verifies the webhook-signature header)")



def webhooks_test(client: Client, out: Output, args: argparse.Namespace) -> None:
    result = client.webhooks.test(args.id)
    out.outcome(result, f"queued webhook.test: delivery {result.delivery_id} (distill webhooks deliveries {args.id})")


def webhooks_deliveries(client: Client, out: Output, args: argparse.Namespace) -> None:
    out.table(client.webhooks.deliveries(args.id, max_items=args.limit), o.DELIVERY_COLUMNS)
