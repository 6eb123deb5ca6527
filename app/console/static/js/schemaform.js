// Form controls generated from the JSON schemas in GET /v1/capabilities (step kinds, losses, students).
// Each control carries data-path (its place in the request body, e.g. "steps.0.loss.temperature") so the
// server's 422 errors land next to it. Nothing is validated here: a blank control is left out of the body (the
// server fills its default), and whatever the user typed goes to the server, whose verdict is shown.

import {fill, h} from "./dom.js";
import {field, nextId} from "./forms.js";

function resolve(schema, defs) {
  let s = schema || {};
  for (let i = 0; s.$ref && i < 16; i += 1) s = defs[s.$ref.split("/").pop()] || {};
  return s;
}

function help(s) {
  const bits = [];
  if (s.description) bits.push(s.description.split("\n")[0]);
  if (s.default !== undefined && s.default !== null) bits.push(`default ${JSON.stringify(s.default)}`);
  return bits.join(" · ");
}

const PRIMITIVES = new Set(["integer", "number", "string", "boolean"]);
const join = (path, name) => (path ? `${path}.${name}` : name);

function input(path, attrs = {}) {
  return h("input", {id: nextId("f"), dataset: {path}, ...attrs});
}

function numberControl(s, path) {
  const el = input(path, {type: "number", step: "any", placeholder: s.default ?? ""});
  return {el, get: () => (el.value === "" ? undefined : Number(el.value))};
}

function textControl(s, path) {
  const el = input(path, {type: "text", placeholder: s.default ?? ""});
  return {el, get: () => (el.value === "" ? undefined : el.value)};
}

function selectControl(options, path, required, def) {
  const el = h("select", {id: nextId("f"), dataset: {path}},
    required ? null : h("option", {value: ""}, def === undefined || def === null ? "(default)" : `(default: ${def})`),
    options.map((o) => h("option", {value: JSON.stringify(o)}, String(o))));
  return {el, get: () => (el.value === "" ? undefined : JSON.parse(el.value))};
}

function listControl(s, path) {
  const numeric = ["integer", "number"].includes(s.items?.type);
  const el = input(path, {type: "text", placeholder: s.default ? s.default.join(", ") : "comma-separated"});
  return {el, get: () => {
    if (el.value.trim() === "") return undefined;
    const parts = el.value.split(",").map((v) => v.trim()).filter((v) => v !== "");
    return numeric ? parts.map((v) => (Number.isNaN(Number(v)) ? v : Number(v))) : parts;
  }};
}

/** An object's own fields, folded away until wanted; left out of the body while none is set. */
function nestedControl(s, defs, path) {
  const inner = objectFields(s, defs, path);
  return {el: h("details", {class: "nested"}, h("summary", {}, "set fields"), inner.el), get: () => {
    const value = inner.get();
    return Object.keys(value).length ? value : undefined;
  }};
}

/** A value of several simple types (e.g. an integer or "auto"): a number or true/false if it reads as one. */
function looseControl(s, path) {
  const el = input(path, {type: "text", placeholder: s.default ?? ""});
  return {el, get: () => {
    const v = el.value.trim();
    if (v === "") return undefined;
    try {
      const parsed = JSON.parse(v);
      return typeof parsed === "number" || typeof parsed === "boolean" ? parsed : v;
    } catch {
      return v;
    }
  }};
}

/** Anything the form cannot draw as one control: JSON typed by hand (sent as a string if it does not parse). */
export function jsonControl(path, placeholder = "JSON") {
  const el = h("textarea", {id: nextId("f"), dataset: {path}, rows: 2, placeholder});
  return {el, get: () => {
    if (el.value.trim() === "") return undefined;
    try { return JSON.parse(el.value); } catch { return el.value; }
  }};
}

/** The discriminated union (e.g. a loss): pick the variant, then its own fields. */
function variantControl(s, defs, path, required) {
  const tag = s.discriminator.propertyName;
  const mapping = s.discriminator.mapping || {};
  const chosen = selectControl(Object.keys(mapping), join(path, tag), required, resolve(s, defs).default?.[tag]);
  const box = h("div", {class: "nested"});
  let inner = null;
  const redraw = () => {
    const key = chosen.get();
    inner = key === undefined ? null : objectFields(resolve({$ref: mapping[key]}, defs), defs, path, [tag]);
    fill(box, inner ? inner.el : null);
  };
  chosen.el.addEventListener("change", redraw);
  return {el: h("div", {}, chosen.el, box), get: () => {
    const key = chosen.get();
    return key === undefined ? undefined : {[tag]: key, ...(inner?.get() || {})};
  }};
}

function control(prop, defs, path, required) {
  const s = resolve(prop, defs);
  if (s.oneOf && s.discriminator) return variantControl(s, defs, path, required);
  if (s.anyOf) {
    const options = s.anyOf.map((o) => resolve(o, defs)).filter((o) => o.type !== "null");
    if (options.length === 1 && (PRIMITIVES.has(options[0].type) || options[0].enum)) {
      return control({...options[0], default: s.default, description: s.description}, defs, path, false);
    }
    if (options.length === 1 && options[0].properties) return nestedControl(options[0], defs, path);
    if (options.every((o) => PRIMITIVES.has(o.type) || o.enum || o.const !== undefined)) return looseControl(s, path);
    return jsonControl(path);
  }
  if (s.enum) return selectControl(s.enum, path, required, s.default);
  if (s.type === "integer" || s.type === "number") return numberControl(s, path);
  if (s.type === "string") return textControl(s, path);
  if (s.type === "boolean") return selectControl([true, false], path, required, s.default);
  if (s.type === "array" && PRIMITIVES.has(s.items?.type)) return listControl(s, path);
  if (s.properties) return nestedControl(s, defs, path);
  return jsonControl(path);
}

/**
 * Controls for an object schema's properties (minus `skip` and constants) under `path`.
 * Returns {el, get}: get() -> the object of the values set (properties left blank are omitted).
 */
export function objectFields(schema, defs, path, skip = []) {
  const s = resolve(schema, defs);
  const required = new Set(s.required || []);
  const parts = [];
  for (const [name, prop] of Object.entries(s.properties || {})) {
    const resolved = resolve(prop, defs);
    if (skip.includes(name) || resolved.const !== undefined) continue;
    const c = control(prop, defs, join(path, name), required.has(name));
    parts.push([name, c, field(prop.title || name, c.el, help({...resolved, ...prop}))]);
  }
  return {
    el: h("div", {class: "fields"}, parts.map(([, , el]) => el)),
    get: () => {
      const out = {};
      for (const [name, c] of parts) {
        const v = c.get();
        if (v !== undefined) out[name] = v;
      }
      return out;
    },
  };
}
