// A finished job's report.json as tables: the teacher against each step's output, the delivered student and
// the labels-only baseline; the headline ratios; teacher_gain; each quality gate and the step that tripped one;
// the report's warnings (a teacher that may have seen the held-out rows); a search's trials.

import {fmtBytes, fmtNum, fmtRatio, h, table} from "./dom.js";

// engine.metrics.METRIC_KEYS, plus the language-model metric; only the ones a report holds are shown.
const METRICS = ["accuracy", "agreement", "f1_macro", "mse", "mae", "r2", "teacher_r2", "agreement_mse", "cosine",
                 "perplexity"];

function modelRows(report) {
  const rows = [{name: "teacher", row: report.teacher}];
  for (const s of report.steps || []) {
    rows.push({name: `step ${s.index}: ${s.kind}${s.method ? ` (${s.method})` : ""}`, row: s});
  }
  if (report.student) rows.push({name: "student (delivered)", row: report.student, final: true});
  if (report.baseline) rows.push({name: "baseline (labels only)", row: report.baseline});
  return rows;
}

function ratio(a, b) {
  return a && b ? a / b : null;
}

export function comparisonTable(report) {
  const teacher = report.teacher || {};
  const rows = modelRows(report);
  const metrics = METRICS.filter((m) => rows.some(({row}) => typeof row?.[m] === "number"));
  return table([
    ["Model", (r) => r.name],
    ["Parameters", (r) => fmtNum(r.row.num_parameters)],
    ["Bytes", (r) => h("span", {title: String(r.row.size_bytes ?? "")}, fmtBytes(r.row.size_bytes))],
    ["Latency b1 (ms)", (r) => fmtNum(r.row.latency_ms?.batch_1, 3)],
    ["Latency b32 (ms)", (r) => fmtNum(r.row.latency_ms?.batch_32, 3)],
    ...metrics.map((m) => [m, (r) => fmtNum(r.row[m])]),
    ["Compression", (r) => fmtRatio(ratio(teacher.size_bytes, r.row.size_bytes))],
    ["Speedup", (r) => fmtRatio(ratio(teacher.latency_ms?.batch_32, r.row.latency_ms?.batch_32))],
  ], rows, {class: "report-table", id: "report-models"});
}

function gatesSection(report) {
  const gated = (report.steps || []).filter((s) => s.gate);
  if (!gated.length && !report.gate) return null;
  const tripped = report.gate ? report.gate.failed_step : null;
  return h("section", {class: "report-gates"},
    h("h3", {}, "Quality gates"),
    report.gate ? h("p", {class: "error", id: "gate-tripped"}, report.gate.against === "labels"
      ? `Step ${report.gate.failed_step} tripped its gate: ${report.gate.metric} ${fmtNum(report.gate.value)} against `
        + `the labels, below the floor ${fmtNum(report.gate.min)}.`
      : `Step ${report.gate.failed_step} tripped its gate: ${report.gate.metric} dropped ${fmtNum(report.gate.drop)} `
        + `(allowed ${fmtNum(report.gate.max_drop)}).`) : null,
    gated.length ? table([
      ["Step", (s) => `${s.index}: ${s.kind}`],
      ["Metric", (s) => s.gate.metric],
      ["Against", (s) => s.gate.against || "teacher"],
      ["Teacher", (s) => fmtNum(s.gate.teacher)],
      ["Step output", (s) => fmtNum(s.gate.value)],
      ["Drop", (s) => fmtNum(s.gate.drop)],
      ["Allowed", (s) => (s.gate.against === "labels" ? `≥ ${fmtNum(s.gate.min)}` : `≤ ${fmtNum(s.gate.max_drop)}`)],
      ["Verdict", (s) => (s.gate.passed ? "passed" : h("strong", {class: "error"},
        s.index === tripped ? "tripped" : "failed"))],
    ], gated) : null);
}

function warningsSection(report) {
  const warnings = report.warnings || [];
  if (!warnings.length) return null;
  return h("section", {class: "report-warnings", id: "report-warnings"}, h("h3", {}, "Warnings"),
    ...warnings.map((w) => h("p", {class: "warning"}, h("strong", {}, w.code), ": ", w.message)));
}

// A student search (docs/search.md): one row per trial, the winner marked.
function searchSection(report) {
  const search = report.search;
  if (!search || !Array.isArray(search.trials)) return null;
  return h("section", {class: "report-search"},
    h("h3", {}, `Search: ${search.objective} within ${fmtNum(search.max_drop)} ${search.metric} of the teacher`),
    h("div", {class: "scroll"}, table([
      ["Trial", (t) => (t.number === search.winner ? h("strong", {}, `${t.number} (winner)`) : String(t.number))],
      ["Student", (t) => (typeof t.student === "string" ? t.student : JSON.stringify(t.student ?? t.params ?? {}))],
      ["Status", (t) => t.status],
      ["Parameters", (t) => fmtNum(t.num_parameters)],
      ["Latency b1 (ms)", (t) => fmtNum(t.latency_ms?.batch_1 ?? t.latency_ms, 3)],
      [search.metric, (t) => fmtNum(t.metric)],
      ["Drop", (t) => fmtNum(t.drop)],
      ["Worker", (t) => t.worker ?? "—"],
    ], search.trials, {class: "report-table", id: "search-trials"})));
}

function gainSection(report) {
  const gain = report.teacher_gain;
  if (!gain || !Object.keys(gain).length) return null;
  return h("section", {}, h("h3", {}, "Teacher gain (distilled − baseline)"),
    table([["Metric", ([k]) => k], ["Baseline", ([k]) => fmtNum(report.baseline?.[k])],
           ["Distilled", ([k]) => fmtNum(report.student?.[k])], ["Gain", ([, v]) => fmtNum(v)]],
          Object.entries(gain), {id: "teacher-gain"}));
}

function reproducibility(report) {
  const r = report.reproducibility || {};
  const pairs = Object.entries(r).map(([k, v]) => [k, typeof v === "object" && v !== null ? JSON.stringify(v) : v]);
  return h("details", {}, h("summary", {}, "Reproducibility"),
    table([["Field", ([k]) => k], ["Value", ([, v]) => h("span", {class: "mono wrap"}, fmtNum(v))]], pairs));
}

/** The whole report section for `report` (the parsed report.json). */
export function reportView(report) {
  return h("div", {class: "report", id: "report"},
    h("div", {class: "stats"},
      h("div", {class: "stat"}, h("span", {class: "label"}, "compression"), h("strong", {}, fmtRatio(report.compression_ratio))),
      h("div", {class: "stat"}, h("span", {class: "label"}, "parameters"), h("strong", {}, fmtRatio(report.parameter_ratio))),
      h("div", {class: "stat"}, h("span", {class: "label"}, "speedup (b32)"), h("strong", {}, fmtRatio(report.speedup)))),
    warningsSection(report),
    h("h3", {}, "Teacher vs each step"),
    h("div", {class: "scroll"}, comparisonTable(report)),
    searchSection(report),
    gainSection(report),
    gatesSection(report),
    reproducibility(report));
}
