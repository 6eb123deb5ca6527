"""The ``distill`` command line: groups (models, datasets, jobs, artifacts, webhooks), their commands and options.

``--url``, ``--api-key`` and ``--json`` are accepted before the group or after the command. Each command's
``handler`` (in ``commands.py``) is stored on the parsed namespace.
"""

from __future__ import annotations

import argparse

from distillery_client.cli import commands

JOB_STATUSES = ("queued", "running", "cancelling", "succeeded", "failed", "cancelled")


def _common(suppress: bool) -> argparse.ArgumentParser:
    """The options every command takes. Repeated on each command with SUPPRESS defaults, so a value given
    before the group is not overwritten by the command's default."""
    default = argparse.SUPPRESS if suppress else None
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--url", default=default, help="API base URL (default: $DISTILLERY_URL, else http://127.0.0.1:8000)")
    p.add_argument("--api-key", default=default, help="API key (default: $DISTILLERY_API_KEY)")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS if suppress else False,
                   help="print JSON (the API's objects) instead of tables, for scripts")
    return p


def build() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distill", parents=[_common(False)],
        description="Distillery from the command line: upload teachers and data, run and watch jobs, download "
                    "the students.",
        epilog="Exit status: 0 success; 1 the request failed, or a waited/watched job failed or was cancelled; "
               "2 usage error.")
    groups = parser.add_subparsers(dest="group", required=True, metavar="{models,datasets,jobs,artifacts,webhooks}")
    common = _common(True)

    def command(group: argparse._SubParsersAction, name: str, handler, help: str) -> argparse.ArgumentParser:
        p = group.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(handler=handler)
        return p

    def limit(p: argparse.ArgumentParser) -> None:
        p.add_argument("--limit", type=int, default=None, help="list at most this many (default: all)")

    def standard(group: argparse._SubParsersAction, handlers: commands.Standard) -> None:
        limit(command(group, "list", handlers.list, f"list {handlers.resource}"))
        command(group, "get", handlers.get, f"show a {handlers.noun}").add_argument("id")
        command(group, "delete", handlers.delete, f"delete a {handlers.noun}").add_argument("id")

    models = groups.add_parser("models", help="teacher (and student) checkpoints").add_subparsers(
        dest="command", required=True)
    p = command(models, "upload", commands.models_upload, "upload a checkpoint")
    p.add_argument("file")
    p.add_argument("--name", required=True)
    p.add_argument("--format", help="torchscript, onnx, torch_export, safetensors, ... (default: detected from "
                                    "the file's bytes)")
    p.add_argument("--task", help="classification (default), regression, embedding, ...")
    p.add_argument("--architecture", help="JSON: a built-in family and its arguments (required for safetensors)")
    standard(models, commands.models)

    datasets = groups.add_parser("datasets", help="transfer data").add_subparsers(dest="command", required=True)
    p = command(datasets, "upload", commands.datasets_upload, "upload a data file")
    p.add_argument("file")
    p.add_argument("--name", required=True)
    p.add_argument("--format", required=True, help="npz, pt, csv, parquet, jsonl, image_folder")
    p.add_argument("--inputs", help="comma-separated arrays fed to the model (default: x)")
    p.add_argument("--label-column", help="csv / parquet: the label column")
    p.add_argument("--options", help="JSON dataset options (image_folder: image_size, grayscale, normalize)")
    p = command(datasets, "register", commands.datasets_register, "register data by URI (file://, s3://, https://)")
    p.add_argument("uri")
    p.add_argument("--name", required=True)
    p.add_argument("--format", default="npz")
    standard(datasets, commands.datasets)

    jobs = groups.add_parser("jobs", help="distillation jobs").add_subparsers(dest="command", required=True)
    p = command(jobs, "create", commands.jobs_create, "submit a job from a JSON spec file ('-': stdin)")
    p.add_argument("spec")
    p.add_argument("--wait", action="store_true", help="watch it until it ends (exit 1 if it fails)")
    p.add_argument("--timeout", type=float, help="with --wait: give up after this many seconds")
    p.add_argument("--idempotency-key", help="default: a new one (retries of this call reuse it)")
    p = command(jobs, "list", commands.jobs_list, "list jobs, newest first")
    p.add_argument("--status", choices=JOB_STATUSES)
    p.add_argument("--kind", help="a step kind (distill matches distill+quantize)")
    limit(p)
    command(jobs, "get", commands.jobs_get, "show a job").add_argument("id")
    command(jobs, "cancel", commands.jobs_cancel, "ask a job to stop").add_argument("id")
    p = command(jobs, "watch", commands.jobs_watch, "live progress until the job ends, then its report summary")
    p.add_argument("id")
    p.add_argument("--timeout", type=float, help="give up after this many seconds")
    p = command(jobs, "events", commands.jobs_events, "a job's events (--json: one JSON object a line)")
    p.add_argument("id")
    p.add_argument("--follow", "-f", action="store_true", help="follow live until the job ends")
    p.add_argument("--after", type=int, default=0, help="only events after this seq")
    command(jobs, "metrics", commands.jobs_metrics, "a job's metric time series").add_argument("id")

    artifacts = groups.add_parser("artifacts", help="what jobs produced").add_subparsers(dest="command", required=True)
    command(artifacts, "list", commands.artifacts_list, "a job's artifacts").add_argument("job_id")
    p = command(artifacts, "download", commands.artifacts_download,
                "download a job's artifacts (resumable, sha256-checked)")
    p.add_argument("job_id")
    p.add_argument("--dir", default=".", help="where to write them (default: the current directory)")
    p.add_argument("--kind", action="append", help="only artifacts of this kind (student, report, ...); repeatable")

    hooks = groups.add_parser("webhooks", help="signed job-event notifications").add_subparsers(
        dest="command", required=True)
    p = command(hooks, "create", commands.webhooks_create, "register an endpoint (prints its secret, once)")
    p.add_argument("url")
    p.add_argument("--event", action="append", dest="events", help="an event to send (default: all job events); "
                                                                    "repeatable")
    p.add_argument("--description")
    standard(hooks, commands.webhooks)
    command(hooks, "test", commands.webhooks_test, "send it a webhook.test event").add_argument("id")
    p = command(hooks, "deliveries", commands.webhooks_deliveries, "its deliveries, newest first")
    p.add_argument("id")
    limit(p)
    return parser
