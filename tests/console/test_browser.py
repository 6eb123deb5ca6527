"""The console in a real browser (headless Chromium) against the live API and a real worker.

One walk through what a user does: sign in with a key, upload a teacher named like an XSS payload (shown as
text) and a dataset, see a bad form value refused next to its field, create a job from the form, watch its
progress bar, curves and events move, open its report, download the student (sha256 checked), cancel a second
job, create a webhook (a refused URL at its field, the secret shown once) and send it a test event. Screenshots of the job page (running, finished) go to var/console-screenshots/ and /tmp/console-shots/.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import httpx
import pytest

from tests.support.flow import wait_for
from tests.support.teachers import npz_bytes

pytestmark = [pytest.mark.integration, pytest.mark.slow]

XSS_NAME = "<img src=x onerror=alert(1)>"
# Long enough to be watched for a few seconds on a loaded 2-core machine (progress and curves move per epoch),
# short enough to finish in seconds: digits, an mlp[32] student, small batches.
WATCHED_EPOCHS = 200
COPY_TO = Path("/tmp/console-shots")
# A public address (creating a webhook resolves its host, and this machine may have no DNS); nothing connects to it
# but the worker's delivery attempt of the test event, which may fail: the test only reads the delivery's row.
HOOK_HOST = "93.184.215.14"
HOOK = f"https://{HOOK_HOST}/distillery"


def _progress(page) -> float:
    return float(page.locator("#job-progress").evaluate("el => el.value"))


def _curve_points(page) -> int:
    return int(page.locator("#curves figure").evaluate_all("els => els.reduce((n, el) => n + Number(el.dataset.points), 0)"))


def _poll(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout}s: {what}")


def test_console_end_to_end(chromium, api_url, make_key, teacher_files, digits, tmp_path, screenshots):
    headers = make_key("console")
    key = headers["Authorization"].split(" ", 1)[1]
    api = httpx.Client(base_url=api_url, headers=headers, timeout=30)
    dataset_file = tmp_path / "digits.npz"
    dataset_file.write_bytes(npz_bytes(x=digits.x_train, y=digits.y_train, x_val=digits.x_test, y_val=digits.y_test))

    context = chromium.new_context(accept_downloads=True, viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    problems: list[str] = []  # alerts (an executed payload), script errors, CSP refusals
    page.on("dialog", lambda d: d.accept() if d.type == "confirm" else (problems.append(f"{d.type}: {d.message}"),
                                                                          d.dismiss()))
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    # Chromium logs every 4xx fetch as an error ("Failed to load resource"); the test provokes some on purpose.
    page.on("console", lambda m: problems.append(f"console: {m.text}")
            if m.type == "error" and not m.text.startswith("Failed to load resource") else None)
    page.set_default_timeout(30_000)

    # ---- sign in: a wrong key is refused, the real one opens the jobs page.
    page.goto(f"{api_url}/console")
    page.fill("#api-key", "dsk_not-a-key")
    page.click("#signin button[type=submit]")
    page.wait_for_selector("#signin .error:has-text('invalid or revoked')")
    page.fill("#api-key", key)
    page.click("#signin button[type=submit]")
    page.wait_for_selector("#jobs")
    assert page.evaluate("sessionStorage.getItem('distillery.apiKey')") == key
    assert page.evaluate("document.cookie") == ""

    # ---- uploads through the forms; the hostile name is text everywhere it appears.
    page.goto(f"{api_url}/console/#/models")
    page.set_input_files("#upload-model input[type=file]", str(teacher_files["onnx"]))
    page.fill("#upload-model input[name=name]", XSS_NAME)
    page.click("#upload-model button[type=submit]")
    page.wait_for_selector("#upload-model .ok:has-text('created mdl_')", timeout=60_000)
    page.wait_for_selector(f"#model-list .name:text-is('{XSS_NAME}')")
    page.goto(f"{api_url}/console/#/datasets")
    page.set_input_files("#upload-dataset input[type=file]", str(dataset_file))
    page.fill("#upload-dataset input[name=name]", "digits")
    page.select_option("#upload-dataset select[name=format]", "npz")
    page.click("#upload-dataset button[type=submit]")
    page.wait_for_selector("#upload-dataset .ok:has-text('created ds_')", timeout=60_000)
    model_id = api.get("/v1/models").json()["data"][0]["id"]
    dataset_id = api.get("/v1/datasets").json()["data"][0]["id"]

    # ---- the new-job form: a bad value is refused by the server, next to its field; then a good job.
    page.goto(f"{api_url}/console/#/new")
    page.wait_for_selector("#new-job")
    assert page.locator(f"#teacher option:text-is('{XSS_NAME} (onnx, classification)')").count() == 1
    page.select_option("#teacher", model_id)
    page.select_option("#dataset", dataset_id)
    page.fill("#student [data-path='student.hidden']", "32")
    epochs = page.locator("[data-path='steps.0.epochs']")
    epochs.fill("-3")
    page.click("#submit-job")
    error = page.locator("[data-path='steps.0.epochs'] + .field-error")
    error.wait_for()
    assert "epochs" in error.inner_text(), error.inner_text()  # the server's own message for that field
    assert "422" in page.locator("#new-job .form-summary").inner_text()
    assert page.url.endswith("#/new")
    epochs.fill(str(WATCHED_EPOCHS))
    page.fill("[data-path='steps.0.batch_size']", "16")
    page.click("#submit-job")
    page.wait_for_url("**/console/#/jobs/job_*")
    job_id = page.url.rsplit("/", 1)[1]

    # ---- watch it run: the bar and the curves move, events arrive over SSE.
    _poll(lambda: page.locator("#job-status").inner_text() == "running" and _progress(page) > 0, 120,
          "the job running with progress")
    first, points = _progress(page), _poll(lambda: _curve_points(page) >= 2 and _curve_points(page), 60, "a curve")
    _poll(lambda: _progress(page) > first and _curve_points(page) > points, 60, "progress and curve moving")
    assert page.locator("#events li").count() >= 1
    assert "ETA" in page.locator("#job-eta").inner_text()
    assert page.locator("#job-step").inner_text().startswith("step 1/1 (distill) · epoch ")
    page.screenshot(path=str(screenshots / "job-running.png"), full_page=True)
    assert page.locator("#job-status").inner_text() == "running", "the screenshot must show a running job"

    # ---- finished: report tables, plots, model card; the student downloads with its sha256 checked.
    job = wait_for(api, job_id, timeout=180)
    assert job["status"] == "succeeded", job
    page.wait_for_selector("#job-status .badge:text-is('succeeded')")
    page.wait_for_selector("#report-models")
    assert page.locator("#report-models tbody tr").count() >= 3  # teacher, the step, the delivered student
    heads = page.locator("#report-models th").all_inner_texts()
    for column in ("Parameters", "Bytes", "Latency b1 (ms)", "Latency b32 (ms)", "accuracy", "agreement",
                   "Compression", "Speedup"):
        assert column in [h.strip() for h in heads] or column.upper() in heads, (column, heads)
    # The report's warnings are shown: this teacher scores ≥ 0.99 on the held-out split it may have trained on.
    report_id = next(a["id"] for a in api.get(f"/v1/jobs/{job_id}/artifacts").json()["data"] if a["kind"] == "report")
    report = api.get(f"/v1/artifacts/{report_id}/content").json()
    for warning in report.get("warnings", []):
        assert warning["code"] in page.locator("#report-warnings").inner_text()
    page.wait_for_function("() => document.querySelectorAll('#plots img').length > 0 && "
                           "[...document.querySelectorAll('#plots img')].every(i => i.complete && i.naturalWidth > 0)")
    page.wait_for_selector("#model-card:not([hidden])")
    page.screenshot(path=str(screenshots / "job-finished.png"), full_page=True)
    student = next(a for a in api.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
                   if a["kind"] == "student" and a["format"] == "onnx")
    with page.expect_download() as download:
        page.click(f"button.download[data-artifact='{student['id']}']")
    data = Path(download.value.path()).read_bytes()
    assert hashlib.sha256(data).hexdigest() == student["sha256"] and download.value.suggested_filename == student["filename"]
    page.wait_for_selector(f"button[data-artifact='{student['id']}'] ~ .ok:text-is('sha256 verified')")

    # ---- a second job, cancelled from its page; the list filters by status.
    body = {"teacher_model_id": model_id, "dataset_id": dataset_id, "student": {"family": "mlp", "hidden": [32]},
            "steps": [{"kind": "distill", "epochs": 500, "batch_size": 16}]}
    second = api.post("/v1/jobs", json=body).json()["id"]
    page.goto(f"{api_url}/console/#/jobs/{second}")
    page.click("#cancel-job")
    page.wait_for_selector("#job-status .badge:text-is('cancelled')", timeout=120_000)
    page.goto(f"{api_url}/console/#/jobs?status=cancelled")
    page.wait_for_selector(f"#jobs a:text-is('{second}')")
    assert page.locator(f"#jobs a:text-is('{job_id}')").count() == 0

    # ---- webhooks: a refused URL shown at its field, the signing secret shown once, the endpoint's deliveries.
    page.goto(f"{api_url}/console/#/webhooks")
    url = page.locator("#new-webhook [data-path='url']")
    url.fill(f"http://{HOOK_HOST}/distillery")  # plain http: refused by the server (https only here)
    page.click("#new-webhook button[type=submit]")
    error = page.locator("#new-webhook [data-path='url'] + .field-error")
    error.wait_for()
    assert "https" in error.inner_text(), error.inner_text()
    url.fill(HOOK)
    page.fill("#new-webhook [data-path='description']", XSS_NAME)
    page.click("#new-webhook button[type=submit]")
    secret = page.locator("#webhook-secret code.secret")
    secret.wait_for()
    [hook] = api.get("/v1/webhooks").json()["data"]
    assert secret.inner_text().startswith("whsec_") and "secret" not in hook, hook  # the API never shows it again
    page.wait_for_selector(f"#webhook-list td:text-is('{XSS_NAME}')")  # the description, as text
    page.reload()
    page.wait_for_selector(f"#webhook-list a:text-is('{HOOK}')")
    assert page.locator("#webhook-secret code.secret").count() == 0  # shown once: not after a reload
    page.click(f"#webhook-list a:text-is('{HOOK}')")
    page.click("button:text-is('Send test event')")
    page.wait_for_selector("#deliveries td:text-is('webhook.test')", timeout=30_000)
    page.goto(f"{api_url}/console/#/webhooks")  # delete it (the confirm is accepted): no more attempts
    page.click(f"#webhook-list tr:has(a:text-is('{HOOK}')) button:text-is('Delete')")
    page.wait_for_selector("#webhook-list :text-is('No webhooks yet.')")
    assert api.get("/v1/webhooks").json()["data"] == []

    # ---- nothing ran that should not have: no alert, no script error, no CSP refusal; no <img src=x> anywhere.
    for route in ("#/models", "#/new", "#/jobs", "#/webhooks"):
        page.goto(f"{api_url}/console/{route}")
        page.wait_for_load_state("networkidle")
        assert page.locator("img[src='x']").count() == 0
    assert problems == []
    COPY_TO.mkdir(parents=True, exist_ok=True)
    for shot in ("job-running.png", "job-finished.png"):
        shutil.copy(screenshots / shot, COPY_TO / shot)
    context.close()
