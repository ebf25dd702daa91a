// Live updates: tables marked data-live poll the server for newer rows (server-rendered,
// already escaped) and insert the ones not shown yet. No inline script: the CSP forbids it.
"use strict";

function newestReceived(tbody) {
  let newest = "";
  for (const row of tbody.querySelectorAll("tr[data-received]")) {
    if (row.dataset.received > newest) newest = row.dataset.received;
  }
  return newest;
}

async function poll(table) {
  const tbody = table.tBodies[0];
  const since = newestReceived(tbody);
  const url = table.dataset.live + (since ? "&since=" + encodeURIComponent(since) : "");
  let response;
  try {
    response = await fetch(url, { credentials: "same-origin", headers: { Accept: "text/html" } });
  } catch (error) {
    return; // offline for a moment: try again at the next tick
  }
  if (!response.ok) return;
  const holder = document.createElement("template");
  holder.innerHTML = "<table><tbody>" + (await response.text()) + "</tbody></table>";
  const rows = [...holder.content.querySelectorAll("tr[data-id]")].reverse();
  let added = 0;
  for (const row of rows) {
    if (tbody.querySelector(`tr[data-id="${CSS.escape(row.dataset.id)}"]`)) continue;
    row.classList.add("fresh");
    tbody.prepend(row);
    added += 1;
  }
  if (added) {
    const empty = table.parentElement.querySelector(".empty");
    if (empty) empty.remove();
    const status = document.getElementById("live-status");
    if (status) status.textContent = `${added} new just now`;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  for (const table of document.querySelectorAll("table[data-live]")) {
    setInterval(() => poll(table), 2000);
  }
});
