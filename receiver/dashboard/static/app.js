// Live tables: a table marked data-live asks the server every 2 s for the evaluations written
// since it last looked (changed_since), oldest change first, as rows the server rendered
// (already escaped). A row it shows comes back changed: replaced in place. A new one, or one
// that now passes the page's filters: inserted where the table's order puts it. One that no
// longer passes them comes as a hidden data-gone row: removed, not replaced by the next
// older row: that one is on the next page (its link starts after this page's last row), and
// pulled up here it would be shown on both (the overview has no filter to leave). A row
// deleted by `receiver prune` (untouched for its --older-than: seldom on a live table) stays
// until a reload, its link saying there is no such evaluation: a delete leaves no change to
// poll. No inline script: the CSP forbids it.
"use strict";

const ROUNDS = 20; // catching up after a burst: at most this many pages per tick
// Each poll starts a little before the newest change seen: with several writers (PostgreSQL)
// a write stamped a moment before another may commit after it. What comes back unchanged is
// skipped, so the overlap costs a little reading and nothing on the page.
const OVERLAP_MS = 2000;
// table → {timer, mark: the newest updated_at seen, complete, floor: the received_at of the
// oldest row the page covers, busy}
const live = new Map();

// A stored time (2026-11-20T09:14:43.352000Z) moved back by `ms`, in ISO 8601.
function earlier(stamp, ms) {
  const moment = Date.parse(stamp.slice(0, 23) + "Z");
  return Number.isNaN(moment) ? stamp : new Date(moment - ms).toISOString();
}

function say(text) {
  const status = document.getElementById("live-status");
  if (status) status.textContent = text;
}

function stop(table) {
  clearInterval(live.get(table).timer);
  live.delete(table);
  say("Logged out: live updates stopped. Reload the page to log in again.");
}

// The table's order, as the server's: newest received first, ties by the greater id.
function above(row, other) {
  const [mine, theirs] = [row.dataset.received, other.dataset.received];
  return mine > theirs || (mine === theirs && row.dataset.id > other.dataset.id);
}

function place(tbody, row) {
  for (const shown of tbody.rows) {
    if (above(row, shown)) {
      shown.before(row);
      return;
    }
  }
  tbody.append(row);
}

// One row from the server: counted in `seen` as added, updated or gone (or nothing new).
function take(tbody, row, seen) {
  const shown = tbody.querySelector(`tr[data-id="${CSS.escape(row.dataset.id)}"]`);
  if ("gone" in row.dataset) {
    if (shown) {
      shown.remove();
      seen.gone += 1;
    }
    return;
  }
  if (shown && shown.innerHTML === row.innerHTML) {
    shown.dataset.changed = row.dataset.changed; // written again, the same on the page
    return;
  }
  row.classList.add("fresh");
  if (shown) {
    shown.replaceWith(row);
    seen.updated += 1;
  } else {
    place(tbody, row);
    seen.added += 1;
  }
}

// The changes come `limit` at a time; a page that says there is more (X-Next-Cursor) is
// followed by the next, so a burst of callbacks leaves none out. A table that does not hold
// every row of its filter (a full page, or trimmed to data-keep) asks only about rows
// received since the oldest it covers (state.floor): one older than that belongs to a later
// page, also once the rows above it have left the filter.
async function poll(table, state) {
  const tbody = table.tBodies[0];
  const url = new URL(table.dataset.live, location.href);
  url.searchParams.set("changed_since", earlier(state.mark, OVERLAP_MS));
  if (!state.complete) url.searchParams.set("since", state.floor);
  const seen = { added: 0, updated: 0, gone: 0 };
  for (let round = 0; round < ROUNDS; round += 1) {
    let response;
    try {
      response = await fetch(url, {
        credentials: "same-origin",
        headers: { Accept: "text/html" },
        redirect: "manual", // a redirect is to /login: the session is over
        signal: AbortSignal.timeout(15000), // a stalled answer must not stop the ticks
      });
    } catch (error) {
      break; // offline for a moment: try again at the next tick
    }
    if (response.type === "opaqueredirect" || response.status === 401) {
      stop(table);
      return;
    }
    if (!response.ok) break;
    const holder = document.createElement("template");
    holder.innerHTML = "<table><tbody>" + (await response.text()) + "</tbody></table>";
    for (const row of holder.content.querySelectorAll("tr[data-id]")) {
      take(tbody, row, seen);
      if (row.dataset.changed > state.mark) state.mark = row.dataset.changed;
    }
    const next = response.headers.get("X-Next-Cursor");
    if (!next) break;
    url.searchParams.set("cursor", next);
  }
  const keep = Number(table.dataset.keep);
  if (keep && tbody.rows.length > keep) {
    while (tbody.rows.length > keep) tbody.lastElementChild.remove();
    state.complete = false;
    state.floor = tbody.lastElementChild.dataset.received;
  }
  const empty = table.nextElementSibling; // "No evaluations yet/match…", shown while no row is
  if (empty && empty.matches(".empty")) empty.hidden = tbody.rows.length > 0;
  const told = [
    [seen.added, "new"],
    [seen.updated, "updated"],
    [seen.gone, "no longer matching"],
  ].filter(([count]) => count);
  if (told.length) say(told.map(([count, what]) => `${count} ${what}`).join(", ") + " just now");
}

async function tick(table) {
  const state = live.get(table);
  if (!state || state.busy) return; // the last poll still runs: it goes on from where it is
  state.busy = true;
  try {
    await poll(table, state);
  } finally {
    state.busy = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  for (const table of document.querySelectorAll("table[data-live]")) {
    const rows = table.tBodies[0].rows;
    live.set(table, {
      timer: setInterval(() => tick(table), 2000),
      mark: table.dataset.changedSince,
      complete: "complete" in table.dataset,
      floor: rows.length ? rows[rows.length - 1].dataset.received : "", // when not complete
      busy: false,
    });
  }
});
