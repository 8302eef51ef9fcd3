// Playground chat: one websocket per tab (/ws/chat/), tokens appended as they stream (the server
// sends them HTML-escaped), the final answer swapped for the server's sanitised Markdown render.
const root = document.getElementById("playground");
const thread = document.getElementById("pg-thread");
const form = document.getElementById("pg-composer");
const input = document.getElementById("pg-input");
const sendButton = document.getElementById("pg-send");
const stopButton = document.getElementById("pg-stop");
const statusLine = document.getElementById("pg-status");
const editing = document.getElementById("pg-editing");
const csrf = document.body.getAttribute("hx-headers") ? JSON.parse(document.body.getAttribute("hx-headers"))["X-CSRFToken"] : "";

let socket = null;
let conversation = root.dataset.conversation ? Number(root.dataset.conversation) : null;
let current = null; // the bubble being streamed into
let editMode = false;
let queued = null;  // a frame waiting for the socket to open

function setStatus(text, isError) {
  statusLine.textContent = text || "";
  statusLine.classList.toggle("error", !!isError);
}

function busy(on) {
  sendButton.disabled = on;
  stopButton.disabled = !on;
  root.classList.toggle("generating", on);
}

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  socket = new WebSocket(`${scheme}://${location.host}/ws/chat/`);
  socket.addEventListener("open", () => { if (queued) { socket.send(JSON.stringify(queued)); queued = null; } });
  socket.addEventListener("message", (event) => handle(JSON.parse(event.data)));
  socket.addEventListener("close", () => {
    if (current) { finishBubble(current, null); setStatus("Connection lost; the answer was cut off.", true); }
    busy(false);
    socket = null;
  });
}

function send(frame) {
  if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(frame));
  else { queued = frame; if (!socket) connect(); }
}

function options() {
  const data = new FormData(form);
  const out = {};
  for (const name of ["max_tokens", "top_k", "seed"]) if (data.get(name) !== "" && data.get(name) !== null) out[name] = parseInt(data.get(name), 10);
  for (const name of ["temperature", "top_p", "repetition_penalty"]) if (data.get(name) !== "" && data.get(name) !== null) out[name] = parseFloat(data.get(name));
  if ((data.get("system") || "").trim()) out.system = data.get("system").trim();
  out.rag = data.get("rag") === "on";
  const list = (name) => (data.get(name) || "").split(",").map((s) => s.trim()).filter(Boolean);
  if (list("collections").length) out.collections = list("collections");
  if (list("experts").length) out.experts = list("experts");
  return out;
}

function bubble(role, html) {
  document.getElementById("pg-empty")?.remove();
  const div = document.createElement("div");
  div.className = `bubble ${role}`;
  div.innerHTML = `<div class="content${role === "assistant" ? " answer" : ""}"></div>`;
  if (html !== undefined) div.querySelector(".content").innerHTML = html;
  thread.appendChild(div);
  div.scrollIntoView({block: "end"});
  return div;
}

function userBubble(text) {
  thread.querySelectorAll(".pg-edit").forEach((b) => b.remove());  // only the last message is editable
  const div = bubble("user");
  div.querySelector(".content").textContent = text;
  div.insertAdjacentHTML("beforeend", '<button type="button" class="link-button pg-edit">Edit</button>');
  return div;
}

function answerActions(div) {
  const actions = document.createElement("div");
  actions.className = "actions";
  actions.innerHTML = `<button type="button" class="link-button pg-copy">Copy</button>
    <button type="button" class="link-button pg-regenerate">Regenerate</button>
    <button type="button" class="link-button pg-up" aria-label="Thumbs up" title="Thumbs up">▲ Good</button>
    <button type="button" class="link-button pg-down" aria-label="Thumbs down" title="Thumbs down">▼ Bad</button>
    <button type="button" class="link-button pg-correct">Correct this answer</button>`;
  div.appendChild(actions);
}

function describe(meta) {
  const m = meta.metrics || {};
  const parts = [];
  const experts = Object.entries(meta.experts || {});
  parts.push(experts.length ? "experts " + experts.map(([e, w]) => `${e} ${Number(w).toFixed(2)}`).join(", ") : "no expert (base model)");
  if ((meta.sources || []).length) parts.push(`${meta.sources.length} cited source${meta.sources.length > 1 ? "s" : ""}`);
  if (m.completion_tokens != null) parts.push(`${m.completion_tokens} tokens`);
  if (m.ttft_ms != null) parts.push(`TTFT ${Math.round(m.ttft_ms)} ms`);
  if (m.tokens_per_s != null) parts.push(`${m.tokens_per_s} tok/s`);
  if (m.backend) parts.push(m.backend);
  if (m.weights === "dense") parts.push("dense SmolLM2 backbone (not BitNet)");
  else if (m.serving) parts.push(m.serving);  // BitNet: "BitNet b1.58, ternary, 2-bit packed, <kernel>, int4 head"
  else if (m.weights) parts.push(m.weights);
  return parts.join(" · ");
}

// The sources an answer cites, under it: title (linking to the document at the page), page, how it
// was cited, and the passage. Built with textContent: passages are user-uploaded text.
function renderSources(div, sources) {
  div.querySelector(".pg-sources")?.remove();
  if (!sources || !sources.length) return;
  const box = document.createElement("div");
  box.className = "pg-sources";
  const heading = document.createElement("p");
  heading.className = "pg-sources-title";
  heading.textContent = "Sources";
  const list = document.createElement("ol");
  for (const source of sources) {
    const item = document.createElement("li");
    item.className = "pg-source";
    item.dataset.cited = source.cited || "marker";
    const link = document.createElement("a");
    link.className = "pg-source-link";
    link.textContent = source.title || "document";
    if (typeof source.url === "string" && source.url.startsWith("/")) link.href = source.url;  // same-site only
    const facts = document.createElement("span");
    facts.className = "muted small";
    const how = source.cited === "attributed" ? "matched to the answer" : `cited as [${source.n}]`;
    facts.textContent = ` · page ${source.page}${source.collection ? " · " + source.collection : ""} · ${how}`;
    const quote = document.createElement("blockquote");
    quote.className = "pg-source-quote";
    quote.textContent = source.quote || source.snippet || "";
    item.append(link, facts, quote);
    list.appendChild(item);
  }
  box.append(heading, list);
  const anchor = div.querySelector(".meta");
  if (anchor) anchor.before(box); else div.appendChild(box);
}

function finishBubble(div, frame) {
  if (frame) {
    div.querySelector(".content").innerHTML = frame.html;
    let meta = div.querySelector(".meta");
    if (!meta) { meta = document.createElement("div"); meta.className = "meta"; div.appendChild(meta); }
    meta.textContent = describe(frame);
    if (frame.finish_reason === "stopped") meta.textContent = "Stopped · " + meta.textContent;
    renderSources(div, frame.sources);
    if (!div.querySelector(".actions")) answerActions(div);
    thread.querySelectorAll(".pg-regenerate").forEach((b) => { if (!div.contains(b)) b.remove(); });
  }
  div.classList.remove("streaming");
  current = null;
  busy(false);
}

function handle(frame) {
  if (frame.type === "start") {
    if (!conversation || conversation !== frame.conversation) {
      conversation = frame.conversation;
      root.dataset.conversation = conversation;
      history.replaceState(null, "", root.dataset.conversationUrl.replace("/0/", `/${conversation}/`));
      document.getElementById("pg-title").textContent = frame.title;
    }
    current = bubble("assistant");
    current.dataset.id = frame.message;
    current.classList.add("streaming");
    setStatus("Generating…");
  } else if (frame.type === "tokens" && current) {
    current.querySelector(".content").insertAdjacentHTML("beforeend", frame.html);
    current.dataset.tokens = frame.tokens;
    setStatus(`Generating… ${frame.tokens} tokens`);
  } else if (frame.type === "done") {
    const div = thread.querySelector(`.bubble.assistant[data-id="${frame.message}"]`) || current;
    if (div) finishBubble(div, frame);
    setStatus(frame.finish_reason === "stopped" ? "Stopped." : "");
  } else if (frame.type === "error") {
    setStatus(frame.message, true);
    if (current && frame.message !== undefined && frame.code !== "busy" && frame.code !== "rate_limited") {
      const p = document.createElement("p");
      p.className = "pg-error";
      p.textContent = "Error: " + frame.message;
      current.appendChild(p);
      finishBubble(current, null);
    }
    if (!current) busy(false);
  }
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const content = input.value;
  if (!content.trim()) { setStatus("Type a message first.", true); return; }
  if (editMode) {
    const users = thread.querySelectorAll(".bubble.user");
    const last = users[users.length - 1];
    if (last) {
      last.querySelector(".content").textContent = content;
      let next = last.nextElementSibling;
      while (next) { const n = next.nextElementSibling; next.classList.add("superseded"); next.hidden = true; next = n; }
    }
    send({type: "edit", conversation, content, options: options()});
    endEdit();
  } else {
    userBubble(content);
    send({type: "chat", conversation, content, options: options()});
  }
  input.value = "";
  busy(true);
});

input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); form.requestSubmit(); }
});

stopButton.addEventListener("click", () => { send({type: "stop"}); setStatus("Stopping…"); });

function endEdit() { editMode = false; editing.hidden = true; }
document.getElementById("pg-cancel-edit").addEventListener("click", () => { endEdit(); input.value = ""; });

async function postFeedback(div, rating, correction) {
  const body = new URLSearchParams({rating: String(rating), correction: correction || ""});
  const url = root.dataset.feedbackUrl.replace("/0/", `/${div.dataset.id}/`);
  const response = await fetch(url, {method: "POST", body, headers: {"X-CSRFToken": csrf}, credentials: "same-origin"});
  const data = await response.json();
  if (!response.ok) { setStatus(data.error || "Feedback failed", true); return; }
  div.querySelector(".pg-up")?.classList.toggle("chosen", rating === 1);
  div.querySelector(".pg-down")?.classList.toggle("chosen", rating === -1);
  setStatus(correction ? "Correction saved. Thank you!" : "Feedback saved.");
}

const dialog = document.getElementById("pg-correct-dialog");
let correcting = null;
document.getElementById("pg-correct-form").addEventListener("submit", (event) => {
  if (event.submitter && event.submitter.value === "save" && correcting) {
    postFeedback(correcting, -1, document.getElementById("pg-correction").value);
  }
});

thread.addEventListener("click", (event) => {
  const target = event.target;
  const div = target.closest(".bubble");
  if (!div) return;
  if (target.classList.contains("pg-copy")) {
    const text = div.querySelector(".content").innerText;
    navigator.clipboard?.writeText(text).then(() => setStatus("Copied."), () => setStatus("Copy failed", true));
  } else if (target.classList.contains("pg-regenerate")) {
    if (current) return;
    div.hidden = true;
    div.classList.add("superseded");
    send({type: "regenerate", conversation, options: options()});
    busy(true);
  } else if (target.classList.contains("pg-up")) {
    postFeedback(div, 1, "");
  } else if (target.classList.contains("pg-down")) {
    postFeedback(div, -1, "");
  } else if (target.classList.contains("pg-correct")) {
    correcting = div;
    document.getElementById("pg-correction").value = div.querySelector(".content").innerText;
    dialog.showModal();
  } else if (target.classList.contains("pg-edit")) {
    editMode = true;
    editing.hidden = false;
    input.value = div.querySelector(".content").innerText;
    input.focus();
  }
});

// Answers stored before this page load: show their metadata line.
thread.querySelectorAll(".bubble.assistant").forEach((div) => {
  const data = div.querySelector('script[type="application/json"]');
  const meta = div.querySelector(".meta");
  if (data && meta) {
    try {
      const stored = JSON.parse(data.textContent);
      meta.textContent = describe(stored);
      renderSources(div, stored.sources);
    } catch (e) { /* no metadata */ }
  }
});

connect();
