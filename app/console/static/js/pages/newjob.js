// The new-job form, generated from GET /v1/capabilities: teacher and dataset from this tenant's uploads, the
// student (a family with its schema's fields, an uploaded model, or derived from the teacher), the steps (each
// kind's schema; a distill step's loss is a variant picked by type). POST /v1/jobs; a 422 is shown next to the
// fields it names.

import {api} from "../api.js";
import {fill, h} from "../dom.js";
import {clearErrors, field, nextId, showProblem} from "../forms.js";
import {jsonControl, objectFields} from "../schemaform.js";

function select(path, options, blank) {
  return h("select", {id: nextId("f"), dataset: {path}}, blank ? h("option", {value: ""}, blank) : null,
    options.map(([value, label]) => h("option", {value}, label)));
}

function studentSection(caps, models) {
  const families = caps.student_families || [];
  const source = select("student", [["family", "a built-in family"], ["model_id", "an uploaded model"],
                                    ["derive", "derived from the teacher"], ["none", "none (steps act on the teacher)"]]);
  source.id = "student-source";
  const box = h("div", {class: "nested"});
  let current = null;

  const familyPart = () => {
    const family = select("student.family", families.map((f) => [f.name, f.name]));
    family.id = "student-family";
    const inner = h("div");
    let fields = null;
    const redraw = () => {
      const f = families.find((x) => x.name === family.value);
      fields = objectFields(f.config_schema, f.config_schema.$defs || {}, "student", ["family"]);
      fill(inner, f.description ? h("p", {class: "help"}, f.description) : null, fields.el);
    };
    family.addEventListener("change", redraw);
    redraw();
    return {el: h("div", {}, field("Family", family), inner), get: () => ({family: family.value, ...fields.get()})};
  };
  const modelPart = () => {
    const m = select("student.model_id", models.map((x) => [x.id, `${x.name} (${x.id})`]));
    return {el: field("Student model", m), get: () => ({model_id: m.value})};
  };
  const derivePart = () => {
    const derive = objectFields({properties: {width: {type: "number", default: 0.5, description: "Width factor"},
                                              depth: {type: "number", default: 0.5, description: "Depth factor"}}},
                                {}, "student.derive");
    return {el: derive.el, get: () => ({derive: derive.get()})};
  };
  const parts = {family: familyPart, model_id: modelPart, derive: derivePart, none: () => ({el: null, get: () => undefined})};
  const redraw = () => {
    current = parts[source.value]();
    fill(box, current.el);
  };
  source.addEventListener("change", redraw);
  redraw();
  return {el: h("fieldset", {id: "student"}, h("legend", {}, "Student"), field("Source", source), box),
          get: () => current.get()};
}

function stepsSection(caps) {
  const kinds = caps.step_kinds || [];
  const list = h("div", {id: "steps"});
  const steps = [];

  const reindex = () => steps.forEach((s, i) => {
    fill(s.legend, `Step ${i + 1}: ${s.kind}`);
    for (const el of s.el.querySelectorAll("[data-path]")) el.dataset.path = el.dataset.path.replace(/^steps\.\d+/, `steps.${i}`);
  });
  const add = (kind) => {
    const info = kinds.find((k) => k.name === kind);
    const schema = info.config_schema;
    const fields = objectFields(schema, schema.$defs || {}, `steps.${steps.length}`, ["kind"]);
    const legend = h("legend");
    const step = {kind, legend, get: () => ({kind, ...fields.get()})};
    step.el = h("fieldset", {class: "step", dataset: {kind}}, legend,
      info.description ? h("p", {class: "help"}, info.description) : null, fields.el,
      h("button", {type: "button", class: "secondary remove-step", onclick: () => {
        steps.splice(steps.indexOf(step), 1);
        step.el.remove();
        reindex();
      }}, "Remove step"));
    steps.push(step);
    list.append(step.el);
    reindex();
  };
  const kind = select("", kinds.map((k) => [k.name, k.name]));
  kind.id = "add-step-kind";
  const addButton = h("button", {type: "button", class: "secondary", id: "add-step", onclick: () => add(kind.value)},
                      "Add step");
  if (kinds.some((k) => k.name === "distill")) add("distill");
  return {el: h("fieldset", {}, h("legend", {}, "Steps (run in order)"), list,
                h("div", {class: "toolbar", dataset: {path: "steps"}}, kind, addButton)),
          get: () => steps.map((s) => s.get())};
}

export function render(view) {
  const root = h("section", {class: "card"}, h("p", {class: "muted"}, "Loading capabilities…"));
  view.append(h("div", {class: "page-head"}, h("h1", {}, "New job")), root);
  let stopped = false;
  Promise.all([api("v1/capabilities"), api("v1/models", {query: {limit: 100}}), api("v1/datasets", {query: {limit: 100}})])
    .then(([caps, models, datasets]) => { if (!stopped) fill(root, form(caps, models.data, datasets.data)); })
    .catch((err) => fill(root, h("p", {class: "error"}, `cannot load the form: ${err.message}`)));
  return () => { stopped = true; };
}

function form(caps, models, datasets) {
  const teacher = select("teacher_model_id", models.map((m) => [m.id, `${m.name} (${m.format}, ${m.task})`]), "— choose —");
  teacher.id = "teacher";
  const dataset = select("dataset_id", datasets.map((d) => [d.id, `${d.name} (${d.format}, ${d.num_rows} rows)`]),
                         "— choose —");
  dataset.id = "dataset";
  const student = studentSection(caps, models);
  const steps = stepsSection(caps);
  const top = objectFields({properties: {
    val_fraction: {type: "number", description: "Held-out share of the data when it has no validation split"},
    seed: {type: "integer"}}}, {}, "");
  const exports = (caps.export_formats || []).map((f) => h("label", {class: "inline"},
    h("input", {type: "checkbox", value: f, class: "export", dataset: {path: "exports"}}), ` ${f}`));
  const metadata = jsonControl("metadata", '{"team": "search"}');
  const extra = jsonControl("", '{"tracking": {...}} - more top-level fields, merged into the body');
  const summary = h("div", {class: "form-summary error", role: "alert"});
  const submit = h("button", {type: "submit", id: "submit-job"}, "Create job");

  const body = () => {
    const out = {teacher_model_id: teacher.value || undefined, dataset_id: dataset.value || undefined};
    const s = student.get();
    if (s !== undefined) out.student = s;
    out.steps = steps.get();
    Object.assign(out, top.get());
    const chosen = exports.map((l) => l.querySelector("input")).filter((i) => i.checked).map((i) => i.value);
    if (chosen.length) out.exports = chosen;
    if (metadata.get() !== undefined) out.metadata = metadata.get();
    const more = extra.get();
    return more && typeof more === "object" ? {...out, ...more} : out;
  };

  const el = h("form", {id: "new-job", noValidate: true, onsubmit: async (e) => {
    e.preventDefault();
    clearErrors(el);
    submit.disabled = true;
    try {
      const job = await api("v1/jobs", {method: "POST", json: body()});
      location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
    } catch (err) {
      showProblem(el, err);
    } finally {
      submit.disabled = false;
    }
  }},
  summary,
  h("fieldset", {}, h("legend", {}, "Inputs"), field("Teacher model", teacher), field("Dataset", dataset)),
  student.el, steps.el,
  h("fieldset", {}, h("legend", {}, "Options"), top.el,
    h("div", {class: "field"}, h("span", {class: "label"}, "Exports (none ticked: the task's defaults)"),
      h("div", {dataset: {path: "exports"}}, exports)),
    field("Metadata (JSON)", metadata.el), field("More fields (JSON)", extra.el)),
  submit);
  return el;
}
