// Live updates: tables marked data-live poll the server for newer rows (server-rendered,
// already escaped) and insert the ones not shown yet. No inline script: the CSP forbids it.
"use strict";

const ROUNDS = 20; // catching up after a burst: at most this many pages per tick
const timers = new Map();

function newestReceived(tbody) {
  let newest = "";
  for (const row of tbody.querySelectorAll("tr[data-received]")) {
    if (row.dataset.received > newest) newest = row.dataset.received;
  }
  return newest;
}

function say(text) {
  const status = document.getElementById("live-status");
  if (status) status.textContent = text;
}

function stop(table) {
  clearInterval(timers.get(table));
  timers.delete(table);
  say("Logged out: live updates stopped. Reload the page to log in again.");
}

// Rows newer than the newest shown come oldest first, `limit` at a time: a page that comes
// back full is followed by the next, so a burst of callbacks leaves none out.
async function poll(table) {
  const tbody = table.tBodies[0];
  const limit = Number(new URL(table.dataset.live, location.href).searchParams.get("limit")) || 10;
  let added = 0;
  for (let round = 0; round < ROUNDS; round += 1) {
    const since = newestReceived(tbody);
    const url = table.dataset.live + (since ? "&since=" + encodeURIComponent(since) : "");
    let response;
    try {
      response = await fetch(url, {
        credentials: "same-origin",
        headers: { Accept: "text/html" },
        redirect: "manual", // a redirect is to /login: the session is over
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
    const rows = [...holder.content.querySelectorAll("tr[data-id]")];
    for (const row of since ? rows : rows.reverse()) {
      if (tbody.querySelector(`tr[data-id="${CSS.escape(row.dataset.id)}"]`)) continue;
      row.classList.add("fresh");
      tbody.prepend(row);
      added += 1;
    }
    if (!since || rows.length < limit) break;
  }
  const keep = Number(table.dataset.keep);
  while (keep && tbody.rows.length > keep) tbody.lastElementChild.remove();
  if (added) {
    const empty = table.parentElement.querySelector(".empty");
    if (empty) empty.remove();
    say(`${added} new just now`);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  for (const table of document.querySelectorAll("table[data-live]")) {
    timers.set(table, setInterval(() => poll(table), 2000));
  }
});
