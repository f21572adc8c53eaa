// The refute dispute explorer. Every value from the API is attacker-influenced: it is
// rendered with textContent only (never as markup), and links are built from
// encodeURIComponent'd ids under this origin. The API key lives in sessionStorage and is
// sent only as the X-API-Key header.
"use strict";

const KEY = "refute.apiKey";

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props || {})) {
    if (name === "class") node.className = value;
    else if (name === "href") node.setAttribute("href", value);
    else if (name === "title") node.title = value;
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function setText(id, text) {
  document.getElementById(id).textContent = text;
}

function when(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  return new Date(seconds * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

function iso(text) {
  return text ? String(text).replace("T", " ").replace(/\.\d+/, "") : "—";
}

function short(hex) {
  const text = String(hex === null || hex === undefined ? "—" : hex);
  return text.length > 18 ? text.slice(0, 10) + "…" + text.slice(-6) : text;
}

function disputeLink(id) {
  return el("a", { href: "/explorer/disputes/" + encodeURIComponent(id) }, id);
}

function fill(tableId, rows, classes) {
  const body = document.querySelector("#" + tableId + " tbody");
  body.replaceChildren(...rows.map((cells, i) =>
    el("tr", { class: (classes && classes[i]) || "" }, ...cells.map((c) => el("td", {}, c)))));
}

function facts(id, pairs) {
  const list = document.getElementById(id);
  list.replaceChildren();
  for (const [name, value] of pairs) {
    list.append(el("dt", {}, name), el("dd", {}, value === null || value === undefined ? "—" : value));
  }
}

async function api(path, key) {
  const headers = { Accept: "application/json" };
  if (key) headers["X-API-Key"] = key;
  const answer = await fetch(path, { headers, credentials: "omit", cache: "no-store" });
  const body = await answer.json().catch(() => null);
  if (!answer.ok) {
    const reason = body && body.error ? body.error.reason : answer.statusText;
    throw new Error(answer.status + ": " + reason);
  }
  return body;
}

// --- the network page ---------------------------------------------------------------------

async function showNetwork() {
  const key = sessionStorage.getItem(KEY);
  if (!key) {
    setText("status", "Enter the network's API key.");
    fill("results", []);
    fill("disputes", []);
    return;
  }
  setText("status", "Loading…");
  try {
    const [page, disputes] = await Promise.all([api("/v1/results?limit=200", key),
                                                api("/v1/disputes?limit=500", key)]);
    fill("disputes", disputes.map((d) => [disputeLink(d.id), short(d.result_id),
      short(d.challenger), d.phase, d.verdict || "—", d.lo, d.hi, d.rounds, iso(d.opened_at)]));
    fill("results", page.items.map((r) => [r.id, r.model_id, short(r.provider), r.status,
      iso(r.accepted_at), iso(r.challenge_deadline), r.trace_uploaded ? "uploaded" : "—"]));
    setText("status", page.items.length + " results, " + disputes.length + " disputes.");
  } catch (error) {
    setText("status", "Cannot load: " + error.message);
  }
}

function networkPage() {
  document.getElementById("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = document.getElementById("api-key");
    if (input.value) sessionStorage.setItem(KEY, input.value.trim());
    input.value = "";
    showNetwork();
  });
  document.getElementById("key-forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    showNetwork();
  });
  document.getElementById("open-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const id = document.getElementById("dispute-id").value.trim();
    if (id) window.location.assign("/explorer/disputes/" + encodeURIComponent(id));
  });
  showNetwork();
}

// --- the dispute page ---------------------------------------------------------------------

const MOVES = {
  challenge: (e) => "opened a dispute over states (" + e.lo + ", " + e.hi + "]",
  disclose: () => "disclosed the trace",
  reveal: (e) => "revealed state " + e.state,
  answer: (e) => (e.choice === "agree" ? "agreed with" : "disagreed with") + " state " + e.state,
  tile: (e) => "named tile " + e.tile + " of step " + e.step,
  timeout: () => "applied a timeout",
  rangeoutcome: (e) => "proved the range of state " + e.state,
  proofoutcome: (e) => "proved step " + e.step + (e.tile === null ? "" : " (tile " + e.tile + ")"),
  close: () => "closed the dispute",
  verdict: (e) => "verdict " + e.verdict,
};

function renderDispute(record) {
  const d = record.dispute;
  setText("dispute-id", d.id);
  const step = d.lo + 1 === d.hi ? d.hi : null;
  facts("summary", [
    ["status", d.status], ["phase", d.phase], ["result", record.result.id],
    ["result status", record.result.status], ["provider", record.result.provider],
    ["challenger", d.challenger], ["bond", record.bond],
    ["interval (lo, hi]", "(" + d.lo + ", " + d.hi + "]"],
    ["step", step === null ? "not narrowed yet" : "step " + step],
    ["tile", d.tile === null ? (d.tiles === null ? "whole step" : "to be named of " + d.tiles) : "tile " + d.tile],
    ["rounds", d.rounds], ["opened", iso(d.opened_at)], ["trace root", record.result.trace_root],
  ]);
  setText("verdict", d.verdict || "pending");
  setText("verdict-reason", record.reason || "");
  const c = record.clocks;
  facts("clocks", [
    ["provider", c.provider_left_s.toFixed(1) + " s left of " + c.provider_s + " s"],
    ["challenger", c.challenger_left_s.toFixed(1) + " s left of " + c.challenger_s + " s"],
    ["proof timeout", c.proof_timeout_s + " s"], ["turn", c.turn || "nobody's"],
    ["turn started", when(c.turn_started)], ["deadline", when(c.deadline)],
  ]);
  fill("timeline", record.timeline.map((e) => [e.seq, when(e.move_at === null ? e.at : e.move_at),
    e.actor || "—", (MOVES[e.kind] || (() => e.kind))(e), e.state === null ? "—" : e.state,
    el("code", { title: e.leaf || "" }, short(e.leaf)), e.lo, e.hi, e.round, e.phase || "—"]));
  const proofs = document.getElementById("proofs");
  proofs.replaceChildren();
  if (record.proofs.length === 0) proofs.append(el("p", {}, "No proof recorded."));
  for (const p of record.proofs) {
    const list = el("dl", { class: "facts proof" });
    const numbers = p.kind === "step"
      ? [["step", p.step], ["tile", p.tile === null ? "whole step" : p.tile],
         ["maxdiff vs τ", p.maxdiff_units + " ≈ " + fraction(p.maxdiff_units).toFixed(2) +
          " units vs τ = " + p.tolerance +
          (fraction(p.maxdiff_units) > p.tolerance ? " (exceeds τ)" : " (within τ)")]]
      : [["state", p.state], ["max |value|", p.max_abs_units + " units vs bound " + p.bound]];
    for (const [name, value] of [["kind", p.kind + " proof"], ...numbers,
      ["verified by key", "vk sha256 " + (p.vk_sha256 || "—")], ["circuit", p.circuit],
      ["proof size", p.proof_bytes + " bytes"], ...chainCheck(p.chain),
      ["transcript event", "#" + p.seq]]) {
      list.append(el("dt", {}, name), el("dd", {}, value === null || value === undefined ? "—" : value));
    }
    proofs.append(list);
  }
  fill("ledger", record.ledger.map((e) => [e.seq, e.kind, short(e.reference),
    el("ul", {}, ...e.postings.map((p) => el("li", {}, (p.amount > 0 ? "+" : "") + p.amount + " " + p.account))),
    e.memo]), record.ledger.map((e) => (e.this_dispute ? "mine" : "")));
  const t = record.transcript;
  setText("transcript-status", t.ok ? "transcript verified" : "transcript check FAILED");
  document.getElementById("transcript-status").className = "verdict " + (t.ok ? "ok" : "failed");
  facts("transcript", [["events", t.length], ["head", t.head],
    ["service BLS key", t.public_key], ["head signature", t.signature || "not signed (chain broken)"]]);
  fill("transcript-checks", t.checks.map((k) => [k.name, k.ok ? "ok" : "failed", k.detail]));
}

// A proof's on-chain check: the service records one only for a transaction that was mined and
// whose verifier contract accepted the proof (prover.chain.RpcChain refuses anything else).
function chainCheck(chain) {
  if (!chain) return [["on-chain check", "not checked on chain (no chain configured)"]];
  return [
    ["on-chain check", el("span", { class: "ok" }, "verified on chain")],
    ["gas", typeof chain.gas === "number" ? chain.gas.toLocaleString("en-US") : "—"],
    ["transaction", el("code", {}, chain.tx || "—")],
    ["verifier contract", el("code", {}, chain.contract || "—")],
  ];
}

function fraction(text) {
  const [a, b] = String(text).split("/");
  return b === undefined ? Number(a) : Number(a) / Number(b);
}

async function disputePage() {
  const id = decodeURIComponent(window.location.pathname.split("/").pop() || "");
  setText("dispute-id", id);
  try {
    const record = await api("/v1/disputes/" + encodeURIComponent(id) + "/record");
    renderDispute(record);
    setText("status", record.dispute.status === "OPEN"
      ? "Open: refreshing every 5 s." : "Resolved.");
    if (record.dispute.status === "OPEN") setTimeout(disputePage, 5000);
  } catch (error) {
    setText("status", "Cannot load the dispute: " + error.message);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  if (document.body.dataset.page === "dispute") disputePage();
  else networkPage();
});
