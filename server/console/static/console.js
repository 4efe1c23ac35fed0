// ringfence console: progressive enhancement only. Pages work without it; with it the fleet
// filters as you type, the fleet table and the host's isolation state refresh, and the host
// timeline grows without a reload (polling JSON; bounded: one request in flight per poller).
"use strict";

function poll(url, everyMs, onData) {
  let busy = false;
  async function tick() {
    if (busy || document.hidden) return;
    busy = true;
    try {
      const r = await fetch(url, {credentials: "same-origin", headers: {"Accept": "application/json"}});
      if (r.ok) onData(await r.json());
    } catch (e) {
      console.warn("ringfence: poll failed", url, e);
    } finally {
      busy = false;
    }
  }
  setInterval(tick, everyMs);
}

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function fleetFilter() {
  const search = document.getElementById("fleet-search");
  const state = document.getElementById("fleet-state");
  const table = document.getElementById("fleet");
  if (!search || !state || !table) return;
  function apply() {
    const q = search.value.trim().toLowerCase();
    let shown = 0;
    for (const row of table.querySelectorAll("tbody tr[data-host]")) {
      const matchQ = !q || row.dataset.search.includes(q);
      const s = state.value;
      const matchS = !s || (s === "online" && row.dataset.online === "yes")
        || (s === "offline" && row.dataset.online === "no")
        || (s === "isolated" && row.dataset.isolation !== "none")
        || (s === "alerts" && row.dataset.alerts !== "0");
      row.hidden = !(matchQ && matchS);
      if (!row.hidden) shown++;
    }
    const count = document.getElementById("shown-count");
    if (count) count.textContent = String(shown);
  }
  search.addEventListener("input", apply);
  state.addEventListener("change", apply);
  poll(table.dataset.poll, 5000, (data) => {
    const known = new Set();
    for (const h of data.hosts) {
      known.add(h.agent_id);
      const row = table.querySelector(`tr[data-host="${CSS.escape(h.agent_id)}"]`);
      if (!row) { window.location.reload(); return; }   // a new host: re-render server-side
      row.dataset.online = h.online ? "yes" : "no";
      row.dataset.isolation = h.isolation_state;
      row.dataset.alerts = String(h.integrity_alerts);
      const online = row.querySelector('[data-field="online"]');
      online.textContent = h.online ? "online" : "offline";
      online.className = "pill " + (h.online ? "ok" : "off");
      const iso = row.querySelector('[data-field="isolation"]');
      iso.textContent = h.isolation_state;
      iso.className = "pill iso-" + h.isolation_state;
      row.querySelector('[data-field="last_seen"]').textContent = h.last_seen;
    }
    apply();
  });
}

function hostTimeline() {
  const table = document.getElementById("timeline");
  if (!table) return;
  const body = table.querySelector("tbody");
  let after = Number(table.dataset.after || "0");
  let busy = false;
  async function tick() {
    if (busy || document.hidden) return;
    busy = true;
    try {
      const r = await fetch(table.dataset.poll + "?after=" + after, {credentials: "same-origin"});
      if (!r.ok) return;
      const data = await r.json();
      for (const e of data.events) {
        const tr = document.createElement("tr");
        tr.className = `fresh sev-${e.severity_id} kind-${e.kind}`;
        tr.append(cell(String(e.seq)), cell(e.time, "nowrap"), cell(e.kind),
                  cell(e.summary, "mono small"));
        body.prepend(tr);
        after = Math.max(after, e.seq);
      }
      while (body.rows.length > 500) body.deleteRow(body.rows.length - 1);
    } catch (e) {
      console.warn("ringfence: timeline poll failed", e);
    } finally {
      busy = false;
    }
  }
  setInterval(tick, 2000);
}

function hostState() {
  const badge = document.getElementById("isolation-state");
  if (!badge) return;
  let last = badge.textContent.trim();
  poll(badge.dataset.poll, 2000, (data) => {
    const state = data.host.isolation_state;
    badge.textContent = state;
    badge.className = "pill iso-" + state;
    const online = document.getElementById("host-online");
    if (online) {
      online.textContent = data.host.online ? "online" : "offline";
      online.className = "pill " + (data.host.online ? "ok" : "off");
    }
    // The response forms depend on the state: re-render once it settles somewhere new.
    const settled = state === "isolated" || state === "none" || state === "failed";
    if (settled && state !== last && (last === "pending" || last === "releasing")) {
      window.location.reload();
    }
    last = state;
  });
}

document.addEventListener("DOMContentLoaded", () => {
  fleetFilter();
  hostTimeline();
  hostState();
});
