// Server validation errors next to the fields they name. Inputs carry data-path="steps.0.epochs"; an error's
// loc (["body", "steps", 0, "distill", "epochs"]) goes to the field whose path is the longest in-order
// subsequence of it (so discriminator tags in the loc do not matter); the rest go to the form's summary.

import {fill, h} from "./dom.js";
import {ApiError} from "./api.js";

export function clearErrors(form) {
  for (const el of form.querySelectorAll(".field-error")) el.remove();
  for (const el of form.querySelectorAll(".invalid")) el.classList.remove("invalid");
  const summary = form.querySelector(".form-summary");
  if (summary) fill(summary);
}

function subsequence(path, loc) {
  let i = 0;
  for (const part of loc) if (i < path.length && String(part) === path[i]) i += 1;
  return i === path.length;
}

/** Show an ApiError (problem details) on the form; other errors in its summary. */
export function showProblem(form, err) {
  clearErrors(form);
  const summary = form.querySelector(".form-summary");
  if (!(err instanceof ApiError)) { fill(summary, `Request failed: ${err.message}`); return; }
  const fields = Array.from(form.querySelectorAll("[data-path]"));
  const unplaced = [];
  for (const e of err.problem.errors || []) {
    const loc = (e.loc || []).filter((p) => p !== "body");
    let best = null;
    for (const field of fields) {
      const path = field.dataset.path.split(".");
      if (subsequence(path, loc) && (!best || path.length > best.dataset.path.split(".").length)) best = field;
    }
    if (best) {
      for (let d = best.closest("details"); d; d = d.parentElement.closest("details")) d.open = true;
      best.classList.add("invalid");
      best.after(h("span", {class: "field-error", role: "alert"}, e.msg));
    } else {
      unplaced.push(`${loc.join(".")}: ${e.msg}`);
    }
  }
  fill(summary, h("strong", {}, `${err.status} ${err.problem.code || ""}: `), err.message,
       unplaced.length ? h("ul", {}, unplaced.map((m) => h("li", {}, m))) : null);
}

/** A labelled field: label + the control (which carries data-path for error placement). */
export function field(label, control, help) {
  return h("div", {class: "field"}, h("label", {for: control.id}, label), control,
           help ? h("small", {class: "help"}, help) : null);
}

let uid = 0;
export function nextId(prefix) {
  uid += 1;
  return `${prefix}-${uid}`;
}
