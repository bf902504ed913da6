// The gateway's chat page. Conversations live on the server, in the Responses store
// (store + previous_response_id, owned by the API key): GET /responses lists the key's own,
// POST /responses/{id} keeps a title and an answer's timings in its metadata. Each answer runs
// in the background and streams (a reload reconnects with ?stream=true&starting_after=N).
// Model output is untrusted: markdown goes through marked (raw HTML escaped), then DOMPurify;
// math is typeset by KaTeX into empty placeholders. Plain browser JavaScript, no build step.
"use strict";

const api = document.body.dataset.apiBase || "/v1";
const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"), modelInfo: $("model-info"), key: $("api-key"), theme: $("theme"),
  maxTokens: $("max-tokens"), temperature: $("temperature"), system: $("system"),
  convTitle: $("conv-title"), messages: $("messages"), status: $("status"),
  form: $("composer"), prompt: $("prompt"), send: $("send"), stop: $("stop"), clear: $("clear"),
  list: $("conversations"), search: $("search"), importBtn: $("import"), importFile: $("import-file"),
  toggleSide: $("toggle-side"),
};
const KEY_STORE = "gateway-chat-api-key";
const THEME_STORE = "gateway-chat-theme";
const RUNNING = new Set(["queued", "in_progress"]);

const byId = new Map();   // response id -> stored response (+ root, input_items)
let models = [];
let current = { conv: null, head: null, title: "", imported: null };
let running = null;       // {id, controller, ...} of the answer streaming now

// --- helpers ------------------------------------------------------------------------------

function headers(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const key = ui.key.value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) { /* not JSON */ }
  return resp.status + " " + resp.statusText;
}

async function call(method, path, body) {
  const resp = await fetch(api + path, {
    method, headers: headers(body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!resp.ok) {
    const err = new Error(await errorText(resp));
    err.status = resp.status;
    throw err;
  }
  return resp.json();
}

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function setStatus(text) { ui.status.textContent = text; }

function partsText(content) {
  if (typeof content === "string") return content;
  return (content || []).map((p) => p.text || p.refusal || "").join("");
}

// --- markdown, code and math ----------------------------------------------------------------

const escapeHtml = (s) => s.replace(/[&<>"']/g, (c) => (
  { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));

function mathToken(name, level, re, display) {
  return {
    name, level,
    start(src) { const m = src.match(level === "block" ? /\$\$|\\\[/ : /\$|\\\(/); return m ? m.index : undefined; },
    tokenizer(src) {
      const m = re.exec(src);
      if (m) return { type: name, raw: m[0], text: (m[1] || m[2] || "").trim(), display };
      return undefined;
    },
    renderer(token) {
      const tag = token.display ? "div" : "span";
      return "<" + tag + ' class="math' + (token.display ? " display" : "") +
        '" data-tex="' + escapeHtml(token.text) + '"></' + tag + ">";
    },
  };
}

let markdown = null;
function setupMarkdown() {
  if (markdown || !window.marked) return markdown;
  const md = new window.marked.Marked({ gfm: true, breaks: false });
  md.use({
    extensions: [
      mathToken("mathBlock", "block", /^(?:\$\$([\s\S]+?)\$\$|\\\[([\s\S]+?)\\\])(?:\n|$)/, true),
      mathToken("mathInline", "inline", /^(?:\$(?!\s)((?:\\.|[^\\$\n])+?)\$(?!\d)|\\\(([\s\S]+?)\\\))/, false),
    ],
    renderer: {
      // a model's raw HTML is shown as text, never parsed
      html(token) { return escapeHtml(token.text || token.raw || ""); },
      // no remote fetches from model output: an image is a link
      image(token) {
        return '<a href="' + escapeHtml(token.href || "") + '">' + escapeHtml(token.text || token.href || "image") + "</a>";
      },
      code(token) {
        const lang = (token.lang || "").split(/\s/)[0];
        const hl = window.hljs;
        let body = null;
        if (hl && token.text.length < 100000) {
          try {
            body = lang && hl.getLanguage(lang)
              ? hl.highlight(token.text, { language: lang, ignoreIllegals: true }).value
              : null;
          } catch (_) { body = null; }
        }
        const cls = "hljs" + (lang ? " language-" + escapeHtml(lang) : "");
        return '<pre><code class="' + cls + '">' + (body === null ? escapeHtml(token.text) : body) + "</code></pre>\n";
      },
    },
  });
  if (window.DOMPurify) {
    window.DOMPurify.addHook("afterSanitizeAttributes", (node) => {
      if (node.tagName === "A") { node.setAttribute("rel", "noopener noreferrer"); node.setAttribute("target", "_blank"); }
    });
  }
  markdown = md;
  return md;
}

const PURIFY = {
  FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select", "img", "svg", "math", "iframe"],
  FORBID_ATTR: ["style", "id", "name"],
  ALLOW_DATA_ATTR: false, ADD_ATTR: ["data-tex", "target"],
};

// Renders untrusted markdown into `node`: sanitized HTML, then math typeset by KaTeX.
function renderInto(node, text) {
  const md = setupMarkdown();
  if (!md || !window.DOMPurify) { node.textContent = text; return; }
  const html = md.parse(text);
  node.innerHTML = window.DOMPurify.sanitize(html, PURIFY);
  if (window.katex) {
    for (const m of node.querySelectorAll(".math[data-tex]")) {
      try {
        window.katex.render(m.dataset.tex, m, {
          displayMode: m.classList.contains("display"), throwOnError: false, trust: false, output: "html",
        });
      } catch (_) { m.textContent = m.dataset.tex; }
    }
  }
}

// --- theme -----------------------------------------------------------------------------------

function applyTheme(theme) {
  const root = document.documentElement;
  if (theme === "auto") delete root.dataset.theme; else root.dataset.theme = theme;
  $("hl-light").media = theme === "dark" ? "not all" : theme === "light" ? "all" : "(prefers-color-scheme: light)";
  $("hl-dark").media = theme === "dark" ? "all" : theme === "light" ? "not all" : "(prefers-color-scheme: dark)";
  ui.theme.textContent = { auto: "◐ auto", light: "☀ light", dark: "☾ dark" }[theme];
  ui.theme.dataset.theme = theme;
}
ui.theme.addEventListener("click", () => {
  const next = { auto: "light", light: "dark", dark: "auto" }[ui.theme.dataset.theme || "auto"];
  localStorage.setItem(THEME_STORE, next);
  applyTheme(next);
});

// --- models ----------------------------------------------------------------------------------
// The picker shows each model's state and what it can do (GET /models: `state`, `load` and
// `capabilities`, where null means "known once the model is loaded"). Embedding-only models
// are listed but not selectable for chat. While a model loads (or one was just asked for),
// the states are read again every second.

const MOVING = new Set(["loading", "downloading", "draining", "unloading"]);
const STATE_LABELS = {
  loaded: "loaded", loading: "loading…", downloading: "downloading…", draining: "unloading…",
  unloading: "unloading…", failed: "failed",
};
let modelTimer = null;
let watching = null;      // {id, until}: a model just asked for, watched until it is loaded

const capsOf = (m) => m.capabilities || {};
const chatModel = (m) => capsOf(m).chat !== false;

function stateLabel(m) {
  if (m.state === "unloaded") return m.load === "on_demand" ? "on demand" : "unloaded";
  return STATE_LABELS[m.state] || m.state || "?";
}

function stateClass(m) {
  if (m.state === "unloaded") return "on-demand";
  if (MOVING.has(m.state)) return "moving";
  return m.state === "loaded" || m.state === "failed" ? m.state : "other";
}

function shortTokens(n) {
  if (n % 1024 === 0) return n / 1024 + "k";
  if (n >= 1000) return (n / 1000).toFixed(1).replace(/\.0$/, "") + "k";
  return String(n);
}

// What the model can do, as badges: [text, title, unknown?]; what it cannot do is left out.
function capBadges(m) {
  const c = capsOf(m);
  const out = [];
  const known = (key, text, title) => {
    if (c[key] === true) out.push([text, title, false]);
    else if (c[key] === null) out.push([text + "?", title + ": known once the model is loaded", true]);
  };
  if (c.chat === false && c.embeddings) out.push(["embeddings only", "serves embeddings, not chat", false]);
  if (c.chat !== false) {
    known("tools", "tools", "tool calls" + (c.tool_format ? " (" + c.tool_format + " format)" : ""));
    known("structured_output", "JSON", "structured output (JSON schema)");
    known("reasoning", "reasoning", "reasoning apart from the answer");
    if (c.vision) out.push(["vision", "image inputs", false]);
  }
  if (c.context_length) {
    out.push(["ctx " + shortTokens(c.context_length),
      "context: " + c.context_length.toLocaleString("en-US") + " tokens per conversation", false]);
  }
  return out;
}

function optionLabel(m) {
  const bits = [m.id, stateLabel(m)];
  const c = capsOf(m);
  if (!chatModel(m)) bits.push("embeddings only");
  else {
    const can = [c.tools && "tools", c.structured_output && "JSON", c.reasoning && "reasoning"].filter(Boolean);
    if (can.length) bits.push(can.join(", "));
  }
  if (c.context_length) bits.push(shortTokens(c.context_length));
  return bits.join(" · ");
}

function optionTitle(m) {
  return capBadges(m).map(([text, title]) => text + ": " + title).join("\n");
}

function badge(cls, text, title) {
  const b = el("span", "badge " + cls, text);
  if (title) b.title = title;
  return b;
}

function showModelInfo() {
  const m = models.find((x) => x.id === ui.model.value);
  if (!m) { ui.modelInfo.replaceChildren(); return; }
  const items = [badge("state " + stateClass(m), stateLabel(m), "state" + (m.owned_by ? " · " + m.owned_by : ""))];
  for (const [text, title, unknown] of capBadges(m)) items.push(badge(unknown ? "cap unknown" : "cap", text, title));
  ui.modelInfo.replaceChildren(...items);
  ui.modelInfo.dataset.state = m.state || "";
}

// The picker's options: updated in place while the list is the same (an open picker stays
// open), rebuilt when it changed.
function renderModels() {
  const chosen = ui.model.value;
  const wanted = [...models.filter(chatModel), ...models.filter((m) => !chatModel(m))];
  const shown = [...ui.model.querySelectorAll("option")];
  const same = shown.length === wanted.length &&
    shown.every((o, i) => o.value === wanted[i].id && o.disabled === !chatModel(wanted[i]));
  if (same) {
    shown.forEach((o, i) => { o.textContent = optionLabel(wanted[i]); o.title = optionTitle(wanted[i]); });
  } else {
    const option = (m) => {
      const opt = el("option", "", optionLabel(m));
      opt.value = m.id;
      opt.title = optionTitle(m);
      opt.disabled = !chatModel(m);
      opt.dataset.state = m.state || "";
      return opt;
    };
    const nodes = models.filter(chatModel).map(option);
    const embedders = models.filter((m) => !chatModel(m));
    if (embedders.length) {
      const group = el("optgroup");
      group.label = "Embeddings only (not for chat)";
      group.append(...embedders.map(option));
      nodes.push(group);
    }
    ui.model.replaceChildren(...nodes);
    if (chosen && models.some((m) => m.id === chosen && chatModel(m))) ui.model.value = chosen;
  }
  for (const o of ui.model.querySelectorAll("option")) {
    const m = models.find((x) => x.id === o.value);
    if (m) o.dataset.state = m.state || "";
  }
  showModelInfo();
}

async function fetchModels() {
  const resp = await fetch(api + "/models", { headers: headers(false) });
  if (!resp.ok) {
    const err = new Error(await errorText(resp));
    err.status = resp.status;
    throw err;
  }
  return (await resp.json()).data;
}

async function loadModels() {
  try {
    models = await fetchModels();
    renderModels();
    setStatus(models.length ? "" : "No models are configured.");
    scheduleModelRefresh();
    return true;
  } catch (err) {
    if (err.status === 401) {
      models = [];
      ui.model.replaceChildren();
      showModelInfo();
      ui.key.focus();
      setStatus(err.message + " (enter an API key above to list the models)");
    } else {
      setStatus("Could not list models: " + err.message);
    }
    return false;
  }
}

// The states again, quietly (the status line is the answer's).
async function refreshModels() {
  clearTimeout(modelTimer);
  modelTimer = null;
  try {
    models = await fetchModels();
    renderModels();
  } catch (_) { /* kept as they were; tried again if something still moves */ }
  scheduleModelRefresh();
}

function scheduleModelRefresh(delay = 1000) {
  if (watching) {
    const m = models.find((x) => x.id === watching.id);
    if (Date.now() > watching.until || (m && (m.state === "loaded" || m.state === "failed"))) watching = null;
  }
  if (!watching && !models.some((m) => MOVING.has(m.state))) return;
  clearTimeout(modelTimer);
  modelTimer = setTimeout(refreshModels, delay);
}

// A request for a model that is not loaded starts its load: show it loading, then loaded.
function watchModel(id) {
  const m = models.find((x) => x.id === id);
  if (!m || m.state === "loaded") return;
  watching = { id, until: Date.now() + 10 * 60 * 1000 };
  scheduleModelRefresh(250);
}

ui.model.addEventListener("change", showModelInfo);
ui.model.addEventListener("focus", () => { if (models.length) refreshModels(); });

// --- conversations ---------------------------------------------------------------------------

const convOf = (r) => (r.metadata && r.metadata.conversation) || r.root || r.id;

function conversations() {
  const groups = new Map();
  for (const r of byId.values()) {
    const key = convOf(r);
    if (!groups.has(key)) groups.set(key, []);
    groups.get(key).push(r);
  }
  const list = [];
  for (const [key, entries] of groups) {
    entries.sort((a, b) => a.created_at - b.created_at || a._order - b._order);
    const newest = entries[entries.length - 1];
    const titled = [...entries].reverse().find((r) => r.metadata && r.metadata.title);
    const title = titled ? titled.metadata.title : titleOf(firstUserText(entries[0])) || "(untitled)";
    list.push({ key, entries, newest, title });
  }
  list.sort((a, b) => b.newest.created_at - a.newest.created_at || b.newest._order - a.newest._order);
  return list;
}

function titleOf(text) {
  const line = text.split("\n").map((l) => l.replace(/^[#>\-*\s]+/, "").trim()).find(Boolean) || "";
  return line.length > 60 ? line.slice(0, 59) + "…" : line;
}

function firstUserText(r) {
  const item = (r.input_items || []).find((i) => i.role === "user");
  return item ? partsText(item.content) : "";
}

function entryText(r) {
  const inputs = (r.input_items || []).map((i) => partsText(i.content) + (i.output || "")).join("\n");
  const outputs = (r.output || []).map((o) => partsText(o.content) + (o.arguments || "")).join("\n");
  return inputs + "\n" + outputs;
}

let order = 0;
function remember(r) {
  const old = byId.get(r.id);
  r._order = old ? old._order : order++;
  byId.set(r.id, r);
}

// The key's conversations, read in full before any is replaced (a click meanwhile still
// finds the ones shown).
async function loadConversations() {
  const listed = [];
  let after = null;
  for (let page = 0; page < 20; page++) {
    const q = "?limit=100" + (after ? "&after=" + encodeURIComponent(after) : "");
    let body;
    try { body = await call("GET", "/responses" + q); } catch (err) {
      if (err.status !== 401) setStatus("Could not list conversations: " + err.message);
      break;
    }
    listed.push(...body.data);
    if (!body.has_more) break;
    after = body.last_id;
  }
  byId.clear();
  for (const r of listed.reverse()) remember(r);
  renderList();
}

function renderList() {
  const query = ui.search.value.trim().toLowerCase();
  const items = [];
  for (const c of conversations()) {
    if (query && !c.title.toLowerCase().includes(query) &&
        !c.entries.some((r) => entryText(r).toLowerCase().includes(query))) continue;
    const li = el("li", c.key === current.conv ? "current" : "");
    li.dataset.conv = c.key;
    const open = el("button", "open", c.title);
    open.type = "button";
    open.title = c.title;
    li.addEventListener("click", (event) => {
      if (event.target.closest(".act")) return;
      openConversation(c.key);
      document.body.classList.remove("side-open");
    });
    const rename = el("button", "act rename", "✎");
    rename.type = "button"; rename.title = "Rename"; rename.setAttribute("aria-label", "rename");
    rename.addEventListener("click", () => renameConversation(c));
    const exp = el("button", "act export", "⇩");
    exp.type = "button"; exp.title = "Export as JSON"; exp.setAttribute("aria-label", "export");
    exp.addEventListener("click", () => exportConversation(c));
    const del = el("button", "act delete", "✕");
    del.type = "button"; del.title = "Delete"; del.setAttribute("aria-label", "delete");
    del.addEventListener("click", () => deleteConversation(c));
    li.append(open, rename, exp, del);
    items.push(li);
  }
  ui.list.replaceChildren(...items);
}
ui.search.addEventListener("input", renderList);

function findConv(key) { return conversations().find((c) => c.key === key) || null; }

// The newest response whose chain goes through `id` (a branch's tip).
function tipOf(id, conv) {
  let best = byId.get(id);
  for (const r of conv.entries) {
    if (chain(r.id).some((x) => x.id === id) && (r.created_at > best.created_at ||
        (r.created_at === best.created_at && r._order > best._order))) best = r;
  }
  return best.id;
}

function chain(headId) {
  const out = [];
  const seen = new Set();
  for (let r = byId.get(headId); r && !seen.has(r.id); r = byId.get(r.previous_response_id)) {
    seen.add(r.id);
    out.push(r);
  }
  return out.reverse();
}

function openConversation(key, head) {
  const conv = findConv(key);
  if (!conv) return;
  current = { conv: key, head: head || conv.newest.id, title: conv.title, imported: null };
  const h = byId.get(current.head);
  if (h.model && models.some((m) => m.id === h.model)) ui.model.value = h.model;
  showModelInfo();
  ui.temperature.value = h.temperature ?? "";
  if (h.max_output_tokens) ui.maxTokens.value = h.max_output_tokens;
  ui.system.value = h.instructions || "";
  renderConversation();
  renderList();
  const last = byId.get(current.head);
  if (last && RUNNING.has(last.status) && !running) resume(last);
}

function newChat() {
  if (running) stop();
  current = { conv: null, head: null, title: "", imported: null };
  ui.messages.replaceChildren();
  ui.convTitle.textContent = "";
  setStatus("");
  renderList();
}
ui.clear.addEventListener("click", newChat);

async function renameConversation(c) {
  const title = window.prompt("Rename the conversation", c.title);
  if (title === null || !title.trim()) return;
  const target = [...c.entries].reverse().find((r) => !RUNNING.has(r.status));
  if (!target) return;
  try {
    const meta = { ...(target.metadata || {}), title: title.trim().slice(0, 500) };
    const updated = await call("POST", "/responses/" + target.id, { metadata: meta });
    remember({ ...target, ...updated });
    if (current.conv === c.key) current.title = title.trim();
    ui.convTitle.textContent = current.conv === c.key ? "· " + current.title : ui.convTitle.textContent;
    renderList();
  } catch (err) { setStatus("Could not rename: " + err.message); }
}

async function deleteConversation(c) {
  if (!window.confirm("Delete “" + c.title + "”?")) return;
  for (const r of c.entries) {
    try { await call("DELETE", "/responses/" + r.id); } catch (err) {
      if (err.status !== 404) { setStatus("Could not delete: " + err.message); return; }
    }
    byId.delete(r.id);
  }
  if (current.conv === c.key) newChat(); else renderList();
}

function exportConversation(c) {
  const data = {
    format: "gateway-chat-conversation/1", title: c.title, exported_at: new Date().toISOString(),
    head: current.conv === c.key ? current.head : c.newest.id, responses: c.entries.map(strip),
  };
  const blob = new Blob([JSON.stringify(data, null, 2)], { type: "application/json" });
  const a = el("a");
  a.href = URL.createObjectURL(blob);
  a.download = (c.title.replace(/[^\w\- ]+/g, "").trim() || "conversation") + ".json";
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}

function strip(r) { const { _order, ...rest } = r; return rest; }

// An imported conversation is shown at once and stored on the server when it goes on: its
// first new answer gets the whole history as input.
async function importConversation(file) {
  try {
    const data = JSON.parse(await file.text());
    if (!data || !Array.isArray(data.responses) || !data.responses.length) throw new Error("no responses in this file");
    const local = new Map();
    for (const r of data.responses) if (r && typeof r.id === "string") local.set(r.id, r);
    const head = local.has(data.head) ? data.head : data.responses[data.responses.length - 1].id;
    const turns = [];
    const seen = new Set();
    for (let r = local.get(head); r && !seen.has(r.id); r = local.get(r.previous_response_id)) {
      seen.add(r.id); turns.push(r);
    }
    turns.reverse();
    if (running) stop();
    current = { conv: null, head: null, title: String(data.title || "Imported").slice(0, 200), imported: turns };
    renderConversation();
    setStatus("Imported “" + current.title + "”: it is stored on the server when you send the next message.");
  } catch (err) { setStatus("Could not import: " + err.message); }
}
ui.importBtn.addEventListener("click", () => ui.importFile.click());
ui.importFile.addEventListener("change", () => {
  const file = ui.importFile.files[0];
  ui.importFile.value = "";
  if (file) importConversation(file);
});

// --- showing a conversation ------------------------------------------------------------------

function siblings(r) {
  const conv = findConv(convOf(r));
  if (!conv) return [r];
  return conv.entries.filter((x) => (x.previous_response_id || null) === (r.previous_response_id || null));
}

function renderConversation() {
  const nodes = [];
  const turns = current.imported || chain(current.head);
  for (const r of turns) nodes.push(renderTurn(r, !current.imported));
  ui.messages.replaceChildren(...nodes);
  ui.convTitle.textContent = current.title ? "· " + current.title : "";
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

function renderTurn(r, live, bubble) {
  const turn = el("section", "turn");
  turn.dataset.response = r.id;
  for (const item of r.input_items || []) {
    if (item.type === "message" || item.role) {
      if (item.role === "user") {
        turn.append(el("div", "message user", partsText(item.content)));
      } else if (item.role === "assistant") {
        const bubble = el("div", "message assistant");
        const body = el("div", "body");
        renderInto(body, partsText(item.content));
        bubble.append(body);
        turn.append(bubble);
      }
    } else if (item.type === "function_call_output") {
      turn.append(el("div", "tool", "↳ result " + (item.call_id || "") + ": " + String(item.output)));
    }
  }
  if (live) turn.append(userMeta(r));
  if (!bubble) {
    bubble = el("div", "message assistant");
    fillAnswer(bubble, r.output || [], r);
  }
  turn.append(bubble);
  if (r.status === "failed" && r.error) turn.append(el("div", "message error", r.error.message));
  turn.append(answerMeta(r, live));
  return turn;
}

function userMeta(r) {
  const meta = el("div", "meta user");
  const sibs = siblings(r);
  if (sibs.length > 1) {
    const i = sibs.findIndex((x) => x.id === r.id);
    const prev = el("button", "branch-prev", "‹");
    prev.type = "button"; prev.disabled = i === 0; prev.setAttribute("aria-label", "previous branch");
    prev.addEventListener("click", () => switchBranch(sibs[i - 1]));
    const next = el("button", "branch-next", "›");
    next.type = "button"; next.disabled = i === sibs.length - 1; next.setAttribute("aria-label", "next branch");
    next.addEventListener("click", () => switchBranch(sibs[i + 1]));
    meta.append(prev, el("span", "branch", (i + 1) + "/" + sibs.length), next);
  }
  const edit = el("button", "edit", "Edit");
  edit.type = "button";
  edit.addEventListener("click", () => startEdit(r, meta));
  meta.append(edit);
  return meta;
}

function switchBranch(r) {
  if (running) return;
  const conv = findConv(convOf(r));
  current.head = tipOf(r.id, conv);
  renderConversation();
}

function fillAnswer(bubble, output, r) {
  const parts = [];
  for (const item of output) {
    if (item.type === "reasoning") {
      const text = (item.content || []).map((c) => c.text).join("") ||
        (item.summary || []).map((c) => c.text).join("");
      if (!text) continue;
      const d = el("details", "reasoning");
      d.append(el("summary", "", "Reasoning"), el("div", "text", text));
      parts.push(d);
    } else if (item.type === "function_call" || item.type === "custom_tool_call") {
      parts.push(el("div", "tool", "⚙ " + item.name + "(" + (item.arguments ?? item.input ?? "") + ")"));
    } else if (item.type === "message") {
      const body = el("div", "body");
      renderInto(body, partsText(item.content));
      parts.push(body);
    }
  }
  bubble.replaceChildren(...parts);
}

function stats(r) {
  const bits = [];
  const u = r.usage;
  const m = r.metadata || {};
  if (r.model) bits.push(r.model);
  if (m.ttft_ms) bits.push("TTFT " + m.ttft_ms + " ms");
  if (m.prompt_tps) bits.push("prompt " + m.prompt_tps + " tok/s");
  if (m.prompt_ms) bits.push("prompt read in " + m.prompt_ms + " ms");
  if (m.gen_tps) bits.push(m.gen_tps + " tokens/s");
  if (u) {
    bits.push(u.input_tokens + " prompt tokens");
    const cached = u.input_tokens_details && u.input_tokens_details.cached_tokens;
    bits.push((cached || 0) + " cached");
    bits.push(u.output_tokens + " generated");
  }
  if (r.status && r.status !== "completed") bits.push(r.status);
  return bits.join(" · ");
}

function answerMeta(r, live) {
  const meta = el("div", "meta answer");
  meta.append(el("span", "stats", stats(r)));
  if (live) {
    const regen = el("button", "regenerate", "Regenerate");
    regen.type = "button";
    regen.addEventListener("click", () => regenerate(r));
    meta.append(regen);
  }
  return meta;
}

function startEdit(r, meta) {
  if (running) return;
  const turn = meta.closest(".turn");
  const userBubble = turn.querySelector(".message.user");
  const box = el("div", "edit-box");
  const area = el("textarea");
  area.value = userBubble ? userBubble.textContent : "";
  area.rows = 3;
  const row = el("div", "meta user");
  const save = el("button", "save", "Send as a new branch");
  save.type = "button";
  const cancel = el("button", "cancel", "Cancel");
  cancel.type = "button";
  row.append(save, cancel);
  box.append(area, row);
  turn.replaceChildren(box);
  area.focus();
  cancel.addEventListener("click", renderConversation);
  save.addEventListener("click", () => {
    const text = area.value.trim();
    if (!text) return;
    generate({ previous: r.previous_response_id || null, input: [userMessage(text)], convKey: convOf(r) });
  });
}

function regenerate(r) {
  if (running) return;
  const input = (r.input_items || []).map(asInput).filter(Boolean);
  generate({ previous: r.previous_response_id || null, input, convKey: convOf(r) });
}

function userMessage(text) { return { type: "message", role: "user", content: text }; }

// A stored input item as a new request's input (ids dropped: they are the old response's).
function asInput(item) {
  if (item.type === "message" || item.role) {
    return { type: "message", role: item.role, content: partsText(item.content) };
  }
  const { id, status, ...rest } = item;
  return rest;
}

function historyOf(turns) {
  const items = [];
  for (const r of turns) {
    for (const i of r.input_items || []) { const x = asInput(i); if (x) items.push(x); }
    for (const o of r.output || []) {
      if (o.type === "message") items.push({ type: "message", role: "assistant", content: partsText(o.content) });
    }
  }
  return items;
}

// --- generating ------------------------------------------------------------------------------

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

// One answer on screen while it streams: its items, re-rendered at most once a frame (and
// less often when a render is slow), so a long answer never blocks the page.
class LiveAnswer {
  constructor(turn, startedAt) {
    this.turn = turn;
    this.bubble = turn.querySelector(".message.assistant");
    this.bubble.classList.add("streaming");
    this.items = [];
    this.startedAt = startedAt;
    this.firstAt = null;
    this.lastAt = null;
    this.pieces = 0;
    this.response = null;
    this.failed = null;
    this.seq = -1;
    this.pending = false;
    this.cost = 0;
    this.renderedAt = 0;
    this.progress = null;
  }
  event(ev) {
    if (typeof ev.sequence_number === "number") this.seq = ev.sequence_number;
    const t = ev.type;
    if (ev.response) this.response = ev.response;
    if (t === "response.output_item.added") {
      this.items[ev.output_index] = { ...ev.item, text: "" };
    } else if (t === "response.output_text.delta" || t === "response.reasoning_text.delta" ||
               t === "response.function_call_arguments.delta" || t === "response.custom_tool_call_input.delta") {
      const item = this.items[ev.output_index];
      if (item) item.text += ev.delta;
      this.lastAt = performance.now();
      if (this.firstAt === null) this.firstAt = this.lastAt;
      this.pieces += 1;
    } else if (t === "response.prompt_progress") {
      this.progress = ev.prompt_progress;  // how far the model has read the prompt
    } else if (t === "response.output_item.done") {
      this.items[ev.output_index] = { ...ev.item, text: null };
    } else if (t === "error") {
      this.failed = (ev.error && ev.error.message) || ev.message || "the answer failed";
    } else if (t === "response.failed") {
      this.failed = (ev.response && ev.response.error && ev.response.error.message) || "the answer failed";
    }
    this.schedule();
  }
  output() {
    return this.items.filter(Boolean).map((i) => {
      if (i.text === null) return i;
      if (i.type === "message") return { ...i, content: [{ type: "output_text", text: i.text }] };
      if (i.type === "reasoning") return { ...i, content: [{ type: "reasoning_text", text: i.text }] };
      if (i.type === "function_call") return { ...i, arguments: i.text };
      return { ...i, input: i.text };
    });
  }
  schedule() {
    if (this.pending) return;
    this.pending = true;
    const wait = Math.max(0, this.renderedAt + this.cost * 3 - performance.now());
    setTimeout(() => requestAnimationFrame(() => { this.pending = false; this.render(); }), wait);
  }
  render() {
    const t0 = performance.now();
    const stick = ui.messages.scrollHeight - ui.messages.scrollTop - ui.messages.clientHeight < 80;
    const open = [...this.bubble.querySelectorAll("details.reasoning")].map((d) => d.open);
    const output = this.output();
    if (!output.length && this.progress) {
      this.renderProgress();
      return;
    }
    if (output.some((i) => i.type !== "message")) {
      fillAnswer(this.bubble, output, this.response || {});
      this.chunks = null;
    } else {
      this.renderChunked(output.map((i) => partsText(i.content)).join("\n\n"));
    }
    this.bubble.querySelectorAll("details.reasoning").forEach((d, i) => { d.open = open[i] ?? true; });
    if (stick) ui.messages.scrollTop = ui.messages.scrollHeight;
    this.renderedAt = performance.now();
    this.cost = this.renderedAt - t0;
    const s = this.speed();
    if (s) setStatus(s);
  }
  // A long answer is rendered in pieces: what lies before its last blank line outside code
  // and display math is rendered once, only the rest again as it grows.
  renderChunked(text) {
    if (!this.chunks || !this.bubble.contains(this.chunks.tail)) {
      const body = el("div", "body");
      this.chunks = { done: 0, body, tail: el("div", "chunk") };
      body.append(this.chunks.tail);
      this.bubble.replaceChildren(body);
    }
    const c = this.chunks;
    const cut = stableEnd(text, c.done);
    if (cut > c.done) {
      const piece = el("div", "chunk");
      renderInto(piece, text.slice(c.done, cut));
      c.body.insertBefore(piece, c.tail);
      c.done = cut;
    }
    renderInto(c.tail, text.slice(c.done));
  }
  // A long prompt being read: a bar and its numbers, until the first token.
  renderProgress() {
    const p = this.progress;
    const bar = el("progress", "prompt-progress");
    bar.max = p.total;
    bar.value = p.processed;
    const pct = p.total ? Math.floor((100 * p.processed) / p.total) : 100;
    const text = "Reading the prompt: " + pct + "% (" + p.processed + " of " + p.total +
      " tokens" + (p.cache ? ", " + p.cache + " cached" : "") + ")";
    const box = el("div", "progress-box");
    box.append(bar, el("span", "progress-text", text));
    this.bubble.replaceChildren(box);
    setStatus(text);
    this.renderedAt = performance.now();
  }
  speed() {
    if (this.firstAt === null) return "";
    const parts = [this.pieces + " tokens", "first token " + Math.round(this.firstAt - this.startedAt) + " ms"];
    const seconds = (this.lastAt - this.firstAt) / 1000;
    if (this.pieces > 1 && seconds > 0) parts.push(((this.pieces - 1) / seconds).toFixed(1) + " tokens/s");
    return parts.join(" · ");
  }
  timings(usage) {
    if (this.firstAt === null) return {};
    const ttft = this.firstAt - this.startedAt;
    const out = { ttft_ms: String(Math.round(ttft)) };
    if (this.progress) out.prompt_ms = String(Math.round(this.progress.time_ms));
    if (usage) {
      const cached = (usage.input_tokens_details && usage.input_tokens_details.cached_tokens) || 0;
      const fresh = usage.input_tokens - cached;
      if (fresh > 0 && ttft > 0) out.prompt_tps = (fresh / (ttft / 1000)).toFixed(1);
      const seconds = (this.lastAt - this.firstAt) / 1000;
      if (usage.output_tokens > 1 && seconds > 0) out.gen_tps = ((usage.output_tokens - 1) / seconds).toFixed(1);
    }
    return out;
  }
}

// Where the finished blocks of a growing markdown text end: its last blank line past `from`
// outside fenced code and display math (`from` if none).
function stableEnd(text, from) {
  let end = from;
  let fence = false;
  let math = false;
  let at = from;
  const lines = text.slice(from).split("\n");
  for (let i = 0; i < lines.length - 1; i++) {
    const line = lines[i];
    at += line.length + 1;
    if (/^\s*(```|~~~)/.test(line)) fence = !fence;
    else if (!fence && (line.match(/\$\$/g) || []).length % 2 === 1) math = !math;
    else if (!fence && !math && line.trim() === "" && !/^\s*([-*+]|\d+\.)\s/.test(lines[i + 1] || "")) end = at;
  }
  return end;
}

function requestParams() {
  const body = { model: ui.model.value };
  const max = parseInt(ui.maxTokens.value, 10);
  if (max > 0) body.max_output_tokens = max;
  const temp = parseFloat(ui.temperature.value);
  if (!Number.isNaN(temp)) body.temperature = temp;
  if (ui.system.value.trim()) body.instructions = ui.system.value;
  return body;
}

function busy(on) {
  ui.send.disabled = on;
  ui.stop.disabled = !on;
  for (const b of ui.messages.querySelectorAll(".meta button")) b.disabled = on;
}

// Starts an answer: `previous` is the response it follows, `input` its new items.
async function generate({ previous, input, convKey }) {
  const params = requestParams();
  if (!params.model) { setStatus("Pick a model first."); return; }
  let title = current.title;
  const firstText = input.map((i) => (i.role === "user" ? partsText(i.content) : "")).join(" ").trim();
  if (!title) title = titleOf(firstText);
  if (current.imported && !previous) input = [...historyOf(current.imported), ...input];
  const metadata = { title };
  if (convKey) metadata.conversation = convKey;
  const body = {
    ...params, input, store: true, background: true, stream: true, metadata, return_progress: true,
    ...(previous ? { previous_response_id: previous } : {}),
  };
  // show it: the chain up to `previous`, then the new turn
  current.title = title;
  const turns = previous ? chain(previous) : [];
  const pending = { id: "", input_items: input, output: [], previous_response_id: previous, model: params.model };
  ui.messages.replaceChildren(...turns.map((r) => renderTurn(r, true)), renderTurn(pending, false));
  const turn = ui.messages.lastElementChild;
  ui.messages.scrollTop = ui.messages.scrollHeight;
  const startedAt = performance.now();
  const live = new LiveAnswer(turn, startedAt);
  const controller = new AbortController();
  running = { id: null, controller, live };
  busy(true);
  const picked = models.find((m) => m.id === params.model);
  setStatus(picked && picked.state !== "loaded"
    ? "Loading " + params.model + " (" + stateLabel(picked) + ")… the first answer waits for it."
    : "Waiting for " + params.model + "…");
  watchModel(params.model);
  try {
    const resp = await fetch(api + "/responses", {
      method: "POST", headers: headers(true), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!resp.ok) {
      live.failed = await errorText(resp);
      if (resp.status === 401) { ui.key.focus(); live.failed += " (enter an API key above)"; }
    } else {
      await readEvents(resp.body, (data) => {
        const ev = JSON.parse(data);
        live.event(ev);
        if (!running.id && live.response && live.response.id) {
          running.id = live.response.id;
          const stub = { ...live.response, root: previous ? (byId.get(previous) || {}).root || previous : live.response.id, input_items: input };
          remember(stub);
          current.conv = convOf(stub);
          current.head = stub.id;
          current.imported = null;
          renderList();
        }
      });
    }
  } catch (err) {
    if (err.name !== "AbortError") live.failed = String(err.message || err);
  }
  await finish(live, input, previous);
}

// A running answer found after a reload (or in another tab): its events again, from the start.
async function resume(r) {
  const turn = ui.messages.querySelector('[data-response="' + CSS.escape(r.id) + '"]');
  if (!turn) return;
  const live = new LiveAnswer(turn, performance.now());
  const controller = new AbortController();
  running = { id: r.id, controller, live };
  busy(true);
  setStatus("Reconnecting to the answer in progress…");
  try {
    const resp = await fetch(api + "/responses/" + encodeURIComponent(r.id) + "?stream=true&starting_after=-1",
      { headers: headers(false), signal: controller.signal });
    if (resp.ok) await readEvents(resp.body, (data) => live.event(JSON.parse(data)));
    else live.failed = await errorText(resp);
  } catch (err) {
    if (err.name !== "AbortError") live.failed = String(err.message || err);
  }
  live.firstAt = null; // its timings were the first connection's
  await finish(live, r.input_items, r.previous_response_id);
}

async function finish(live, input, previous) {
  const id = running && running.id;
  running = null;
  live.bubble.classList.remove("streaming");
  let stored = null;
  if (id) {
    try {
      stored = await call("GET", "/responses/" + encodeURIComponent(id));
      for (let i = 0; i < 50 && RUNNING.has(stored.status); i++) { // a cancel being recorded
        await new Promise((ok) => setTimeout(ok, 100));
        stored = await call("GET", "/responses/" + encodeURIComponent(id));
      }
    } catch (_) { stored = null; }
  }
  if (stored) {
    const old = byId.get(id) || {};
    let entry = { ...old, ...stored, input_items: input, root: old.root || (previous ? (byId.get(previous) || {}).root || previous : id) };
    const timing = live.timings(stored.usage);
    if (!RUNNING.has(stored.status) && (timing.ttft_ms || !(stored.metadata || {}).title)) {
      try {
        const meta = { ...(stored.metadata || {}), ...timing };
        if (!meta.title) meta.title = current.title;
        entry = { ...entry, ...(await call("POST", "/responses/" + encodeURIComponent(id), { metadata: meta })) };
      } catch (_) { /* the timings are not kept: nothing else is lost */ }
    }
    remember(entry);
    if (current.head === id || current.conv === convOf(entry)) {
      current.head = id;
      current.conv = convOf(entry);
      refreshTurn(live, entry);
    }
    renderList();
  } else {
    live.render();
  }
  busy(false);
  const failed = live.failed || (stored && stored.status === "failed" && stored.error && stored.error.message);
  if (failed && !(stored && stored.error)) ui.messages.lastElementChild?.append(el("div", "message error", failed));
  const s = live.speed();
  setStatus(s || (failed ? "" : ""));
}

// The finished answer's turn: the text as rendered while it streamed is kept (a long answer
// is not rendered again in one piece); its buttons, stats and branches are redrawn.
function refreshTurn(live, entry) {
  const text = (entry.output || []).filter((o) => o.type === "message").map((o) => partsText(o.content)).join("\n\n");
  const shown = live.output().filter((o) => o.type === "message").map((o) => partsText(o.content)).join("\n\n");
  let keep = null;
  // a cancelled answer is stored without the message it was writing: what was shown stays
  const cut = entry.status === "cancelled" && !text && shown;
  if (live.chunks && (text === shown || cut) && (entry.output || []).every((o) => o.type === "message")) {
    live.renderChunked(cut ? shown : text);
    keep = live.bubble;
  }
  const fresh = renderTurn(entry, true, keep);
  live.turn.replaceWith(fresh);
  for (const turn of ui.messages.querySelectorAll(".turn")) { // sibling counts changed
    if (turn === fresh) continue;
    const r = byId.get(turn.dataset.response);
    if (r) turn.querySelector(".meta.user")?.replaceWith(userMeta(r));
  }
}

function stop() {
  if (!running) return;
  const { id, controller } = running;
  if (id) fetch(api + "/responses/" + encodeURIComponent(id) + "/cancel", { method: "POST", headers: headers(false) }).catch(() => {});
  else controller.abort();
}
ui.stop.addEventListener("click", stop);

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.prompt.value.trim();
  if (!text || running) return;
  if (!ui.model.value) { setStatus("Pick a model first."); return; }
  ui.prompt.value = "";
  generate({ previous: current.head, input: [userMessage(text)], convKey: current.conv });
});
ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.form.requestSubmit();
  }
});
ui.toggleSide.addEventListener("click", () => document.body.classList.toggle("side-open"));

// --- start -----------------------------------------------------------------------------------

async function start() {
  const listed = await loadModels();
  if (!listed) return;
  await loadConversations();
  const c = conversations()[0];
  if (c && !current.conv && RUNNING.has(c.newest.status)) openConversation(c.key);
}

applyTheme(localStorage.getItem(THEME_STORE) || "auto");
ui.key.value = sessionStorage.getItem(KEY_STORE) || "";
let appliedKey = ui.key.value;
ui.key.addEventListener("change", () => {
  if (ui.key.value.trim() === appliedKey) return; // the same key again (a blur): nothing to do
  appliedKey = ui.key.value.trim();
  sessionStorage.setItem(KEY_STORE, appliedKey);
  newChat();
  start();
});
start();
