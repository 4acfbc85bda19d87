// wecombot console: the chat, the event log and the switches. Plain JS, no dependencies.
// Everything shown arrives on one Server-Sent Events stream (/api/stream); the page only
// POSTs what a person does (send, enter_agent, inject a fault). User text is always set
// with textContent, never parsed as HTML.
"use strict";

(() => {
  const $ = (selector) => document.querySelector(selector);
  const PRESETS = ["zhang.san", "lisi", "wang.wu@example"];
  const USER_ID = /^[A-Za-z0-9][A-Za-z0-9_\-@.]{0,63}$/;
  const COLORS = ["#3b82f6", "#10b981", "#f59e0b", "#ef4444", "#8b5cf6", "#14b8a6", "#ec4899", "#6366f1"];
  const MAX_EVENT_ROWS = 1500;

  const state = {
    boot: null,
    offline: true,
    retryAfter: 5,
    current: null,
    users: new Map(), // user -> {li, thread, preview, unread, unreadCount, typing}
    said: new Map(), // key -> what the console posted, and the gateway's answers
    keyOfMsg: new Map(), // MsgId -> key
    pendingEvents: new Map(), // user -> event callbacks not yet stored: {key, create_time, event, event_key}
    storedEvents: new Map(), // eventIdentity() -> seq of the event callbacks stored
    bot: new Map(), // WeCom msgid -> bubble of a delivered part
    parts: new Map(), // WeCom msgid -> "i/n" label (PartDelivered seen before the send)
    awaiting: new Map(), // user -> Set of MsgIds whose reply is not delivered yet
    history: null, // the log's events shown from before the console started, then false
  };

  // ------------------------------------------------------------------ helpers
  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }

  function colorOf(name) {
    let hash = 0;
    for (const ch of name) hash = (hash * 31 + ch.codePointAt(0)) >>> 0;
    return COLORS[hash % COLORS.length];
  }

  function avatar(name) {
    const node = el("div", "avatar", name.slice(0, 1).toUpperCase());
    node.style.background = colorOf(name);
    return node;
  }

  function botAvatar() {
    return el("div", "avatar bot-avatar", "AI");
  }

  function pad(n, width = 2) {
    return String(n).padStart(width, "0");
  }

  function clock(date) {
    return `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}.${pad(date.getMilliseconds(), 3)}`;
  }

  function short(id) {
    if (!id) return "—";
    return id.length > 12 ? `${id.slice(0, 8)}…` : id;
  }

  function clip(text, n = 90) {
    const flat = String(text).replace(/\s+/g, " ");
    return flat.length > n ? `${flat.slice(0, n)}…` : flat;
  }

  async function post(path, body) {
    const response = await fetch(path, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    let data = {};
    try {
      data = await response.json();
    } catch (_) {
      // not JSON: keep the status
    }
    if (!response.ok) throw new Error(data.error || `HTTP ${response.status}`);
    return data;
  }

  function hint(text, bad = false) {
    const node = $("#composer-hint");
    node.textContent = text;
    node.classList.toggle("bad", bad);
  }

  // ------------------------------------------------------------------ conversations
  function ensureUser(user) {
    let entry = state.users.get(user);
    if (entry) return entry;
    const li = el("li");
    li.dataset.user = user;
    const who = el("div", "who");
    const preview = el("div", "preview", "");
    who.append(el("div", "name", user), preview);
    const unread = el("span", "unread");
    unread.hidden = true;
    li.append(avatar(user), who, unread);
    li.addEventListener("click", () => select(user));
    $("#user-list").append(li);

    const thread = el("div", "thread");
    thread.dataset.user = user;
    thread.hidden = true;
    const empty = el("div", "empty");
    empty.append(
      el("div", null, "Say something to the app as "),
      el("b", null, user),
      el("div", null, "中文和 English 都可以。"),
    );
    thread.append(empty);
    $("#messages").append(thread);

    entry = { li, thread, preview, unread, unreadCount: 0, typing: null };
    state.users.set(user, entry);
    return entry;
  }

  function select(user) {
    const chosen = ensureUser(user);
    state.current = user;
    for (const [name, entry] of state.users) {
      entry.li.classList.toggle("active", name === user);
      entry.thread.hidden = name !== user;
    }
    chosen.unreadCount = 0;
    chosen.unread.hidden = true;
    $("#chat-title").textContent = user;
    try {
      localStorage.setItem("wecombot.console.user", user);
    } catch (_) {
      // private mode: fine
    }
    filterEvents();
    scrollChat(true);
  }

  function nearBottom(box) {
    return box.scrollHeight - box.scrollTop - box.clientHeight < 80;
  }

  function scrollChat(force) {
    const box = $("#messages");
    if (force || nearBottom(box)) box.scrollTop = box.scrollHeight;
  }

  function addToThread(user, node, preview, incoming) {
    const entry = ensureUser(user);
    const stick = nearBottom($("#messages"));
    const empty = entry.thread.querySelector(".empty");
    if (empty) empty.remove();
    entry.thread.insertBefore(node, entry.typing);
    if (preview !== null) entry.preview.textContent = clip(preview, 40);
    if (user !== state.current) {
      if (incoming) {
        entry.unreadCount += 1;
        entry.unread.textContent = String(entry.unreadCount);
        entry.unread.hidden = false;
      }
    } else if (stick) {
      scrollChat(true);
    }
  }

  function notice(user, text, bad = false) {
    addToThread(user, el("div", bad ? "notice bad" : "notice", text), null, false);
  }

  function updateTyping(user) {
    const entry = ensureUser(user);
    const waiting = state.awaiting.get(user);
    const on = Boolean(waiting && waiting.size);
    if (on && !entry.typing) {
      const row = el("div", "msg bot typing-row");
      const bubble = el("div", "bubble typing");
      bubble.append(el("i"), el("i"), el("i"));
      const body = el("div", "body");
      body.append(bubble);
      row.append(botAvatar(), body);
      entry.thread.append(row);
      entry.typing = row;
      if (user === state.current) scrollChat(false);
    } else if (!on && entry.typing) {
      entry.typing.remove();
      entry.typing = null;
    }
  }

  function await_(user, msgId, on) {
    if (!state.awaiting.has(user)) state.awaiting.set(user, new Set());
    const set = state.awaiting.get(user);
    if (on) set.add(msgId);
    else set.delete(msgId);
    updateTyping(user);
  }

  // ------------------------------------------------------------------ what the console said
  function onSaid(d) {
    const row = el("div", "msg mine");
    row.dataset.key = d.key;
    const body = el("div", "body");
    const isEvent = d.kind === "event";
    const bubble = el("div", isEvent ? "bubble event" : "bubble", isEvent ? `⟨event: ${d.text}⟩` : d.text);
    const status = el("div", "status", "sending…");
    body.append(bubble, status);
    row.append(avatar(d.user), body);
    state.said.set(d.key, { user: d.user, status, answers: [], seq: null, sameAs: null });
    if (d.msg_id) state.keyOfMsg.set(d.msg_id, d.key);
    if (isEvent && !d.external) {
      if (!state.pendingEvents.has(d.user)) state.pendingEvents.set(d.user, []);
      const { key, create_time, event, event_key } = d;
      const pending = { key, create_time, event, event_key: event_key ?? null };
      const seq = state.storedEvents.get(eventIdentity(d.user, pending));
      if (seq === undefined) state.pendingEvents.get(d.user).push(pending);
      else state.said.get(d.key).sameAs = seq; // its twin's event came first
    }
    addToThread(d.user, row, isEvent ? `[${d.text}]` : d.text, false);
  }

  function renderStatus(said) {
    const parts = [];
    for (const answer of said.answers) {
      if (answer.attempt > 1) {
        const text = `↻ WeCom retry after ${state.retryAfter} s → ${answer.status || "no answer"}`;
        const dupe = answer.dupe ? " (same MsgId: JetStream kept one)" : "";
        parts.push(["retry", text + dupe]);
      } else if (answer.status === 200) {
        parts.push(["ok", "✓ gateway 200"]);
      } else {
        const what = answer.status ? `HTTP ${answer.status}` : "not delivered";
        parts.push(["bad", `✗ ${what}: ${answer.detail || "the gateway refused it"}`]);
      }
    }
    if (said.seq !== null) parts.push(["ok", `stored as seq ${said.seq}`]);
    if (said.sameAs !== null) parts.push(["retry", `the same event as seq ${said.sameAs} to WeCom (same second): JetStream kept one`]);
    said.status.replaceChildren();
    parts.forEach(([cls, text], i) => {
      if (i) said.status.append(" · ");
      said.status.append(el("span", cls, text));
    });
  }

  function onCallback(d) {
    const said = state.said.get(d.key);
    if (!said) return;
    said.answers.push(d);
    renderStatus(said);
  }

  // ------------------------------------------------------------------ what WeCom delivered
  function onSent(d) {
    const row = el("div", "msg bot");
    row.dataset.msgid = d.msgid;
    const body = el("div", "body");
    let label = state.offline ? "wecombot · offline model" : "wecombot";
    // Delivered before the console started: the simulated WeCom of that run is gone, so
    // the text is the reply's as the log holds it, and unknown when that reply is older
    // than the events shown.
    if (d.from_log) label = "wecombot · delivered before this console started (from the log)";
    const known = d.text !== null && d.text !== undefined;
    const text = known ? d.text : "(text unknown: its reply is older than the events shown)";
    const bubble = el("div", known ? "bubble" : "bubble unknown", text);
    body.append(el("div", "sender", label), bubble);
    row.append(botAvatar(), body);
    state.bot.set(d.msgid, bubble);
    const part = state.parts.get(d.msgid);
    if (part) labelPart(bubble, part);
    addToThread(d.user, row, known ? d.text : null, !d.from_log);
    if (d.truncated) notice(d.user, "WeCom truncated this message (over 2048 bytes)", true);
  }

  function labelPart(bubble, label) {
    if (bubble.querySelector(".part")) return;
    bubble.append(el("span", "part", `part ${label}`));
  }

  // ------------------------------------------------------------------ the event log
  function eventSummary(type, e) {
    switch (type) {
      case "MessageReceived": {
        const p = e.payload || {};
        if (p.kind === "text") return `“${clip(p.content)}”`;
        if (p.kind === "event") return `event ${p.event}${p.event_key ? ` ${p.event_key}` : ""}`;
        return `${e.msg_type} message`;
      }
      case "ReplyGenerated":
        return `${e.kind}${e.model ? ` · ${e.model}` : ""} · “${clip(e.text, 70)}”`;
      case "ReplyFailed":
        return `${e.reason} (${e.attempts} attempts)`;
      case "ConversationReset":
        return `“${clip(e.text)}”`;
      case "PartDelivered":
        return `part ${e.index + 1}/${e.total} → WeCom msgid ${e.wecom_msgid}`;
      case "ReplyDelivered":
        return `${e.parts} part${e.parts === 1 ? "" : "s"} delivered`;
      case "DeliveryFailed":
        return `errcode ${e.errcode}: ${e.reason}`;
      case "ReplyRequeued":
        return `delivering reply ${e.reply_id.slice(0, 8)}… again (${e.reason})`;
      default:
        return "";
    }
  }

  function addRow({ kind, type, pillClass, time, seq, user, summary, ids, json, past }) {
    const list = $("#event-list");
    const stick = nearBottom(list);
    const li = el("li", past ? "fresh past" : "fresh");
    li.dataset.kind = kind;
    li.dataset.type = type;
    li.dataset.user = user || "";
    const details = el("details");
    const head = el("summary");
    const line = el("div", "ev-line");
    line.append(el("span", "ev-time", clock(time)), el("span", `pill ${pillClass}`, type));
    if (seq) line.append(el("span", "ev-seq", `#${seq}`));
    if (user) line.append(el("span", "ev-user", user));
    head.append(line);
    if (summary) head.append(el("div", "ev-summary", summary));
    if (ids) head.append(el("div", "ev-ids", ids));
    details.append(head);
    if (json) details.append(el("pre", null, JSON.stringify(json, null, 2)));
    li.append(details);
    list.append(li);
    const empty = list.querySelector(".events-empty");
    if (empty) empty.remove();
    while (list.children.length > MAX_EVENT_ROWS) list.firstElementChild.remove();
    applyFilter(li);
    if (stick) list.scrollTop = list.scrollHeight;
  }

  function applyFilter(li) {
    const all = $("#all-users").checked;
    const api = $("#show-api").checked;
    const user = li.dataset.user;
    const hidden = (li.dataset.kind === "api" && !api) || (user && !all && user !== state.current);
    li.classList.toggle("hidden", Boolean(hidden));
  }

  function filterEvents() {
    document.querySelectorAll("#event-list li").forEach(applyFilter);
    const list = $("#event-list");
    list.scrollTop = list.scrollHeight;
  }

  function onHistory(d) {
    if (d.through_seq < d.from_seq) {
      state.history = false; // the log was empty: everything shown is new
      return;
    }
    state.history = true;
    const earlier = d.earlier ? `; ${d.earlier} earlier event${d.earlier === 1 ? "" : "s"} not shown` : "";
    divider(`From the log: seq ${d.from_seq}–${d.through_seq}, appended before this console started${earlier}. Replies then delivered are shown as the log records them.`);
  }

  function divider(text) {
    const list = $("#event-list");
    const empty = list.querySelector(".events-empty");
    if (empty) empty.remove();
    list.append(el("li", "divider", text));
    list.scrollTop = list.scrollHeight;
  }

  // The bubble of an event callback this page sent, by what WeCom tells events apart by
  // (user, CreateTime, event and key: not their order, as one of two clicks in one second
  // is not stored, and a refused one never is). Its twins in that second were kept as one.
  function eventIdentity(user, x) {
    return JSON.stringify([user, x.create_time, x.event, x.event_key]);
  }

  function matchEvent(user, e, seq) {
    const p = e.payload || {};
    const identity = eventIdentity(user, { create_time: e.create_time, event: p.event, event_key: p.event_key ?? null });
    state.storedEvents.set(identity, seq);
    const same = (x) => eventIdentity(user, x) === identity;
    const pending = state.pendingEvents.get(user) || [];
    const matched = pending.filter(same);
    if (!matched.length) return undefined;
    state.pendingEvents.set(user, pending.filter((x) => !same(x)));
    for (const twin of matched.slice(1)) {
      const said = state.said.get(twin.key);
      said.sameAs = seq;
      renderStatus(said);
    }
    return matched[0].key;
  }

  function onEvent(d) {
    const e = d.event || {};
    const user = e.conversation || "";
    if (state.history && !d.history) {
      state.history = false;
      divider("Live from here.");
    }
    addRow({
      past: d.history,
      kind: "event",
      type: d.type,
      pillClass: d.type,
      time: new Date(d.appended_at),
      seq: d.seq,
      user,
      summary: d.error || eventSummary(d.type, e),
      ids: `id ${short(e.event_id)} · msg ${short(e.correlation_id)} · cause ${short(e.causation_id)}`,
      json: { seq: d.seq, subject: d.subject, appended_at: d.appended_at, ...e },
    });
    if (!user) return;
    switch (d.type) {
      case "MessageReceived": {
        let key = e.msg_id ? state.keyOfMsg.get(e.msg_id) : null;
        if (!key && e.msg_type === "event") key = matchEvent(user, e, d.seq);
        if (key) {
          const said = state.said.get(key);
          said.seq = d.seq;
          renderStatus(said);
        } else {
          // Not from this page (a test, curl, the load generator): show it all the same.
          const p = e.payload || {};
          // onSaid shows an event as ⟨event: …⟩ (it said ⟨event: ⟨event: enter_agent⟩⟩).
          const text = p.kind === "text" ? p.content
            : p.kind === "event" ? `${p.event}${p.event_key ? ` ${p.event_key}` : ""}` : `${e.msg_type} message`;
          onSaid({ key: `seq-${d.seq}`, user, text, kind: p.kind === "text" ? "text" : "event", external: true });
          const said = state.said.get(`seq-${d.seq}`);
          said.seq = d.seq;
          renderStatus(said);
        }
        if (e.msg_type === "text") await_(user, e.correlation_id, true);
        break;
      }
      case "ReplyFailed":
        notice(user, `The model could not answer: ${e.reason}. The user gets the apology.`, true);
        break;
      case "PartDelivered": {
        if (e.total > 1) {
          const label = `${e.index + 1}/${e.total}`;
          const bubble = state.bot.get(e.wecom_msgid);
          if (bubble) labelPart(bubble, label);
          else state.parts.set(e.wecom_msgid, label);
        }
        break;
      }
      case "ReplyDelivered":
        await_(user, e.correlation_id, false);
        break;
      case "DeliveryFailed":
        await_(user, e.correlation_id, false);
        notice(user, `WeCom refused the reply — ${e.reason} (${e.parts_delivered} part(s) delivered before)`, true);
        break;
      default:
        break;
    }
  }

  function onApi(d, at) {
    const failed = d.http !== 200 || (d.errcode !== undefined && d.errcode !== 0);
    let summary;
    if (d.http !== 200) summary = `HTTP ${d.http}`;
    else if (d.errcode === 0) summary = d.msgid ? `ok · msgid ${d.msgid}` : `ok${d.expires_in ? ` · token for ${d.expires_in} s` : ""}`;
    else summary = `errcode ${d.errcode} · ${d.errmsg || ""}`;
    if (d.injected) summary += " · injected";
    addRow({
      kind: "api",
      type: d.api,
      pillClass: failed ? "api err" : "api",
      time: new Date(at * 1000),
      user: d.touser || "",
      summary,
      json: d,
    });
  }

  function onSwitch(d, at) {
    addRow({ kind: "switch", type: "switch", pillClass: "switch", time: new Date(at * 1000), summary: d.text, json: d });
  }

  function onStats(d) {
    const box = $("#stats");
    box.replaceChildren(
      // The simulated WeCom's own counts, in memory: since this console started.
      el("span", null, `since start: gettoken ${d.gettoken_calls} · message/send ${d.send_calls} · delivered ${d.delivered}`),
    );
    if (d.pending_faults && d.pending_faults.length) {
      const pending = d.pending_faults.map((f) => `${f.times}× ${f.errcode}`).join(", ");
      box.append(el("div", "pending", `pending failures: ${pending}`));
    }
  }

  function setGateway(state_, text) {
    const badge = $("#gateway");
    badge.dataset.state = state_;
    badge.querySelector(".label").textContent = text;
  }

  function onGateway(d) {
    if (state.natsLost) return; // the page says that, whatever the gateway's state
    const text = {
      ready: "gateway ready",
      starting: "gateway starting…",
      down: "gateway down",
      // NATS away, say: callbacks are answered 503 (WeCom retries) until it is back
      "not ready": `gateway not ready: ${d.detail || "see its log"}`,
    }[d.state];
    setGateway(d.state, text || d.state);
    if (d.state === "ready") hint("Each message becomes a signed, encrypted callback posted to the gateway.");
  }

  // ------------------------------------------------------------------ the stream
  function onHello(h) {
    if (state.boot && state.boot !== h.boot) {
      window.location.reload(); // the dev process restarted: start over
      return;
    }
    state.boot = h.boot;
    state.offline = h.offline;
    state.retryAfter = h.retry_after_s;
    $("#retry-s").textContent = String(h.retry_after_s);
    const model = $("#model");
    model.className = `badge ${h.offline ? "offline" : "online"}`;
    model.textContent = h.offline ? "OFFLINE model · echo (set OPENAI_API_KEY)" : `model: ${h.model}`;
    model.title = h.offline
      ? "OPENAI_API_KEY is unset: the llm answers with the offline echo model, not an LLM"
      : `The llm calls ${h.model}`;
    $("#app").textContent = `app ${h.app} · callback ${h.callback_url}`;
    const select_ = $("#fail-code");
    if (!select_.options.length) {
      for (const code of h.errcodes) {
        const option = el("option", null, `${code.errcode} — ${code.reason.replace(/ \(errcode -?\d+\)$/, "")}`);
        option.value = String(code.errcode);
        option.title = `${code.reason}: ${code.then}`;
        select_.append(option);
      }
    }
    onStats(h.stats);
    onGateway({ state: h.gateway, detail: h.gateway_detail });
  }

  function onItem(item) {
    const d = item.data;
    switch (item.kind) {
      case "said":
        return onSaid(d);
      case "callback":
        return onCallback(d);
      case "history":
        return onHistory(d);
      case "event":
        return onEvent(d);
      case "sent":
        return onSent(d);
      case "api":
        return onApi(d, item.at);
      case "switch":
        return onSwitch(d, item.at);
      case "stats":
        return onStats(d);
      case "gateway":
        return onGateway(d);
      case "nats":
        // Closed for good by nats-py (an -ERR from the broker): nothing more will show.
        state.natsLost = true;
        setGateway("down", "console lost NATS");
        return hint(`The console's NATS connection closed for good (${d.reason}): the event log stopped. Restart wecombot dev.`, true);
      case "silenced":
        // The llm appends nothing for it: no reply is coming.
        await_(d.user, d.msg_id, false);
        return notice(d.user, `No reply to this one: ${d.why}. The llm appends nothing for it.`);
      default:
        return undefined;
    }
  }

  function connect() {
    const source = new EventSource("/api/stream");
    source.addEventListener("hello", (e) => onHello(JSON.parse(e.data)));
    source.addEventListener("item", (e) => onItem(JSON.parse(e.data)));
    source.addEventListener("error", () => setGateway("down", "console disconnected — is wecombot dev running?"));
  }

  // ------------------------------------------------------------------ what a person does
  async function send() {
    const box = $("#text");
    const text = box.value;
    if (!text.trim() || !state.current) return;
    box.value = "";
    try {
      await post("/api/send", { user: state.current, text, retry: $("#retry").checked });
    } catch (err) {
      box.value = text;
      hint(`Not sent: ${err.message}`, true);
    }
  }

  function wire() {
    $("#composer").addEventListener("submit", (e) => {
      e.preventDefault();
      send();
    });
    $("#text").addEventListener("keydown", (e) => {
      // Enter sends; Shift+Enter is a new line; Enter that confirms an IME (拼音) choice does not send.
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
        e.preventDefault();
        send();
      }
    });
    $("#new-user").addEventListener("submit", (e) => {
      e.preventDefault();
      const input = $("#user-input");
      const user = input.value.trim();
      if (!USER_ID.test(user)) {
        hint("A UserID is 1–64 letters, digits or _-@. and starts with a letter or digit.", true);
        return;
      }
      input.value = "";
      select(user);
      $("#text").focus();
    });
    $("#enter-agent").addEventListener("click", async () => {
      try {
        await post("/api/event", { user: state.current, event: "enter_agent", retry: $("#retry").checked });
      } catch (err) {
        hint(`Not sent: ${err.message}`, true);
      }
    });
    for (const item of document.querySelectorAll("#menu button[data-key]")) {
      item.addEventListener("click", async () => {
        try {
          await post("/api/event", { user: state.current, event: "click", key: item.dataset.key, retry: $("#retry").checked });
        } catch (err) {
          hint(`Not sent: ${err.message}`, true);
        }
      });
    }
    $("#expire").addEventListener("click", async () => {
      try {
        hint((await post("/api/faults", { action: "expire_token" })).text);
      } catch (err) {
        hint(err.message, true);
      }
    });
    $("#fail-form").addEventListener("submit", async (e) => {
      e.preventDefault();
      try {
        const answer = await post("/api/faults", {
          action: "fail_sends",
          errcode: Number($("#fail-code").value),
          times: Number($("#fail-times").value),
        });
        hint(answer.text);
      } catch (err) {
        hint(err.message, true);
      }
    });
    $("#clear-faults").addEventListener("click", async () => {
      try {
        hint((await post("/api/faults", { action: "clear_faults" })).text);
      } catch (err) {
        hint(err.message, true);
      }
    });
    $("#all-users").addEventListener("change", filterEvents);
    $("#show-api").addEventListener("change", filterEvents);
  }

  function start() {
    const list = $("#event-list");
    list.append(el("li", "events-empty", "Events appear here as JetStream appends them. 事件会实时显示在这里。"));
    for (const user of PRESETS) ensureUser(user);
    let first = PRESETS[0];
    try {
      const saved = localStorage.getItem("wecombot.console.user");
      if (saved && USER_ID.test(saved)) first = saved;
    } catch (_) {
      // private mode
    }
    wire();
    select(first);
    connect();
    $("#text").focus();
  }

  start();
})();
