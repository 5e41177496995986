// Flywheel chat page: plain JS, no build step. Talks to /ws (frames of DESIGN.md's contract) and
// reads conversations from /api. The page shows one path through a conversation's message tree:
// at every message with siblings (regenerations, edits) "< 2/3 >" picks which branch is shown.
// Any answer can be edited into the one the user wanted (a demonstration, stored as a sibling
// written by them); editing one's own question starts a new branch that is answered.
"use strict";

// ---- identity -------------------------------------------------------------------------------
// Anonymous identity: 32 random bytes drawn once and kept in localStorage. The server registers
// a token the first time it sees it, so this browser keeps its conversations across reloads.
const TOKEN_KEY = "flywheel.token";

function userToken() {
  let token = localStorage.getItem(TOKEN_KEY);
  if (!token) {
    const bytes = new Uint8Array(32);
    crypto.getRandomValues(bytes);
    token = btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
    localStorage.setItem(TOKEN_KEY, token);
  }
  return token;
}
const TOKEN = userToken();

// ---- state ----------------------------------------------------------------------------------
const ROOT = "root"; // the parent key of a conversation's first messages
const state = {
  conversationId: null,
  messages: new Map(),    // id -> message (as /api/conversations/{id} returns them)
  children: new Map(),    // parent key -> [child ids], oldest first
  selected: new Map(),    // parent key -> the child shown (default: the newest)
  generation: null,       // {kind, messageId, userTempId, text} while an answer is requested/streaming
  replaced: new Map(),    // regenerated answer id -> the answer it replaced (offered for comparison)
  compared: new Map(),    // answer id -> "pending" | verdict
  pendingFeedback: [],    // [{messageId, previous}] awaiting an ack, oldest first
  pendingCompare: [],     // [answerId] awaiting an ack
  editing: null,          // {messageId, draft} while a message is being edited in place
  pendingEdits: [],       // [{messageId, content}] answer edits awaiting an ack, oldest first
};

const $ = (id) => document.getElementById(id);
const els = {
  thread: $("thread"), empty: $("empty"), input: $("input"), send: $("send"), stop: $("stop"),
  composer: $("composer"), conversations: $("conversations"), title: $("chat-title"),
  error: $("error"), errorText: $("error-text"), connection: $("connection"), version: $("model-version"),
};
const contentEls = new Map(); // message id -> its .content element, for streaming updates

const keyOf = (parentId) => parentId ?? ROOT;

// ---- HTTP -----------------------------------------------------------------------------------
async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: { "Authorization": `Bearer ${TOKEN}`, "Content-Type": "application/json", ...(options.headers || {}) },
  });
  const body = await response.json().catch(() => null);
  if (!response.ok) throw new Error(body?.message || body?.detail || `${response.status} ${response.statusText}`);
  return body;
}

// ---- errors ---------------------------------------------------------------------------------
let errorTimer = null;
function showError(message) {
  els.errorText.textContent = message;
  els.error.hidden = false;
  clearTimeout(errorTimer);
  errorTimer = setTimeout(hideError, 12000);
}
function hideError() { els.error.hidden = true; }
$("error-close").addEventListener("click", hideError);

// ---- the message tree -------------------------------------------------------------------------
function addMessage(message) {
  state.messages.set(message.id, message);
  const key = keyOf(message.parent_id);
  const siblings = state.children.get(key) || [];
  if (!siblings.includes(message.id)) siblings.push(message.id);
  state.children.set(key, siblings);
}

function removeMessage(id) {
  const message = state.messages.get(id);
  if (!message) return;
  state.messages.delete(id);
  const key = keyOf(message.parent_id);
  state.children.set(key, (state.children.get(key) || []).filter((x) => x !== id));
  if (state.selected.get(key) === id) state.selected.delete(key);
}

// An optimistic user message gets its real id from the 'started' frame.
function renameMessage(oldId, newId) {
  const message = state.messages.get(oldId);
  if (!message) return;
  removeMessage(oldId);
  message.id = newId;
  addMessage(message);
  state.selected.set(keyOf(message.parent_id), newId);
}

function shownPath() {
  const path = [];
  let key = ROOT;
  for (;;) {
    const siblings = state.children.get(key);
    if (!siblings || siblings.length === 0) return path;
    const chosen = state.selected.get(key);
    const id = siblings.includes(chosen) ? chosen : siblings[siblings.length - 1];
    path.push(state.messages.get(id));
    key = id;
  }
}

function resetConversation(id) {
  state.conversationId = id;
  state.messages.clear(); state.children.clear(); state.selected.clear();
  state.replaced.clear(); state.compared.clear();
  state.editing = null;
}

// ---- rendering ----------------------------------------------------------------------------------
const ICONS = {
  up: '<svg viewBox="0 0 24 24" width="16" height="16" aria-hidden="true"><path fill="none" stroke="currentColor" stroke-width="1.8" stroke-linejoin="round" d="M7 10v10H4V10h3Zm0 0 4-7c1.7 0 2.6 1.1 2.2 2.8L12.6 9H19a2 2 0 0 1 2 2.3l-1.2 7A2 2 0 0 1 17.8 20H7"/></svg>',
  down: '<svg viewBox="0 0 24 24" width="16" height="16" aria-hidden="true"><path fill="none" stroke="currentColor" stroke-width="1.8" stroke-linejoin="round" d="M17 14V4h3v10h-3Zm0 0-4 7c-1.7 0-2.6-1.1-2.2-2.8l.6-3.2H5a2 2 0 0 1-2-2.3l1.2-7A2 2 0 0 1 6.2 4H17"/></svg>',
  regenerate: '<svg viewBox="0 0 24 24" width="16" height="16" aria-hidden="true"><path fill="none" stroke="currentColor" stroke-width="1.8" stroke-linecap="round" stroke-linejoin="round" d="M20 12a8 8 0 1 1-2.3-5.6M20 4v5h-5"/></svg>',
  edit: '<svg viewBox="0 0 24 24" width="16" height="16" aria-hidden="true"><path fill="none" stroke="currentColor" stroke-width="1.8" stroke-linejoin="round" d="M4 20h4L19 9l-4-4L4 16v4Zm9-13 4 4"/></svg>',
  copy: '<svg viewBox="0 0 24 24" width="16" height="16" aria-hidden="true"><rect x="8" y="8" width="12" height="12" rx="2" fill="none" stroke="currentColor" stroke-width="1.8"/><path d="M16 8V6a2 2 0 0 0-2-2H6a2 2 0 0 0-2 2v8a2 2 0 0 0 2 2h2" fill="none" stroke="currentColor" stroke-width="1.8"/></svg>',
};
const NOTES = { length: "Cut off at the length limit.", cancelled: "Stopped.", error: "The model failed while answering." };

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function iconButton(icon, label, onClick, extraClass = "") {
  const button = el("button", extraClass);
  button.type = "button";
  button.innerHTML = ICONS[icon];
  button.title = label;
  button.setAttribute("aria-label", label);
  button.addEventListener("click", onClick);
  return button;
}

function siblingNav(message) {
  const key = keyOf(message.parent_id);
  const siblings = state.children.get(key) || [];
  if (siblings.length < 2) return null;
  const index = siblings.indexOf(message.id);
  const nav = el("span", "siblings");
  const go = (step) => () => { state.selected.set(key, siblings[index + step]); render(); };
  const prev = el("button", "prev", "‹"); prev.type = "button"; prev.setAttribute("aria-label", "Previous answer");
  const next = el("button", "next", "›"); next.type = "button"; next.setAttribute("aria-label", "Next answer");
  prev.disabled = index <= 0 || busy(); next.disabled = index >= siblings.length - 1 || busy();
  prev.addEventListener("click", go(-1)); next.addEventListener("click", go(1));
  nav.append(prev, el("span", "position", `${index + 1}/${siblings.length}`), next);
  return nav;
}

function compareCard(message) {
  const otherId = state.replaced.get(message.id);
  const other = otherId && state.messages.get(otherId);
  if (!other || message.streaming || message.finish_reason === "error") return null;
  const status = state.compared.get(message.id);
  const card = el("div", "compare");
  if (status && status !== "pending") {
    card.classList.add("done");
    card.textContent = "Thanks, your comparison was saved.";
    return card;
  }
  const siblings = state.children.get(keyOf(message.parent_id)) || [];
  card.append(el("span", "question",
    `Compared with the previous answer (${siblings.indexOf(otherId) + 1}/${siblings.length}), is this one…`));
  for (const [verdict, label] of [["better", "Better"], ["worse", "Worse"], ["same", "About the same"]]) {
    const button = el("button", `verdict-${verdict}`, label);
    button.type = "button";
    button.disabled = status === "pending";
    button.addEventListener("click", () => compare(message.id, otherId, verdict));
    card.append(button);
  }
  return card;
}

// The in-place editor: the text in a box, Save / Cancel. Enter saves (Shift+Enter: a new line),
// Escape cancels. startEdit gives the box the focus once it is on the page; render() keeps it.
function editor(message) {
  const form = el("form", "editor");
  const box = el("textarea", "edit-input");
  box.value = state.editing.draft;
  box.rows = Math.min(12, Math.max(2, box.value.split("\n").length + 1));
  box.setAttribute("aria-label", message.role === "assistant" ? "Edit the answer into the one you wanted" : "Edit your message");
  box.addEventListener("input", () => { state.editing.draft = box.value; save.disabled = !box.value.trim(); });
  box.addEventListener("keydown", (event) => {
    if (event.key === "Escape") { event.preventDefault(); cancelEdit(); }
    else if (event.key === "Enter" && !event.shiftKey && !event.isComposing) { event.preventDefault(); saveEdit(); }
  });
  const save = el("button", "edit-save", message.role === "assistant" ? "Save" : "Save and answer");
  save.type = "submit";
  save.disabled = !box.value.trim();
  const cancel = el("button", "edit-cancel", "Cancel");
  cancel.type = "button";
  cancel.addEventListener("click", cancelEdit);
  form.addEventListener("submit", (event) => { event.preventDefault(); saveEdit(); });
  const buttons = el("div", "edit-buttons");
  buttons.append(cancel, save);
  form.append(box, buttons);
  return form;
}

function editButton(message) {
  const label = message.role === "assistant" ? "Edit into the answer you wanted" : "Edit your message";
  const button = iconButton("edit", label, () => startEdit(message.id), "edit");
  button.disabled = message.role === "user" && busy();
  return button;
}

function renderMessage(message) {
  const row = el("div", `msg ${message.role}`);
  row.dataset.id = message.id;
  if (message.streaming) row.classList.add("streaming");
  if (message.role === "assistant") {
    const avatar = el("div", "avatar", message.written_by === "user" ? "✎" : "◐");
    avatar.setAttribute("aria-hidden", "true");
    row.append(avatar);
  }
  const body = el("div", "body");
  if (state.editing && state.editing.messageId === message.id) {
    row.classList.add("editing");
    body.append(editor(message));
    row.append(body);
    return row;
  }
  const content = el("div", "content", message.content);
  contentEls.set(message.id, content);
  body.append(content);
  if (message.role === "assistant" && message.written_by === "user") {
    body.append(el("div", "note written-by-you", "Written by you: the model learns from it."));
  }

  if (message.role === "assistant" && !message.streaming) {
    if (NOTES[message.finish_reason]) {
      body.append(el("div", `note ${message.finish_reason === "error" ? "warn" : ""}`, NOTES[message.finish_reason]));
    }
    const actions = el("div", "actions");
    const up = iconButton("up", "Good answer", () => rate(message.id, 1), message.rating === 1 ? "thumb up on" : "thumb up");
    const down = iconButton("down", "Bad answer", () => rate(message.id, -1), message.rating === -1 ? "thumb down on" : "thumb down");
    const again = iconButton("regenerate", "Regenerate", () => regenerate(message.id), "regenerate");
    again.disabled = busy();
    const copy = iconButton("copy", "Copy", () => navigator.clipboard?.writeText(message.content), "copy");
    actions.append(up, down, copy, editButton(message), again);
    const nav = siblingNav(message);
    if (nav) { actions.append(el("span", "sep"), nav); }
    body.append(actions);
    const card = compareCard(message);
    if (card) body.append(card);
  } else if (message.role === "user" && !String(message.id).startsWith("pending-")) {
    const actions = el("div", "actions");
    actions.append(editButton(message));
    const nav = siblingNav(message);
    if (nav) actions.append(el("span", "sep"), nav);
    body.append(actions);
  }
  row.append(body);
  return row;
}

function render() {
  const stick = nearBottom();
  const caret = editorCaret();
  contentEls.clear();
  const path = shownPath().filter((m) => m.role !== "system");
  els.thread.replaceChildren(...(path.length ? path.map(renderMessage) : [els.empty]));
  if (caret) focusEditor(caret);
  updateComposer();
  if (stick) scrollToBottom();
}

// A render rebuilds the editor's box; one the user is typing in gets back its focus and selection
// (synchronously: a deferred caret move would land between a select-all and the typing after it).
function editorCaret() {
  const box = document.activeElement;
  if (!box || !box.classList.contains("edit-input")) return null;
  return [box.selectionStart, box.selectionEnd, box.selectionDirection];
}
function focusEditor([start, end, direction]) {
  const box = els.thread.querySelector(".edit-input");
  if (!box) return;
  box.focus();
  box.setSelectionRange(start, end, direction);
}

function nearBottom() {
  const t = els.thread;
  return t.scrollHeight - t.scrollTop - t.clientHeight < 120;
}
function scrollToBottom() { els.thread.scrollTop = els.thread.scrollHeight; }

function busy() { return state.generation !== null; }

function updateComposer() {
  const generating = busy();
  els.send.hidden = generating;
  els.stop.hidden = !generating;
  els.send.disabled = !els.input.value.trim() || !connected();
}

function setTitle(title) {
  els.title.textContent = title || "New chat";
  document.title = title ? `${title} · Flywheel` : "Flywheel";
}

// ---- conversations ----------------------------------------------------------------------------
function dayBucket(iso) {
  const days = (Date.now() - new Date(iso).getTime()) / 86400000;
  if (days < 1) return "Today";
  if (days < 7) return "Previous 7 days";
  return "Older";
}

async function loadConversations() {
  let conversations;
  try { conversations = await api("/api/conversations"); }
  catch (error) { showError(`Could not load your conversations: ${error.message}`); return; }
  const nodes = [];
  let bucket = null;
  for (const c of conversations) {
    const b = dayBucket(c.updated_at);
    if (b !== bucket) { nodes.push(el("div", "section", b)); bucket = b; }
    const item = el("button", "conversation", c.title || "New chat");
    item.type = "button";
    item.dataset.id = c.id;
    item.title = c.title;
    if (c.id === state.conversationId) { item.classList.add("active"); setTitle(c.title); }
    item.addEventListener("click", () => openConversation(c.id));
    nodes.push(item);
  }
  els.conversations.replaceChildren(...nodes);
}

async function openConversation(id) {
  if (busy()) { showError("Wait for the answer to finish, or stop it, before switching conversations."); return; }
  let tree;
  try { tree = await api(`/api/conversations/${encodeURIComponent(id)}`); }
  catch (error) { showError(`Could not open the conversation: ${error.message}`); newChat(); return; }
  resetConversation(tree.id);
  for (const message of tree.messages) addMessage(message);
  history.replaceState(null, "", `#c=${tree.id}`);
  setTitle(tree.title);
  for (const item of els.conversations.querySelectorAll(".conversation")) {
    item.classList.toggle("active", item.dataset.id === tree.id);
  }
  render();
  scrollToBottom();
}

function newChat() {
  if (busy()) { showError("Wait for the answer to finish, or stop it, before starting a new chat."); return; }
  resetConversation(null);
  history.replaceState(null, "", location.pathname);
  setTitle(null);
  for (const item of els.conversations.querySelectorAll(".conversation.active")) item.classList.remove("active");
  render();
  els.input.focus();
}

// ---- actions ----------------------------------------------------------------------------------
function sendMessage() {
  const text = els.input.value.trim();
  if (!text || busy()) return;
  const path = shownPath();
  const parent = path.length ? path[path.length - 1] : null;
  const frame = { type: "message", conversation_id: state.conversationId, parent_id: parent ? parent.id : null, content: text };
  if (!sendFrame(frame)) return;
  hideError();
  const tempId = `pending-${Date.now()}`;
  addMessage({ id: tempId, parent_id: parent ? parent.id : null, role: "user", content: text });
  state.selected.set(keyOf(parent ? parent.id : null), tempId);
  state.generation = { kind: "message", messageId: null, userTempId: tempId, text };
  els.input.value = "";
  autosize();
  render();
  scrollToBottom();
}

function regenerate(messageId) {
  if (busy()) return;
  if (!sendFrame({ type: "regenerate", message_id: messageId })) return;
  hideError();
  state.generation = { kind: "regenerate", messageId: null, replaces: messageId };
  render();
}

function rate(messageId, rating) {
  const message = state.messages.get(messageId);
  if (!message || message.rating === rating) return;
  if (!sendFrame({ type: "feedback", message_id: messageId, rating })) return;
  state.pendingFeedback.push({ messageId, previous: message.rating ?? null });
  message.rating = rating; // shown at once; reverted if the server refuses it
  render();
}

function compare(messageId, otherId, verdict) {
  if (!sendFrame({ type: "compare", message_id: messageId, other_id: otherId, verdict })) return;
  state.compared.set(messageId, "pending");
  state.pendingCompare.push({ messageId, verdict });
  render();
}

function startEdit(messageId) {
  const message = state.messages.get(messageId);
  if (!message || message.streaming) return;
  state.editing = { messageId, draft: message.content };
  render();
  focusEditor([message.content.length, message.content.length, "none"]);
}

function cancelEdit() {
  const messageId = state.editing?.messageId;
  state.editing = null;
  render();
  els.thread.querySelector(`.msg[data-id="${messageId}"] .edit`)?.focus();
}

// An answer's edit is stored and acked (then shown as a new sibling, selected); a question's
// edit is a new branch shown at once and answered like a message.
function saveEdit() {
  const editing = state.editing;
  const message = editing && state.messages.get(editing.messageId);
  const text = editing ? editing.draft.trim() : "";
  if (!message || !text) return;
  if (text === message.content) { cancelEdit(); return; }
  if (message.role === "user" && busy()) { showError("Wait for the answer to finish, or stop it, before editing a question."); return; }
  if (!sendFrame({ type: "edit", message_id: message.id, content: text })) return;
  hideError();
  state.editing = null;
  if (message.role === "assistant") {
    state.pendingEdits.push({ messageId: message.id, content: text });
  } else {
    const tempId = `pending-${Date.now()}`;
    addMessage({ id: tempId, parent_id: message.parent_id, role: "user", content: text, written_by: "user", edited_from: message.id });
    state.selected.set(keyOf(message.parent_id), tempId);
    state.generation = { kind: "edit", messageId: null, userTempId: tempId, text, edits: message.id };
  }
  render();
}

function stop() {
  if (busy()) sendFrame({ type: "cancel" });
}

// ---- websocket ----------------------------------------------------------------------------------
let socket = null;
let backoffMs = 500;
let resyncOnOpen = false;

function connected() { return socket !== null && socket.readyState === WebSocket.OPEN; }

function setConnection(stateName, label) {
  els.connection.dataset.state = stateName;
  els.connection.textContent = label;
}

function connect() {
  setConnection("connecting", "Connecting…");
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  socket = new WebSocket(`${scheme}://${location.host}/ws?token=${encodeURIComponent(TOKEN)}`);
  socket.addEventListener("open", () => {
    backoffMs = 500;
    setConnection("open", "Connected");
    updateComposer();
    if (resyncOnOpen) {
      resyncOnOpen = false;
      loadConversations();
      if (state.conversationId) openConversation(state.conversationId);
    }
  });
  socket.addEventListener("message", (event) => {
    let frame;
    try { frame = JSON.parse(event.data); } catch { return; }
    onFrame(frame);
  });
  socket.addEventListener("close", () => {
    socket = null;
    interruptGeneration();
    // Exponential backoff with jitter, so a restarted server is not hit by every page at once.
    const delay = backoffMs * (0.75 + Math.random() / 2);
    backoffMs = Math.min(backoffMs * 2, 15000);
    setConnection("closed", `Reconnecting in ${Math.ceil(delay / 1000)} s…`);
    resyncOnOpen = true;
    updateComposer();
    setTimeout(connect, delay);
  });
}

// The server stores a generation cut by a disconnect as "cancelled"; the page re-reads the
// conversation once reconnected to show exactly what was kept.
function interruptGeneration() {
  const generation = state.generation;
  if (!generation) return;
  state.generation = null;
  const message = generation.messageId && state.messages.get(generation.messageId);
  if (message) { message.streaming = false; message.finish_reason = "cancelled"; }
  showError("Connection lost. Reconnecting…");
  render();
}

function sendFrame(frame) {
  if (!connected()) { showError("Not connected to the server yet: reconnecting, try again in a moment."); return false; }
  socket.send(JSON.stringify(frame));
  return true;
}

function onFrame(frame) {
  switch (frame.type) {
    case "started": return onStarted(frame);
    case "token": return onToken(frame);
    case "done": return onDone(frame);
    case "ack": return onAck(frame);
    case "error": return onError(frame);
  }
}

function onStarted(frame) {
  const generation = state.generation || { kind: "message" };
  generation.messageId = frame.message_id;
  state.generation = generation;
  const isNew = state.conversationId === null;
  state.conversationId = frame.conversation_id;
  if (generation.userTempId) renameMessage(generation.userTempId, frame.parent_id);
  addMessage({
    id: frame.message_id, parent_id: frame.parent_id, role: "assistant", content: "",
    model_version: frame.model_version, streaming: true, rating: null,
  });
  state.selected.set(keyOf(frame.parent_id), frame.message_id);
  if (generation.replaces) state.replaced.set(frame.message_id, generation.replaces);
  els.version.textContent = `model ${frame.model_version}`;
  if (isNew) {
    history.replaceState(null, "", `#c=${frame.conversation_id}`);
    loadConversations();
  }
  render();
  scrollToBottom();
}

function onToken(frame) {
  const message = state.messages.get(frame.message_id);
  if (!message) return;
  message.content += frame.text;
  const stick = nearBottom();
  const content = contentEls.get(frame.message_id);
  if (content) content.textContent = message.content;
  if (stick) scrollToBottom();
}

function onDone(frame) {
  const message = state.messages.get(frame.message_id);
  if (message) {
    message.streaming = false;
    message.finish_reason = frame.finish_reason;
    message.completion_tokens = frame.usage?.completion_tokens;
  }
  if (state.generation && state.generation.messageId === frame.message_id) state.generation = null;
  render();
  loadConversations();
}

function onAck(frame) {
  if (frame.of === "feedback") state.pendingFeedback.shift();
  if (frame.of === "edit") {
    const pending = state.pendingEdits.shift();
    const original = pending && state.messages.get(pending.messageId);
    if (original) {
      addMessage({
        id: frame.id, parent_id: original.parent_id, role: "assistant", content: pending.content,
        model_version: null, written_by: "user", edited_from: original.id, rating: null,
      });
      state.selected.set(keyOf(original.parent_id), frame.id);
    }
    render();
  }
  if (frame.of === "compare") {
    const pending = state.pendingCompare.shift();
    if (pending) state.compared.set(pending.messageId, pending.verdict);
    render();
  }
}

// Errors carry no request id: frames are answered in order, so an error before 'started'
// belongs to the pending generation, otherwise to the oldest unacknowledged vote.
function onError(frame) {
  showError(frame.message);
  if (frame.code === "engine_error") return; // about the streaming answer; its 'done' follows
  const generation = state.generation;
  if (generation && !generation.messageId) {
    state.generation = null;
    if (generation.userTempId) removeMessage(generation.userTempId);
    if (generation.kind === "edit") {
      state.editing = { messageId: generation.edits, draft: generation.text }; // back into the editor
    } else if (generation.userTempId && !els.input.value) {
      els.input.value = generation.text; autosize();
    }
    render();
    return;
  }
  if (state.pendingEdits.length) {
    const pending = state.pendingEdits.shift();
    state.editing = { messageId: pending.messageId, draft: pending.content };
    render();
    return;
  }
  if (state.pendingCompare.length) {
    state.compared.delete(state.pendingCompare.shift().messageId);
    render();
  } else if (state.pendingFeedback.length) {
    const pending = state.pendingFeedback.shift();
    const message = state.messages.get(pending.messageId);
    if (message) message.rating = pending.previous;
    render();
  }
}

// ---- composer -----------------------------------------------------------------------------------
function autosize() {
  els.input.style.height = "auto";
  els.input.style.height = `${Math.min(els.input.scrollHeight, 200)}px`;
  updateComposer();
}

els.input.addEventListener("input", autosize);
els.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    sendMessage();
  }
});
els.composer.addEventListener("submit", (event) => { event.preventDefault(); sendMessage(); });
els.stop.addEventListener("click", stop);
$("new-chat").addEventListener("click", newChat);

async function start() {
  render();
  connect();
  api("/api/version").then((v) => { if (v.model_version) els.version.textContent = `model ${v.model_version}`; }).catch(() => {});
  await loadConversations();
  const match = location.hash.match(/^#c=([0-9a-f-]{36})$/i);
  if (match) await openConversation(match[1]);
  els.input.focus();
}
start();
