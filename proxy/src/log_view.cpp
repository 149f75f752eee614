// The live log view served at an admin endpoint's /log: one page, no external resources.
// It polls /log/events and /status of every tier named in ?tiers= (admin base URLs; by
// default its own), shows the access log of all of them newest first, filters like TMG's
// log viewer (tier, rule, client, user, fault, status, path; also from the query string,
// so a filtered view is a link), and draws the chain of tiers with each hop's health and
// its rules' hit counts.
#include "log_view.hpp"

namespace dmz::proxy {

const char* const log_view_html = R"html(<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dmzproxy live log</title>
<style>
body{font:13px system-ui,sans-serif;margin:12px;color:#222}
h1{font-size:16px;margin:0 0 8px}
#topology{display:flex;align-items:flex-start;gap:6px;margin-bottom:10px;flex-wrap:wrap}
.hop{border:2px solid #999;border-radius:6px;padding:6px 8px;min-width:150px}
.hop[data-health=ok]{border-color:#2a2}.hop[data-health=fault]{border-color:#c22}.hop[data-health=down]{border-color:#c22;background:#fee}
.hop h2{font-size:13px;margin:0 0 4px}.hop ul{margin:0;padding-left:16px}
.arrow{align-self:center;font-size:18px;color:#777}
#filters input{width:110px;margin-right:4px}
table{border-collapse:collapse;width:100%;margin-top:8px;table-layout:fixed}
td,th{border-bottom:1px solid #ddd;padding:2px 6px;text-align:left;vertical-align:top;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
td.wrap{white-space:normal;overflow-wrap:anywhere}
tr[data-fault]:not([data-fault=""]){background:#fff3f3}
#state{color:#777;margin-left:8px}
</style></head><body>
<h1>dmzproxy live log <span id="state"></span></h1>
<div id="topology"></div>
<div id="filters">
<input id="f-tier" placeholder="tier"><input id="f-rule" placeholder="rule"><input id="f-client" placeholder="client">
<input id="f-user" placeholder="user"><input id="f-fault" placeholder="fault class"><input id="f-status" placeholder="status">
<input id="f-path" placeholder="path or recipient">
</div>
<table><colgroup><col style="width:150px"><col style="width:80px"><col style="width:120px"><col style="width:105px">
<col style="width:80px"><col><col style="width:48px"><col style="width:130px"><col><col style="width:52px"></colgroup><thead><tr><th>time</th><th>tier</th><th>rule</th><th>client</th><th>user</th><th>request</th><th>status</th>
<th>fault</th><th>detail</th><th>ms</th></tr></thead><tbody id="rows"></tbody></table>
<script>
"use strict";
const q = new URLSearchParams(location.search);
const tiers = (q.get("tiers") || location.origin).split(",").map(s => s.trim().replace(/\/+$/, "")).filter(s => s);
const keys = ["tier", "rule", "client", "user", "fault", "status", "path"];
const filters = {};
for (const k of keys) {
  const el = document.getElementById("f-" + k);
  el.value = q.get(k) || "";
  filters[k] = el.value;
  el.addEventListener("input", () => {
    filters[k] = el.value;
    const u = new URL(location.href);
    if (el.value) u.searchParams.set(k, el.value); else u.searchParams.delete(k);
    history.replaceState(null, "", u);
    render();
  });
}
const state = tiers.map(url => ({url, next: 0, lines: [], status: null, up: false}));
const MAX = 2000;
function field(r, k) {
  switch (k) {
    case "tier": return r.instance || "";
    case "client": return r.original_client || r.client || "";
    case "status": return String(r.status || "");
    case "path": return r.protocol === "smtp" ? (r.mail_from || "") + " " + (r.rcpt_accepted || []).join(" ") +
                       " " + (r.rcpt_refused || []).map(x => x.rcpt).join(" ") : (r.path || "");
    default: return r[k] || "";
  }
}
function matches(r) {
  for (const k of keys) {
    const want = filters[k].trim().toLowerCase();
    if (!want) continue;
    const have = field(r, k).toLowerCase();
    if (k === "status" ? !have.startsWith(want) : !have.includes(want)) return false;
  }
  return true;
}
// Every column fits the window: long requests and details wrap, the rest is cut with an
// ellipsis and shown whole on hover.
function cell(tr, text, wrap) {
  const td = document.createElement("td");
  td.textContent = text;
  td.title = text;
  if (wrap) td.className = "wrap";
  tr.appendChild(td);
}
function render() {
  const all = [];
  for (const s of state) for (const r of s.lines) all.push(r);
  all.sort((a, b) => (b.time || "").localeCompare(a.time || ""));
  const body = document.getElementById("rows");
  body.textContent = "";
  let shown = 0;
  for (const r of all) {
    if (!matches(r) || shown >= 500) continue;
    const tr = document.createElement("tr");
    tr.className = "row";
    tr.dataset.tier = r.instance || "";
    tr.dataset.rule = r.rule || "";
    tr.dataset.status = String(r.status || "");
    tr.dataset.fault = r.fault || "";
    tr.dataset.path = r.path || "";
    cell(tr, (r.time || "").replace("T", " ").replace("Z", ""));
    cell(tr, r.instance || "");
    cell(tr, r.rule || "");
    cell(tr, field(r, "client"));
    cell(tr, r.user || "");
    cell(tr, r.protocol === "smtp" ? "SMTP " + field(r, "path") : (r.method || "") + " " + (r.path || ""), true);
    cell(tr, r.status ? String(r.status) : "");
    cell(tr, r.fault || "");
    cell(tr, r.detail || "", true);
    cell(tr, r.duration_ms !== undefined ? Number(r.duration_ms).toFixed(1) : "");
    body.appendChild(tr);
    shown++;
  }
  document.getElementById("state").textContent = shown + " of " + all.length + " lines";
  // Whether anything is wider than the window (a horizontal scrollbar): for the tests.
  const page = document.documentElement;
  document.body.dataset.overflow = page.scrollWidth > page.clientWidth ? "yes" : "no";
  drawTopology();
}
function health(s) {
  if (!s.up) return "down";
  const since = Date.now() - 30000;
  const bad = s.lines.some(r => (r.fault || "").startsWith("upstream") && Date.parse(r.time) >= since);
  return bad ? "fault" : "ok";
}
function drawTopology() {
  const t = document.getElementById("topology");
  t.textContent = "";
  const client = document.createElement("div");
  client.className = "hop"; client.dataset.name = "clients"; client.dataset.health = "ok";
  client.innerHTML = "<h2>clients</h2>";
  t.appendChild(client);
  for (const s of state) {
    const arrow = document.createElement("div"); arrow.className = "arrow"; arrow.textContent = "\u2192"; t.appendChild(arrow);
    const hop = document.createElement("div");
    hop.className = "hop";
    const name = s.status ? s.status.instance : s.url;
    hop.dataset.name = name;
    hop.dataset.health = health(s);
    const h = document.createElement("h2");
    h.textContent = name + (s.status ? " (" + s.status.role + ", config v" + s.status.config.version + ")" : " (unreachable)");
    hop.appendChild(h);
    const ul = document.createElement("ul");
    for (const r of (s.status ? s.status.rules : [])) {
      const li = document.createElement("li");
      li.dataset.rule = r.name;
      li.dataset.hits = String(r.hits);
      li.textContent = r.name + ": " + r.hits;
      ul.appendChild(li);
    }
    hop.appendChild(ul);
    t.appendChild(hop);
  }
}
async function poll() {
  await Promise.all(state.map(async s => {
    try {
      const ev = await (await fetch(s.url + "/log/events?since=" + s.next, {cache: "no-store"})).json();
      for (const line of ev.lines) s.lines.push(line);
      if (s.lines.length > MAX) s.lines.splice(0, s.lines.length - MAX);
      s.next = ev.next;
      s.status = await (await fetch(s.url + "/status", {cache: "no-store"})).json();
      s.up = true;
    } catch (e) {
      s.up = false;
    }
  }));
  render();
}
poll();
setInterval(poll, 1000);
</script></body></html>
)html";

}  // namespace dmz::proxy
