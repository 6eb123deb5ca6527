"""``distill``: the command line of the Distillery SDK.

Exit status: 0 on success; 1 when the request failed (the server's ``detail`` and ``code`` are printed,
never a traceback), when a waited or watched job ended failed or cancelled (its error message is printed),
or when the server could not be reached; 2 on usage errors.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from distillery_client import Client
from distillery_client.cli.output import Output, RichMissing, error
from distillery_client.errors import APIConnectionError, APIError, DistilleryError, JobFailed, WaitTimeout

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _report_api_error(exc: APIError, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"error": {"status": exc.status, "code": exc.code, "detail": exc.detail,
                                    "errors": [{"loc": list(e.loc), "msg": e.msg} for e in exc.errors]}}),
              file=sys.stderr)
        return
    error(str(exc))
    for field in exc.errors:
        print(f"  {field.field}: {field.msg}", file=sys.stderr)


def _report_job_failed(exc: JobFailed, out: Output) -> None:
    if out.as_json:
        out.print_json(exc.job)
    error(f"job {exc.job.id} {exc.job.status}: {exc.message} ({exc.code})")


def main(argv: Sequence[str] | None = None, **client_options: Any) -> int:
    """Run ``distill`` with ``argv`` (default: the process's arguments); the exit status. ``client_options`` go to
    :class:`~distillery_client.Client` (tests pass ``transport`` and ``sleep``)."""
    from distillery_client.cli import commands, parser

    try:
        args = parser.build().parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage error (2), or --help (0)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    out = Output(args.json)
    try:
        with Client(base_url=args.url, api_key=args.api_key, **client_options) as client:
            return args.handler(client, out, args) or EXIT_OK
    except commands.UsageError as exc:
        error(str(exc))
        return EXIT_USAGE
    except JobFailed as exc:
        _report_job_failed(exc, out)
        return EXIT_FAILED
    except WaitTimeout as exc:
        error(f"{exc} (it goes on running; distill jobs watch {exc.job.id})")
        return EXIT_FAILED
    except APIError as exc:
        _report_api_error(exc, out.as_json)
        return EXIT_FAILED
    except APIConnectionError as exc:
        error(f"{exc} (is the server at {client.base_url} running? --url / DISTILLERY_URL)")
        return EXIT_FAILED
    except (DistilleryError, RichMissing) as exc:
        error(str(exc))
        return EXIT_FAILED
    except OSError as exc:  # a local file: unwritable directory, disk full
        error(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "))
        return EXIT_FAILED
    except KeyboardInterrupt:
        error("interrupted")
        return 130
