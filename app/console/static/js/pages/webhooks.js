// Webhooks: the tenant's endpoints, a create form (the signing secret is shown once, here), and each endpoint's
// deliveries (#/webhooks/<id>) refreshed live, with a test event button.

import {api} from "../api.js";
import {badge, copyText, fill, fmtTime, h} from "../dom.js";
import {clearErrors, field, nextId, showProblem} from "../forms.js";
import {pagedList} from "../paged.js";

const EVENTS = ["job.queued", "job.running", "job.succeeded", "job.failed", "job.cancelled"];

export function render(view, route) {
  return route.id ? deliveries(view, route.id) : endpoints(view);
}

function endpoints(view) {
  const listBox = h("section", {class: "card", id: "webhook-list"});
  const created = h("div", {id: "webhook-secret"});
  const url = h("input", {type: "url", id: nextId("url"), dataset: {path: "url"}, placeholder: "https://hooks.example.com/distillery",
                          size: 50});
  const description = h("input", {type: "text", id: nextId("desc"), dataset: {path: "description"}});
  const boxes = EVENTS.map((e) => h("input", {type: "checkbox", value: e, checked: true}));
  const summary = h("div", {class: "form-summary error", role: "alert"});
  const form = h("form", {id: "new-webhook", noValidate: true, onsubmit: async (e) => {
    e.preventDefault();
    clearErrors(form);
    const body = {url: url.value, events: boxes.filter((b) => b.checked).map((b) => b.value)};
    if (description.value) body.description = description.value;
    try {
      const hook = await api("v1/webhooks", {method: "POST", json: body});
      const secret = h("code", {class: "secret"}, hook.secret);
      fill(created, h("div", {class: "notice"},
        h("p", {}, "Signing secret for ", h("code", {}, hook.url), ": shown this once; store it now."), secret, " ",
        h("button", {type: "button", class: "secondary", onclick: () => copyText(hook.secret, secret)}, "Copy")));
      form.reset();
      paged.reload();
    } catch (err) {
      showProblem(form, err);
    }
  }}, h("h2", {}, "Add an endpoint"), summary, field("URL", url), field("Description", description),
  h("div", {class: "field", dataset: {path: "events"}}, h("span", {class: "label"}, "Events"),
    boxes.map((b) => h("label", {class: "inline"}, b, ` ${b.value}`))),
  h("button", {type: "submit"}, "Create webhook"));
  view.append(h("div", {class: "page-head"}, h("h1", {}, "Webhooks")), h("section", {class: "card"}, form, created), listBox);
  const paged = pagedList(listBox, {path: "v1/webhooks", every: 10000, empty: "No webhooks yet.", columns: [
    ["URL", (w) => h("a", {href: `#/webhooks/${encodeURIComponent(w.id)}`}, w.url)],
    ["Events", (w) => w.events.join(", ")],
    ["Description", (w) => w.description ?? ""],
    ["Enabled", (w) => (w.enabled ? "yes" : `no: ${w.disabled_reason ?? ""}`)],
    ["Created", (w) => fmtTime(w.created_at)],
    ["", (w) => h("button", {type: "button", class: "danger small", onclick: async () => {
      if (!window.confirm(`Delete the webhook to ${w.url}?`)) return;
      await api(`v1/webhooks/${encodeURIComponent(w.id)}`, {method: "DELETE"}).catch(() => null);
      paged.reload();
    }}, "Delete")],
  ]});
  return paged.stop;
}

function deliveries(view, id) {
  const path = `v1/webhooks/${encodeURIComponent(id)}`;
  const head = h("p", {class: "muted"});
  const note = h("span", {class: "muted", role: "status"});
  const listBox = h("section", {class: "card", id: "deliveries"});
  view.append(h("div", {class: "page-head"}, h("a", {href: "#/webhooks"}, "← Webhooks"), h("h1", {class: "mono"}, id),
    h("button", {type: "button", class: "secondary", onclick: async () => {
      try {
        fill(note, `test queued: ${(await api(`${path}/test`, {method: "POST"})).delivery_id}`);
        paged.reload();
      } catch (err) {
        fill(note, err.message);
      }
    }}, "Send test event"), note), head, listBox);
  api(path).then((w) => fill(head, `${w.url} · ${w.events.join(", ")} · ${w.enabled ? "enabled" : "disabled"}`))
    .catch((err) => fill(head, err.message));
  const paged = pagedList(listBox, {path: `${path}/deliveries`, every: 3000, empty: "No deliveries yet.", columns: [
    ["Event", (d) => d.event_type], ["Status", (d) => badge(d.status)], ["Attempts", (d) => d.attempt],
    ["HTTP", (d) => d.response_status ?? "—"], ["Latency (ms)", (d) => d.latency_ms ?? "—"],
    ["Next attempt", (d) => fmtTime(d.next_attempt_at)], ["Last error", (d) => d.last_error ?? ""],
    ["Message id", (d) => h("code", {}, d.message_id)], ["Created", (d) => fmtTime(d.created_at)],
  ]});
  return paged.stop;
}
