// One job: status, step i/n, epoch, a progress bar with ETA, live events (SSE), live training curves, and once
// it ends the report tables, plots, model card and artifacts (downloads checked against their sha256); a cancel
// button; the spec with a copy button.

import {api, ApiError, blob, followEvents, sha256, text} from "../api.js";
import {curves} from "../chart.js";
import {badge, copyText, fill, fmtBytes, fmtDuration, fmtTime, h, pretty, table} from "../dom.js";
import {reportView} from "../report.js";

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const LEVELS = new Set(["debug", "info", "warning", "error"]);
const MAX_EVENTS = 1000;

function card(title, id, ...children) {
  return h("section", {class: "card", id}, h("h2", {}, title), ...children);
}

export function render(view, route) {
  const jobId = route.id;
  const path = `v1/jobs/${encodeURIComponent(jobId)}`;
  const blobUrls = [];
  let stopped = false;
  let finished = false;
  let job = null;
  let pollTimer = null;
  let metricsTimer = null;

  const title = h("h1", {class: "mono"}, jobId);
  const status = h("span", {id: "job-status"});
  const cancel = h("button", {type: "button", id: "cancel-job", class: "danger", hidden: true, onclick: onCancel},
                   "Cancel job");
  const message = h("p", {class: "muted", id: "job-message"});
  const stepLine = h("p", {id: "job-step"});
  const bar = h("progress", {id: "job-progress", max: 1, value: 0});
  const percent = h("span", {id: "job-percent"}, "0%");
  const eta = h("span", {id: "job-eta", class: "muted"});
  const errorBox = h("div", {id: "job-error", class: "error-box", hidden: true});
  const curvesBox = h("div", {id: "curves", class: "curves"}, h("p", {class: "muted"}, "No metrics yet."));
  const events = h("ol", {id: "events", class: "events"});
  const reportBox = h("div", {id: "report-section"}, h("p", {class: "muted"}, "The report appears when the job ends."));
  const plots = h("div", {id: "plots", class: "plots"});
  const modelCard = h("pre", {id: "model-card", class: "model-card", hidden: true});
  const artifacts = h("div", {id: "artifacts"}, h("p", {class: "muted"}, "No artifacts yet."));
  const spec = h("pre", {id: "spec", class: "spec"});
  const copied = h("span", {class: "muted", role: "status"});
  const copy = h("button", {type: "button", class: "secondary", id: "copy-spec", onclick: async () => {
    fill(copied, (await copyText(spec.textContent, spec)) ? "copied" : "selected: press Ctrl+C");
  }}, "Copy spec");
  const times = h("p", {class: "muted", id: "job-times"});

  view.append(
    h("div", {class: "page-head"}, h("a", {href: "#/jobs"}, "← Jobs"), title, status, cancel),
    times, message,
    card("Progress", "progress-card", stepLine, h("div", {class: "progress-row"}, bar, percent, eta), errorBox),
    h("div", {class: "two-col"}, card("Training curves", "curves-card", curvesBox), card("Events", "events-card", events)),
    card("Report", "report-card", reportBox, plots, modelCard),
    card("Artifacts", "artifacts-card", artifacts),
    card("Spec", "spec-card", h("div", {class: "toolbar"}, copy, copied), spec));

  function showJob(j) {
    job = j;
    fill(status, badge(j.status));
    cancel.hidden = TERMINAL.has(j.status) || j.status === "cancelling";
    fill(times, `created ${fmtTime(j.created_at)} · started ${fmtTime(j.started_at)} · finished `
      + `${fmtTime(j.finished_at)} · attempts ${j.attempts}`);
    const p = j.progress || {};
    const steps = j.spec?.steps?.length || 0;
    const parts = [];
    if (p.step_index !== undefined && p.step_index !== null) {
      parts.push(`step ${p.step_index + 1}/${steps}${p.step_kind ? ` (${p.step_kind})` : ""}`);
    }
    if (p.epochs) parts.push(`epoch ${p.epoch ?? 0}/${p.epochs}`);
    if (p.trials) {  // a student search: its trials are jobs of their own (GET /v1/jobs/{id}/trials)
      parts.push(`trials ${p.trials_done ?? 0}/${p.trials}`
        + `${p.trials_running ? ` · ${p.trials_running} running` : ""}${p.trials_queued ? ` · ${p.trials_queued} queued` : ""}`);
    }
    fill(stepLine, parts.length ? parts.join(" · ") : j.status === "queued" ? "waiting for a worker" : "");
    const fraction = j.status === "succeeded" ? 1 : Math.max(0, Math.min(1, p.fraction ?? 0));
    bar.value = fraction;
    fill(percent, `${Math.round(fraction * 100)}%`);
    fill(eta, TERMINAL.has(j.status) ? "" : p.eta_seconds !== undefined && p.eta_seconds !== null
      ? `ETA ${fmtDuration(p.eta_seconds)}` : "ETA —");
    errorBox.hidden = !j.error;
    if (j.error) fill(errorBox, h("strong", {}, j.error.code), ": ", j.error.message);
    if (!spec.textContent) fill(spec, pretty(j.spec));
  }

  async function poll() {
    try {
      showJob(await api(path));
      fill(message);
    } catch (err) {
      fill(message, err instanceof ApiError && err.status === 404 ? "No such job (for this key)." : err.message);
      if (err instanceof ApiError && err.status === 404) { finished = true; clearTimeout(metricsTimer); return; }
    }
    if (stopped) return;
    if (job && TERMINAL.has(job.status)) {
      if (!finished) { finished = true; await finish(); }
      return;
    }
    pollTimer = setTimeout(poll, 1000);
  }

  async function loadMetrics() {
    try {
      const points = (await api(`${path}/metrics`)).data;
      if (!stopped && points.length) fill(curvesBox, curves(points));
    } catch { /* the next refresh tries again */ }
  }

  function metricsLoop() {
    loadMetrics().finally(() => { if (!stopped && !finished) metricsTimer = setTimeout(metricsLoop, 1500); });
  }

  function addEvent(e) {
    const level = LEVELS.has(e.level) ? e.level : "info";
    events.append(h("li", {class: `event ${level}`, dataset: {seq: String(e.seq), type: e.type}},
      h("time", {datetime: e.created_at}, fmtTime(e.created_at)), " ", h("span", {class: "event-type"}, e.type),
      " ", h("span", {}, e.message)));
    while (events.children.length > MAX_EVENTS) events.firstElementChild.remove();
    events.scrollTop = events.scrollHeight;
  }

  async function onCancel() {
    if (!window.confirm(`Cancel ${jobId}?`)) return;
    try {
      showJob(await api(`${path}/cancel`, {method: "POST"}));
    } catch (err) {
      fill(message, `cancel refused: ${err.message}`);
    }
  }

  async function download(art, note) {
    fill(note, "downloading…");
    try {
      const data = await blob(`v1/artifacts/${encodeURIComponent(art.id)}/content`);
      const digest = await sha256(data);
      const verdict = digest === null ? "sha256 not checked (needs https or localhost)"
        : digest === art.sha256 ? "sha256 verified" : `sha256 MISMATCH: got ${digest}`;
      fill(note, verdict);
      note.className = digest === null || digest === art.sha256 ? "ok" : "error";
      const href = URL.createObjectURL(data);
      const a = h("a", {href, download: art.filename, hidden: true});
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(href), 60000);
    } catch (err) {
      fill(note, `download failed: ${err.message}`);
      note.className = "error";
    }
  }

  function artifactTable(list) {
    return table([
      ["Kind", (a) => a.kind], ["Format", (a) => a.format], ["Step", (a) => a.step_index ?? "—"],
      ["File", (a) => a.filename], ["Size", (a) => fmtBytes(a.size_bytes)],
      ["sha256", (a) => h("code", {class: "sha"}, a.sha256)],
      ["", (a) => {
        const note = h("span", {class: "muted"});
        return h("span", {}, h("button", {type: "button", class: "secondary download", dataset: {artifact: a.id, kind: a.kind,
          format: a.format}, onclick: () => download(a, note)}, "Download"), " ", note);
      }],
    ], list, {class: "list"});
  }

  async function finish() {
    await loadMetrics();
    let list;
    try {
      list = (await api(`${path}/artifacts`)).data;
    } catch (err) {
      fill(artifacts, `artifacts unavailable: ${err.message}`);
      return;
    }
    if (stopped) return;
    fill(artifacts, list.length ? artifactTable(list) : h("p", {class: "muted"}, "No artifacts."));
    const content = (a) => `v1/artifacts/${encodeURIComponent(a.id)}/content`;
    const report = list.find((a) => a.kind === "report" && a.format === "json");
    if (report) {
      try {
        fill(reportBox, reportView(JSON.parse(await text(content(report)))));
      } catch (err) {
        fill(reportBox, `report unavailable: ${err.message}`);
      }
    } else {
      fill(reportBox, h("p", {class: "muted"}, "This job wrote no report."));
    }
    for (const plot of list.filter((a) => a.kind === "plot" && a.format === "png")) {
      try {
        const src = URL.createObjectURL(await blob(content(plot)));
        blobUrls.push(src);
        plots.append(h("figure", {}, h("img", {src, alt: plot.filename, class: "plot"}), h("figcaption", {}, plot.filename)));
      } catch (err) {
        plots.append(h("p", {class: "error"}, `${plot.filename}: ${err.message}`));
      }
    }
    const mdCard = list.find((a) => a.kind === "model_card");
    if (mdCard) {
      modelCard.hidden = false;
      fill(modelCard, await text(content(mdCard)).catch((err) => `model card unavailable: ${err.message}`));
    }
  }

  const stopEvents = followEvents(jobId, {onEvent: addEvent, onEnd: () => { if (!finished) { clearTimeout(pollTimer); poll(); } }});
  poll();
  metricsLoop();
  return () => {
    stopped = true;
    stopEvents();
    clearTimeout(pollTimer);
    clearTimeout(metricsTimer);
    blobUrls.forEach((u) => URL.revokeObjectURL(u));
  };
}
