// Entry point: sign-in and the hash router. Each page module exports render(view, route) and may return a
// function that stops its timers and streams when the user navigates away.

import {api, ApiError, session} from "./api.js";
import {fill, h} from "./dom.js";
import * as datasets from "./pages/datasets.js";
import * as job from "./pages/job.js";
import * as jobs from "./pages/jobs.js";
import * as models from "./pages/models.js";
import * as newJob from "./pages/newjob.js";
import * as webhooks from "./pages/webhooks.js";

const view = document.getElementById("view");
const nav = document.getElementById("nav");
const PAGES = {jobs, job, models, datasets, new: newJob, webhooks};
let stopPage = null;

/** "#/jobs/job_1?status=running" -> {page: "job", id: "job_1", query: URLSearchParams}. */
export function parseRoute(hash) {
  const [path, search = ""] = hash.replace(/^#\/?/, "").split("?");
  const [first = "jobs", id] = path.split("/").map(decodeURIComponent);
  const page = first === "jobs" && id ? "job" : first;
  return {page: PAGES[page] ? page : "jobs", id, query: new URLSearchParams(search)};
}

function signInPage(message) {
  nav.hidden = true;
  const input = h("input", {type: "password", id: "api-key", name: "api-key", autocomplete: "off",
                            placeholder: "dsk_…", required: true, size: 50});
  const error = h("p", {class: "error", role: "alert"}, message || "");
  const form = h("form", {class: "card signin", id: "signin", onsubmit: async (e) => {
    e.preventDefault();
    session.signIn(input.value.trim());
    try {
      await api("v1/jobs", {query: {limit: 1}});
      route();
    } catch (err) {
      session.signOut();
      fill(error, err instanceof ApiError ? err.message : `cannot reach the API: ${err.message}`);
    }
  }},
  h("h1", {}, "Sign in"),
  h("p", {}, "Paste an API key (", h("code", {}, "distillery keys create --tenant NAME"),
    "). It is kept in this tab only and sent as the bearer header."),
  h("label", {for: "api-key"}, "API key"), input,
  h("button", {type: "submit"}, "Sign in"), error);
  fill(view, form);
  input.focus();
}

function route() {
  if (stopPage) { stopPage(); stopPage = null; }
  if (!session.key()) { signInPage(); return; }
  nav.hidden = false;
  const r = parseRoute(location.hash);
  for (const a of nav.querySelectorAll("a")) {
    a.classList.toggle("active", parseRoute(a.getAttribute("href")).page === (r.page === "job" ? "jobs" : r.page));
  }
  view.replaceChildren();
  const stop = PAGES[r.page].render(view, r);
  stopPage = typeof stop === "function" ? stop : null;
}

window.addEventListener("hashchange", route);
window.addEventListener("distillery:unauthorized", () => {
  if (nav.hidden) return;  // the sign-in form reports its own refusal
  session.signOut();
  if (stopPage) { stopPage(); stopPage = null; }
  signInPage("The key was refused (revoked or invalid): sign in again.");
});
document.getElementById("sign-out").addEventListener("click", () => { session.signOut(); route(); });
route();
