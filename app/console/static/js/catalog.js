// Models and datasets: an upload form (multipart, as the API takes it) beside the tenant's list, each row with
// what inspection found (format, parameters, architecture / schema) and a delete button.

import {api} from "./api.js";
import {fill, fmtBytes, fmtTime, h, pretty} from "./dom.js";
import {clearErrors, field, nextId, showProblem} from "./forms.js";
import {pagedList} from "./paged.js";

/** A text input or textarea for form field `name` (data-path = the name, as the API's errors give it). */
export function textInput(name, attrs = {}, multiline = false) {
  return h(multiline ? "textarea" : "input", {id: nextId(name), name, dataset: {path: name}, ...(multiline ? {rows: 3}
    : {type: "text"}), ...attrs});
}

/** A <select> of `options` for form field `name`; `blank` labels an empty first choice (field left out). */
export function choice(name, options, blank) {
  return h("select", {id: nextId(name), name, dataset: {path: name}},
    blank ? h("option", {value: ""}, blank) : null, options.map((o) => h("option", {value: o}, o)));
}

/**
 * The page: `title`, the collection `path` (v1/models), `uploadFields(caps)` -> [[label, control, help]],
 * `columns` for the list (an inspection column and a delete button are added).
 */
export function catalogPage(view, {title, path, noun, uploadFields, columns, inspected}) {
  const listBox = h("section", {class: "card", id: `${noun}-list`});
  const formBox = h("section", {class: "card", id: `${noun}-upload`}, h("p", {class: "muted"}, "Loading…"));
  view.append(h("div", {class: "page-head"}, h("h1", {}, title)), formBox, listBox);
  const remove = async (row, note) => {
    if (!window.confirm(`Delete ${noun} ${row.name}?`)) return;
    try {
      await api(`${path}/${encodeURIComponent(row.id)}`, {method: "DELETE"});
      paged.reload();
    } catch (err) {
      fill(note, err.message);
    }
  };
  const paged = pagedList(listBox, {path, every: 10000, empty: `No ${noun}s yet.`, columns: [
    ["Name", (r) => h("span", {class: "name"}, r.name)],
    ["Id", (r) => h("code", {}, r.id)],
    ...columns,
    ["Size", (r) => fmtBytes(r.size_bytes)],
    ["sha256", (r) => h("code", {class: "sha"}, r.sha256)],
    ["Created", (r) => fmtTime(r.created_at)],
    ["Inspection", (r) => h("details", {}, h("summary", {}, "found"), h("pre", {}, pretty(inspected(r))))],
    ["", (r) => {
      const note = h("span", {class: "error"});
      return h("span", {}, h("button", {type: "button", class: "danger small", onclick: () => remove(r, note)}, "Delete"), note);
    }],
  ]});

  api("v1/capabilities").then((caps) => fill(formBox, uploadForm(noun, path, uploadFields(caps), paged.reload)))
    .catch((err) => fill(formBox, h("p", {class: "error"}, `cannot load the form: ${err.message}`)));
  return paged.stop;
}

function uploadForm(noun, path, fields, reload) {
  const file = h("input", {type: "file", id: nextId("file"), name: "file", dataset: {path: "file"}, required: true});
  const summary = h("div", {class: "form-summary error", role: "alert"});
  const done = h("p", {class: "ok", role: "status"});
  const submit = h("button", {type: "submit"}, `Upload ${noun}`);
  const form = h("form", {id: `upload-${noun}`, noValidate: true, onsubmit: async (e) => {
    e.preventDefault();
    clearErrors(form);
    fill(done);
    const data = new FormData();
    if (file.files[0]) data.append("file", file.files[0]);
    for (const [, control] of fields) if (control.value !== "") data.append(control.name, control.value);
    submit.disabled = true;
    fill(done, "uploading and inspecting…");
    try {
      const row = await api(path, {method: "POST", form: data});
      fill(done, `created ${row.id}`);
      form.reset();
      reload();
    } catch (err) {
      fill(done);
      showProblem(form, err);
    } finally {
      submit.disabled = false;
    }
  }}, h("h2", {}, `Upload a ${noun}`), summary, field("File", file),
  fields.map(([label, control, helpText]) => field(label, control, helpText)), submit, done);
  return form;
}
