// The console's only way to the server: the public API, authenticated with the pasted key.
// The key lives in this tab's sessionStorage (gone when the tab closes, never in a URL or a cookie) and travels
// only as `Authorization: Bearer`. Downloads and plots are fetched the same way and shown through blob URLs.

const KEY_NAME = "distillery.apiKey";
// The API lives beside the console: <prefix>/console/ -> <prefix>/ (works behind a path-prefix proxy too).
const BASE = new URL("../", document.baseURI);

export const session = {
  key: () => sessionStorage.getItem(KEY_NAME),
  signIn: (key) => sessionStorage.setItem(KEY_NAME, key),
  signOut: () => sessionStorage.removeItem(KEY_NAME),
};

/** An error answer of the API (problem details): .status, .problem ({detail, code, errors: [{loc, msg}]}). */
export class ApiError extends Error {
  constructor(status, problem) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
  }
}

export function url(path, query = {}) {
  const u = new URL(path.replace(/^\//, ""), BASE);
  for (const [k, v] of Object.entries(query)) if (v !== undefined && v !== null && v !== "") u.searchParams.set(k, v);
  return u;
}

async function request(path, {method = "GET", query, json, form, headers = {}, signal} = {}) {
  const init = {method, signal, headers: {...headers, Authorization: `Bearer ${session.key() || ""}`},
                credentials: "omit", cache: "no-store"};
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers["Content-Type"] = "application/json";
  } else if (form !== undefined) {
    init.body = form;
  }
  const res = await fetch(url(path, query), init);
  if (!res.ok) {
    let problem;
    try { problem = await res.json(); } catch { problem = {detail: `${res.status} ${res.statusText}`}; }
    if (res.status === 401) window.dispatchEvent(new CustomEvent("distillery:unauthorized"));
    throw new ApiError(res.status, problem);
  }
  return res;
}

/** JSON of a successful call (null for 204); throws ApiError otherwise. */
export async function api(path, options) {
  const res = await request(path, options);
  return res.status === 204 ? null : res.json();
}

export async function blob(path, options) {
  return (await request(path, options)).blob();
}

export async function text(path, options) {
  return (await request(path, options)).text();
}

/** Hex sha256 of a Blob (WebCrypto: needs a secure context - https or localhost); null where unavailable. */
export async function sha256(data) {
  if (!globalThis.crypto?.subtle) return null;
  const digest = await crypto.subtle.digest("SHA-256", await data.arrayBuffer());
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * Follow a job's events live: GET /v1/jobs/{id}/events with Accept: text/event-stream, read with fetch (an
 * EventSource cannot send the bearer header). Calls onEvent(event) for each, onEnd() when the job is over;
 * reconnects after a dropped connection from the last seq seen. Returns a function that stops following.
 */
export function followEvents(jobId, {onEvent, onEnd, onError}) {
  const controller = new AbortController();
  let after = 0;
  let failures = 0;

  async function once() {
    const res = await request(`v1/jobs/${encodeURIComponent(jobId)}/events`,
      {query: {after}, headers: {Accept: "text/event-stream"}, signal: controller.signal});
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) return false;
      failures = 0;
      buffer += value;
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const message = parseBlock(block);
        if (message.event === "end") return true;
        if (message.data) {
          const event = JSON.parse(message.data);
          after = Math.max(after, event.seq);
          onEvent(event);
        }
      }
    }
  }

  (async () => {
    while (!controller.signal.aborted) {
      try {
        if (await once()) { onEnd?.(); return; }
      } catch (err) {
        if (controller.signal.aborted) return;
        if (err instanceof ApiError && err.status < 500) { onError?.(err); return; }
        failures += 1;
      }
      // Dropped: back off (at most 10 s), then resume after the last event seen.
      await new Promise((resolve) => setTimeout(resolve, Math.min(10000, 500 * 2 ** Math.min(failures, 5))));
    }
  })();
  return () => controller.abort();
}

function parseBlock(block) {
  const message = {data: ""};
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "data") message.data += value;
    else message[field] = value;
  }
  return message;
}
