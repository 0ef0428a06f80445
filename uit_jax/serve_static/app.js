// The search page: query panes side by side, each a box and its top-k as a grid of thumbnails; click or Enter
// enlarges one. Everything goes through the JSON API (/search, /images, /health), so the page shows the server's
// own messages for bad input.
"use strict";

const panes = document.getElementById("panes");
const template = document.getElementById("pane-template");
const kInput = document.getElementById("k");
const viewer = document.getElementById("viewer");
const viewerImg = document.getElementById("viewer-img");
const viewerCaption = document.getElementById("viewer-caption");
let viewing = null; // {hits, index, opener}

function addPane(text = "", focus = true) {
  const pane = template.content.firstElementChild.cloneNode(true);
  const input = pane.querySelector("input");
  input.value = text;
  pane.querySelector("form").addEventListener("submit", (e) => {
    e.preventDefault();
    search([pane]);
  });
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      search(allPanes());
    }
  });
  pane.querySelector(".close").addEventListener("click", () => {
    const next = pane.nextElementSibling || pane.previousElementSibling;
    pane.remove();
    if (!panes.children.length) addPane();
    else if (next) next.querySelector("input").focus();
  });
  panes.appendChild(pane);
  if (focus) input.focus();
  return pane;
}

const allPanes = () => Array.from(panes.querySelectorAll(".pane"));

function show(el, text) {
  el.textContent = text || "";
  el.hidden = !text;
}

// One request for every pane given: queries that go together are encoded in one call on the server.
async function search(list) {
  const k = parseInt(kInput.value, 10);
  const queries = list.map((p) => p.querySelector("input").value);
  for (const p of list) {
    p.dataset.state = "loading";
    show(p.querySelector(".error"), "");
  }
  let body, ok;
  try {
    const res = await fetch("/search", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ queries, k: Number.isNaN(k) ? kInput.value : k }),
    });
    ok = res.ok;
    body = await res.json().catch(() => ({ detail: `The server answered ${res.status} ${res.statusText}.` }));
  } catch (err) {
    ok = false;
    body = { detail: `Could not reach the server (${err.message}). Is it still running?` };
  }
  list.forEach((p, i) => {
    if (!ok) {
      show(p.querySelector(".error"), typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail));
      p.dataset.state = "error";
      return;
    }
    const r = body.results[i];
    show(p.querySelector(".note"), r.note);
    renderHits(p, r);
    p.dataset.state = "done";
  });
}

function renderHits(pane, result) {
  const grid = pane.querySelector(".grid");
  grid.replaceChildren();
  result.hits.forEach((h, i) => {
    const li = document.createElement("li");
    const b = document.createElement("button");
    b.type = "button";
    b.className = "thumb";
    b.title = `#${h.rank} ${h.id} (score ${h.score.toFixed(3)})`;
    const img = document.createElement("img");
    img.src = h.thumb;
    img.alt = `Result ${h.rank}: ${h.id}`;
    const s = document.createElement("span");
    s.className = "score";
    s.textContent = `#${h.rank} ${h.score.toFixed(3)}`;
    b.append(img, s);
    b.addEventListener("click", () => openViewer(result.hits, i, b));
    b.addEventListener("keydown", (e) => moveFocus(e, grid, i));
    li.appendChild(b);
    grid.appendChild(li);
  });
  pane.setAttribute("aria-label", `Query: ${result.query}`);
}

// Arrow keys move between thumbnails (up/down by a row of the grid).
function moveFocus(e, grid, i) {
  const buttons = grid.querySelectorAll(".thumb");
  const cols = Math.max(1, Math.round(grid.clientWidth / buttons[0].getBoundingClientRect().width));
  const step = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: cols, ArrowUp: -cols }[e.key];
  if (step === undefined) return;
  e.preventDefault();
  buttons[Math.min(buttons.length - 1, Math.max(0, i + step))].focus();
}

function openViewer(hits, index, opener) {
  viewing = { hits, index, opener };
  showHit();
  if (!viewer.open) viewer.showModal();
  document.getElementById("next").focus();
}

function showHit() {
  const h = viewing.hits[viewing.index];
  viewerImg.src = h.url;
  viewerImg.alt = `Result ${h.rank}: ${h.id}`;
  viewerCaption.textContent = `#${h.rank} of ${viewing.hits.length} · score ${h.score.toFixed(4)} · ${h.id}`;
}

function step(d) {
  if (!viewing) return;
  viewing.index = (viewing.index + d + viewing.hits.length) % viewing.hits.length;
  showHit();
}

document.getElementById("prev").addEventListener("click", () => step(-1));
document.getElementById("next").addEventListener("click", () => step(1));
document.getElementById("close-viewer").addEventListener("click", () => viewer.close());
viewer.addEventListener("keydown", (e) => {
  if (e.key === "ArrowRight") step(1);
  else if (e.key === "ArrowLeft") step(-1);
});
viewer.addEventListener("close", () => {
  if (viewing && viewing.opener.isConnected) viewing.opener.focus();
  viewing = null;
});
viewer.addEventListener("click", (e) => {
  if (e.target === viewer) viewer.close(); // a click on the backdrop
});

document.getElementById("add").addEventListener("click", () => addPane());
document.getElementById("all").addEventListener("click", () => search(allPanes()));
document.addEventListener("keydown", (e) => {
  const typing = ["INPUT", "TEXTAREA"].includes(document.activeElement.tagName);
  if (e.key === "/" && !typing && !viewer.open) {
    e.preventDefault();
    panes.querySelector("input").focus();
  } else if (e.altKey && (e.key === "n" || e.key === "N")) {
    e.preventDefault();
    addPane();
  }
});

fetch("/health")
  .then((r) => r.json())
  .then((h) => {
    document.getElementById("status").textContent =
      `${h.index_size.toLocaleString()} images · ${h.search} search · ${h.device}`;
    kInput.max = h.index_size;
  })
  .catch(() => {
    document.getElementById("status").textContent = "The server did not answer /health.";
  });

addPane();
