"""``distill``: exit statuses, the server's error printed (never a traceback), --json, tables, the watch flow."""

from __future__ import annotations

import json
import sys

import httpx
import pytest

from distillery_client.cli import main
from tests.client.mock_api import job, problem


def run(argv: list[str], handler, capsys) -> tuple[int, str, str]:
    code = main(["--url", "http://distillery.test", "--api-key", "k", *argv], transport=httpx.MockTransport(handler),
                sleep=lambda seconds: None)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def routes(table: dict[str, httpx.Response | list[httpx.Response]]):
    def handler(request: httpx.Request) -> httpx.Response:
        answer = table[f"{request.method} {request.url.path}"]
        return answer.pop(0) if isinstance(answer, list) else answer
    return handler


def test_usage_errors_exit_2(capsys, tmp_path):
    assert main(["jobs"]) == 2
    assert "usage: distill jobs" in capsys.readouterr().err
    bad = tmp_path / "spec.json"
    bad.write_text("{not json")
    code, _, err = run(["jobs", "create", str(bad)], routes({}), capsys)
    assert code == 2 and "spec.json is not valid JSON" in err
    code, _, err = run(["models", "upload", str(tmp_path / "missing.pt"), "--name", "t"], routes({}), capsys)
    assert code == 2 and "no such file" in err


def test_an_api_error_prints_the_servers_detail_and_code_and_exits_1(capsys):
    handler = routes({"GET /v1/jobs/job_9": problem(404, "not_found", "job job_9 not found")})
    code, out, err = run(["jobs", "get", "job_9"], handler, capsys)
    assert code == 1 and out == ""
    assert err.strip() == "distill: error: job job_9 not found (not_found, HTTP 404)"
    code, _, err = run(["jobs", "get", "job_9", "--json"], handler, capsys)
    assert code == 1 and json.loads(err)["error"] == {"status": 404, "code": "not_found",
                                                      "detail": "job job_9 not found", "errors": []}


def test_field_errors_of_a_422_are_listed(capsys, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"teacher_model_id": "mdl_1", "steps": [{"kind": "distill", "epochs": 0}]}))
    handler = routes({"POST /v1/jobs": problem(422, "validation_error", "body.steps.0.epochs: too small",
                                               [{"loc": ["body", "steps", 0, "epochs"], "msg": "too small"}])})
    code, _, err = run(["jobs", "create", str(spec)], handler, capsys)
    assert code == 1 and "(validation_error, HTTP 422)" in err and "  body.steps.0.epochs: too small" in err


def test_json_lists_and_objects_are_the_apis_own(capsys):
    page = {"data": [job("job_2", "running"), job("job_1", "failed")], "has_more": False, "next_cursor": None}
    handler = routes({"GET /v1/jobs": httpx.Response(200, json=page)})
    code, out, _ = run(["--json", "jobs", "list"], handler, capsys)
    assert code == 0 and json.loads(out) == page["data"]
    code, out, _ = run(["jobs", "list", "--status", "failed", "--json"], handler, capsys)  # after the command too
    assert code == 0 and [j["id"] for j in json.loads(out)] == ["job_2", "job_1"]
    code, out, _ = run(["jobs", "list"], handler, capsys)
    assert code == 0 and "job_2" in out and "running" in out and "distill" in out


def _watched(final: dict) -> dict:
    running = job(status="running", progress={"step_index": 0, "step_kind": "distill", "epoch": 1, "epochs": 2,
                                              "fraction": 0.5, "eta_seconds": 1.0})
    report = {"seq": 9, "type": "report", "message": "report written",
              "data": {"compression_ratio": 8.2, "speedup": 3.1}}
    return {"POST /v1/jobs": httpx.Response(202, json=job()),
            "GET /v1/jobs/job_1": [httpx.Response(200, json=running), httpx.Response(200, json=final)],
            "GET /v1/jobs/job_1/metrics": httpx.Response(200, json={"data": [
                {"step": 0, "epoch": 1, "name": "train_loss", "value": 0.25}]}),
            "GET /v1/jobs/job_1/events": httpx.Response(200, json={"data": [report]})}


def test_create_wait_prints_progress_then_the_report_summary(capsys, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"teacher_model_id": "mdl_1"}))
    final = job(status="succeeded", metrics={"teacher": {"accuracy": 0.97}, "student": {"accuracy": 0.95}},
                progress={"step_index": 0, "step_kind": "distill", "epoch": 2, "epochs": 2, "fraction": 1.0})
    code, out, _ = run(["jobs", "create", str(spec), "--wait"], routes(_watched(final)), capsys)
    assert code == 0, out
    assert "created job_1 (queued)" in out
    assert "job_1 running · step 1/1 distill · epoch 1/2 · 50% · ETA 1s" in out  # not a terminal: one line a change
    assert "job_1 succeeded" in out
    summary = out[out.index("job_1 succeeded ·"):]
    assert "accuracy" in summary and "0.9700" in summary and "0.9500" in summary
    assert "compression ratio" in summary and "8.2x" in summary and "3.1x" in summary


def test_a_watched_job_that_fails_exits_1_with_its_message(capsys):
    failed = job(status="failed", error={"code": "shape_mismatch", "message": "the dataset has 20 features per row "
                                                                              "but the teacher expects 64"})
    code, out, err = run(["jobs", "watch", "job_1"], routes(_watched(failed)), capsys)
    assert code == 1
    assert "job job_1 failed: the dataset has 20 features per row but the teacher expects 64 (shape_mismatch)" in err
    code, out, err = run(["jobs", "watch", "job_1", "--json"], routes(_watched(failed)), capsys)
    assert code == 1 and json.loads(out)["error"]["code"] == "shape_mismatch"


def test_without_rich_the_json_output_still_works_and_tables_say_what_to_install(capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "rich" or m.startswith("rich.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "rich", None)
    handler = routes({"GET /v1/jobs/job_1": httpx.Response(200, json=job())})
    code, out, _ = run(["jobs", "get", "job_1", "--json"], handler, capsys)
    assert code == 0 and json.loads(out)["id"] == "job_1"
    code, _, err = run(["jobs", "get", "job_1"], handler, capsys)
    assert code == 1 and "pip install 'distillery-client[cli]'" in err


@pytest.mark.parametrize("argv", [["--help"], ["jobs", "create", "--help"]])
def test_help_exits_0(argv, capsys):
    assert main(argv) == 0
    assert "usage: distill" in capsys.readouterr().out


def test_list_get_and_delete_of_models_datasets_and_webhooks(capsys):
    model = {"id": "mdl_1", "name": "teacher", "format": "onnx", "task": "classification", "size_bytes": 10,
             "sha256": "ab", "num_parameters": 7, "created_at": "2025-01-01T00:00:00Z"}
    handler = routes({"GET /v1/models": httpx.Response(200, json={"data": [model], "has_more": False,
                                                                  "next_cursor": None}),
                      "GET /v1/datasets/ds_9": problem(404, "not_found", "dataset ds_9 not found"),
                      "DELETE /v1/webhooks/wh_1": httpx.Response(204)})
    code, out, _ = run(["models", "list"], handler, capsys)
    assert code == 0 and "mdl_1" in out and "teacher" in out
    code, _, err = run(["datasets", "get", "ds_9"], handler, capsys)
    assert code == 1 and "dataset ds_9 not found (not_found, HTTP 404)" in err
    code, out, _ = run(["webhooks", "delete", "wh_1", "--json"], handler, capsys)
    assert code == 0 and json.loads(out) == {"id": "wh_1", "deleted": True}


def test_on_a_terminal_watch_draws_a_live_progress_bar_with_the_latest_metrics():
    import io

    from rich.console import Console

    from distillery_client.cli.output import Output
    from distillery_client.cli.watch import wait_with_progress
    from tests.client.mock_api import sdk

    final = job(status="succeeded", progress={"step_index": 0, "step_kind": "distill", "epoch": 2, "epochs": 2,
                                              "fraction": 1.0, "eta_seconds": 0.0})
    client, rec = sdk(routes(_watched(final)))
    out = Output(as_json=False)
    out._console = Console(file=io.StringIO(), force_terminal=True, width=160)
    assert wait_with_progress(client, out, "job_1", timeout=None).status == "succeeded"
    drawn = out._console.file.getvalue()
    # The bar redraws at its own pace: what is certain to be drawn is the last state.
    assert "succeeded · step 1/1 distill · epoch 2/2" in drawn and "100%" in drawn and "train_loss=0.25" in drawn
    assert "GET /v1/jobs/job_1/metrics" in rec.paths()  # read when a new epoch was reported
