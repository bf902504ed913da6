// The gateway's chat page: streams /chat/completions, model picker from /models, tokens/s.
// Plain browser JavaScript, no build step. Text is always inserted as text, never as HTML.
"use strict";

const api = document.body.dataset.apiBase || "/v1";
const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"), key: $("api-key"), maxTokens: $("max-tokens"),
  messages: $("messages"), status: $("status"),
  form: $("composer"), prompt: $("prompt"), send: $("send"), stop: $("stop"), clear: $("clear"),
};
const KEY_STORE = "gateway-chat-api-key";
let history = [];
let running = null; // the AbortController of the request in flight

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = ui.key.value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  div.textContent = text;
  ui.messages.appendChild(div);
  ui.messages.scrollTop = ui.messages.scrollHeight;
  return div;
}

function setStatus(text) { ui.status.textContent = text; }

async function errorText(resp) {
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) { /* not JSON */ }
  return resp.status + " " + resp.statusText;
}

async function loadModels() {
  try {
    const resp = await fetch(api + "/models", { headers: headers() });
    if (resp.status === 401) {
      ui.model.replaceChildren();
      ui.key.focus();
      setStatus(await errorText(resp) + " (enter an API key above to list the models)");
      return;
    }
    if (!resp.ok) throw new Error(await errorText(resp));
    const body = await resp.json();
    ui.model.replaceChildren();
    for (const m of body.data) {
      const opt = document.createElement("option");
      opt.value = opt.textContent = m.id;
      ui.model.appendChild(opt);
    }
    setStatus(body.data.length ? "" : "No models are configured.");
  } catch (err) {
    setStatus("Could not list models: " + err.message);
  }
}

// Reads an SSE body line by line; calls onData with each event's data.
async function readEvents(body, onData) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let nl;
    while ((nl = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, nl).replace(/\r$/, "");
      buffer = buffer.slice(nl + 1);
      if (line === "") {
        if (data.length) onData(data.join("\n"));
        data = [];
      } else if (line.startsWith("data:")) {
        data.push(line.slice(5).replace(/^ /, ""));
      }
    }
  }
  if (data.length) onData(data.join("\n"));
}

function speed(tokens, firstAt, lastAt, startedAt) {
  const parts = [tokens + " tokens"];
  if (firstAt !== null) parts.push("first token " + Math.round(firstAt - startedAt) + " ms");
  const seconds = (lastAt - firstAt) / 1000;
  if (tokens > 1 && seconds > 0) parts.push(((tokens - 1) / seconds).toFixed(1) + " tokens/s");
  return parts.join(" · ");
}

function requestBody(model) {
  const body = { model, messages: history, stream: true, stream_options: { include_usage: true } };
  const maxTokens = parseInt(ui.maxTokens.value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  return body;
}

async function send(text) {
  const model = ui.model.value;
  if (!model) { setStatus("Pick a model first."); return; }
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const bubble = addMessage("assistant", "");
  bubble.classList.add("streaming");
  running = new AbortController();
  ui.send.disabled = true; ui.stop.disabled = false;
  const startedAt = performance.now();
  let firstAt = null, lastAt = null, chunks = 0, usage = null, failed = null;
  setStatus("Waiting for " + model + "…");
  try {
    const resp = await fetch(api + "/chat/completions", {
      method: "POST", headers: headers(), signal: running.signal,
      body: JSON.stringify(requestBody(model)),
    });
    if (!resp.ok) {
      failed = await errorText(resp);
      if (resp.status === 401) { ui.key.focus(); failed += " (enter an API key above)"; }
    } else {
      await readEvents(resp.body, (data) => {
        if (data === "[DONE]") return;
        const event = JSON.parse(data);
        if (event.error) { failed = event.error.message; return; }
        if (event.usage) usage = event.usage;
        for (const choice of event.choices || []) {
          const piece = choice.delta && choice.delta.content;
          if (!piece) continue;
          lastAt = performance.now();
          if (firstAt === null) firstAt = lastAt;
          chunks += 1;
          bubble.textContent += piece;
          ui.messages.scrollTop = ui.messages.scrollHeight;
          setStatus(speed(chunks, firstAt, lastAt, startedAt));
        }
      });
    }
  } catch (err) {
    failed = err.name === "AbortError" ? null : String(err.message || err);
  } finally {
    running = null;
    ui.send.disabled = false; ui.stop.disabled = true;
    bubble.classList.remove("streaming");
  }
  if (bubble.textContent) {
    history.push({ role: "assistant", content: bubble.textContent });
  } else {
    bubble.remove();
    history.pop(); // no answer: the question is not part of the conversation
  }
  if (failed) addMessage("error", failed);
  const tokens = usage ? usage.completion_tokens : chunks;
  if (firstAt !== null) setStatus(speed(tokens, firstAt, lastAt, startedAt));
  else if (!failed) setStatus("");
}

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.prompt.value.trim();
  if (!text || running) return;
  ui.prompt.value = "";
  send(text);
});
ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.form.requestSubmit();
  }
});
ui.stop.addEventListener("click", () => { if (running) running.abort(); });
ui.clear.addEventListener("click", () => {
  if (running) running.abort();
  history = [];
  ui.messages.replaceChildren();
  setStatus("");
});
ui.key.value = sessionStorage.getItem(KEY_STORE) || "";
ui.key.addEventListener("change", () => {
  sessionStorage.setItem(KEY_STORE, ui.key.value.trim());
  loadModels();
});
loadModels();
