// lmforge chat page: keeps the conversation in memory (and localStorage), sends it to
// /v1/chat/completions with stream=true and renders the server-sent events as they arrive.
// When the conversation no longer fits the model's context (the server answers 400 with code
// context_length_exceeded), the oldest exchanges stop being sent, like `lmforge chat`: their
// bubbles are greyed out and a notice says how many were dropped.
"use strict";

const $ = (id) => document.getElementById(id);
// dropped: how many leading messages are no longer sent (they did not fit the context)
const state = { model: null, messages: [], dropped: 0, controller: null };

function loadState() {
  try {
    const saved = JSON.parse(localStorage.getItem("lmforge-chat") || "{}");
    if (Array.isArray(saved.messages)) state.messages = saved.messages;
    if (Number.isInteger(saved.dropped)) state.dropped = Math.min(saved.dropped, state.messages.length);
    for (const k of ["system", "temperature", "top_p", "max_tokens", "repetition_penalty", "seed"]) {
      if (saved[k] !== undefined && $(k)) $(k).value = saved[k];
    }
  } catch (e) { /* ignore a corrupt store */ }
}

function saveState() {
  const s = { messages: state.messages, dropped: state.dropped };
  for (const k of ["system", "temperature", "top_p", "max_tokens", "repetition_penalty", "seed"]) s[k] = $(k).value;
  try { localStorage.setItem("lmforge-chat", JSON.stringify(s)); } catch (e) { /* storage full/disabled */ }
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function showError(msg) {
  const el = $("error");
  el.textContent = msg;
  el.hidden = !msg;
}

function addBubble(role, text, done = true) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.dataset.done = done ? "1" : "0";
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role;
  const body = document.createElement("span");
  body.className = "content";
  body.textContent = text;
  div.append(label, body);
  $("messages").append(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

function render() {
  $("messages").innerHTML = "";
  for (const m of state.messages) addBubble(m.role, m.content);
  markDropped();
}

function markDropped() {
  const bubbles = $("messages").querySelectorAll(".msg");
  bubbles.forEach((b, i) => {
    if (i < state.dropped) {
      b.dataset.dropped = "1";
      b.title = "no longer sent: it did not fit the model's context";
    }
  });
  const notice = $("notice");
  const exchanges = Math.ceil(state.dropped / 2);
  notice.textContent = exchanges
    ? `Context full: the ${exchanges} oldest exchange(s) are no longer sent to the model.` : "";
  notice.hidden = !exchanges;
}

async function post(body, signal) {
  return fetch("/v1/chat/completions", {
    method: "POST", headers: headers(), body: JSON.stringify(body), signal: signal,
  });
}

// POST the conversation; while it does not fit the context, drop the oldest exchange and retry.
async function postFitting(signal) {
  while (true) {
    const res = await post(requestBody(), signal);
    if (res.ok) return res;
    let msg = res.statusText, code = null;
    try { const err = (await res.json()).error; msg = err.message; code = err.code; } catch (e) { /* not JSON */ }
    // the last message is the new question: it is never dropped
    if (code === "context_length_exceeded" && state.messages.length - state.dropped > 1) {
      state.dropped = Math.min(state.dropped + 2, state.messages.length - 1);
      markDropped();
      continue;
    }
    throw new Error(`${res.status}: ${msg}`);
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").hidden = !busy;
}

async function connect() {
  try {
    const health = await (await fetch("/health")).json();
    $("status").className = "dot " + (health.status === "ok" ? "ok" : "bad");
    $("rag-row").hidden = !health.rag;
    const res = await fetch("/v1/models", { headers: headers() });
    if (!res.ok) throw new Error((await res.json()).error?.message || res.statusText);
    const data = await res.json();
    state.model = data.data[0].id;
    $("model").textContent = state.model + " · context " + (data.data[0].context_length || "?");
    showError("");
  } catch (e) {
    $("status").className = "dot bad";
    $("model").textContent = "not connected";
    showError("Cannot reach the model: " + e.message);
  }
}

function requestBody() {
  const msgs = [];
  const system = $("system").value.trim();
  if (system) msgs.push({ role: "system", content: system });
  msgs.push(...state.messages.slice(state.dropped));
  const body = {
    model: state.model, messages: msgs, stream: true,
    temperature: parseFloat($("temperature").value), top_p: parseFloat($("top_p").value),
    max_tokens: parseInt($("max_tokens").value, 10) || undefined,
    repetition_penalty: parseFloat($("repetition_penalty").value) || 1.0,
  };
  const seed = $("seed").value.trim();
  if (seed !== "") body.seed = parseInt(seed, 10);
  if (!$("rag-row").hidden && $("rag").checked) body.rag = true;
  return body;
}

async function send(text) {
  if (!state.model) await connect();
  if (!state.model) return;
  showError("");
  state.messages.push({ role: "user", content: text });
  addBubble("user", text);
  const bubble = addBubble("assistant", "", false);
  const content = bubble.querySelector(".content");
  let answer = "";
  state.controller = new AbortController();
  setBusy(true);
  try {
    const res = await postFitting(state.controller.signal);
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    outer: while (true) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") break outer;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          if (chunk.citations) showCitations(bubble, chunk.citations);
          const delta = chunk.choices?.[0]?.delta?.content;
          if (delta) {
            answer += delta;
            content.textContent = answer;
            $("messages").scrollTop = $("messages").scrollHeight;
          }
        }
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") showError(e.message);
  } finally {
    bubble.dataset.done = "1";
    state.messages.push({ role: "assistant", content: answer });
    state.controller = null;
    setBusy(false);
    saveState();
  }
}

function showCitations(bubble, cites) {
  const div = document.createElement("div");
  div.className = "cites";
  div.textContent = "Sources: " + cites.map((c, i) => `[${i + 1}] ${c.source.split("/").pop()}`).join("  ");
  bubble.append(div);
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("input").value.trim();
  if (!text || state.controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("new-chat").addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.messages = [];
  state.dropped = 0;
  render();
  saveState();
});
for (const k of ["temperature", "top_p"]) {
  $(k).addEventListener("input", () => { $(k + "-val").textContent = $(k).value; saveState(); });
}
for (const k of ["system", "max_tokens", "repetition_penalty", "seed"]) $(k).addEventListener("change", saveState);
$("api-key").addEventListener("change", connect);

loadState();
for (const k of ["temperature", "top_p"]) $(k + "-val").textContent = $(k).value;
render();
connect();
