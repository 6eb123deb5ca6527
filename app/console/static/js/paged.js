// A cursor-paged list of an API collection ({data, has_more, next_cursor}), optionally refreshed live.

import {api} from "./api.js";
import {fill, h, table} from "./dom.js";

/**
 * Render `path`'s pages into `container` as a table of `columns` ([heading, row => cell]).
 * options: query (extra params), limit, every (ms between live refreshes of the page shown), empty (text).
 * Returns {stop, reload}.
 */
export function pagedList(container, {path, query = {}, columns, limit = 20, every = 0, empty = "Nothing yet."}) {
  const body = h("div", {class: "paged-body"});
  const status = h("span", {class: "muted"});
  const cursors = [null];  // the cursor of each page up to the one shown; null = the first page
  const older = h("button", {type: "button", class: "secondary", "data-action": "older", disabled: true,
                             onclick: () => { cursors.push(next); load(); }}, "Older →");
  const newer = h("button", {type: "button", class: "secondary", "data-action": "newer", disabled: true,
                             onclick: () => { cursors.pop(); load(); }}, "← Newer");
  let next = null;
  let timer = null;
  let stopped = false;
  container.append(body, h("div", {class: "pager"}, newer, older, status));

  async function load() {
    clearTimeout(timer);
    try {
      const page = await api(path, {query: {...query, limit, after: cursors.at(-1)}});
      if (stopped) return;
      next = page.next_cursor;
      fill(body, page.data.length ? table(columns, page.data, {class: "list"}) : h("p", {class: "muted"}, empty));
      older.disabled = !page.has_more;
      newer.disabled = cursors.length === 1;
      fill(status, `page ${cursors.length}`);
    } catch (err) {
      if (!stopped) fill(status, `refresh failed: ${err.message}`);
    }
    if (every && !stopped) timer = setTimeout(load, every);
  }

  load();
  return {stop: () => { stopped = true; clearTimeout(timer); }, reload: load};
}
