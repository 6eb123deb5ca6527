// Jobs: a status filter, the tenant's jobs newest first (cursor paging), refreshed every 2 s.

import {badge, fmtTime, h} from "../dom.js";
import {pagedList} from "../paged.js";

export const STATUSES = ["queued", "running", "cancelling", "succeeded", "failed", "cancelled"];

export function progressCell(job) {
  const fraction = job.progress?.fraction;
  if (fraction === undefined || fraction === null) return "—";
  return h("span", {class: "mini-progress"}, h("progress", {max: 1, value: fraction}),
           ` ${Math.round(fraction * 100)}%`);
}

function studentOf(spec) {
  const s = spec?.student;
  if (!s) return "(teacher itself)";
  if (s.family) return s.family;
  if (s.model_id) return s.model_id;
  return s.derive ? "derived" : "—";
}

export function render(view, route) {
  const status = route.query.get("status") || "";
  const filter = h("select", {id: "status-filter", "aria-label": "status", onchange: (e) => {
    location.hash = e.target.value ? `#/jobs?status=${encodeURIComponent(e.target.value)}` : "#/jobs";
  }}, h("option", {value: ""}, "all statuses"), STATUSES.map((s) => h("option", {value: s, selected: s === status}, s)));
  const list = h("section", {class: "card", id: "jobs"});
  view.append(h("div", {class: "page-head"}, h("h1", {}, "Jobs"), filter,
                h("a", {class: "button", href: "#/new"}, "New job")), list);
  const paged = pagedList(list, {
    path: "v1/jobs", query: {status}, every: 2000, empty: "No jobs yet.",
    columns: [
      ["Job", (j) => h("a", {href: `#/jobs/${encodeURIComponent(j.id)}`, class: "mono"}, j.id)],
      ["Status", (j) => badge(j.status)],
      ["Progress", progressCell],
      ["Steps", (j) => (j.spec?.steps || []).map((s) => s.kind).join(" → ")],
      ["Student", (j) => studentOf(j.spec)],
      ["Created", (j) => fmtTime(j.created_at)],
    ],
  });
  return paged.stop;
}
