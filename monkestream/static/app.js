// monkestream's page: a live chart per coin and the lobby chat, fed by one EventSource.
//
// Theory of operation
// 1. One EventSource carries every topic (each symbol's ticker and room:lobby). When the
//    topic list or the user changes, it is replaced by a new one that starts with
//    ?lastEventId= of the last event applied, so the server replays the gap; the old one
//    is closed only once the new one is open.
// 2. Events are applied at most once: ids ("EPOCH-SEQ") only grow, so an event whose id
//    is not above the last applied one is a replay already seen.
// 3. State from HTTP (symbols, charts, comments) is fetched after the stream is open, so
//    nothing published between the two is lost; a `reset` event refetches it.
// 4. User text only ever reaches the page through textContent.
"use strict";

(() => {
  const ROOM = "lobby";
  const ROOM_TOPIC = "room:" + ROOM;
  const USER_RE = /^[A-Za-z0-9._-]{1,24}$/;
  const WINDOWS = {
    "5m": { span: 300, step: 5, label: "5 minutes" },
    "1h": { span: 3600, step: 60, label: "hour" },
    "1d": { span: 86400, step: 1800, label: "day" },
  };
  const MAX_TICKER_TOPICS = 31;      // the server takes 32 topics per stream; one is the room
  const SYMBOLS_POLL_MS = 5000;      // the stream only carries subscribed topics: look for new ones
  const RESUMED_SHOWN_MS = 4000;
  const REOPEN_FIRST_MS = 1000;
  const REOPEN_MAX_MS = 15000;
  const MAX_COMMENTS = 100;
  const MAX_LOG = 500;
  const MAX_KEYS = 200;
  const STATE_TEXT = {
    connecting: "Connecting…",
    live: "Live",
    reconnecting: "Reconnecting…",
    resumed: "Resumed",
  };

  const $ = (id) => document.getElementById(id);

  // -- small helpers --------------------------------------------------------------

  // Prices are exact decimals: keep the server's own digits for display.
  function parseJSON(text) {
    return JSON.parse(text, (key, value, context) => {
      if (key === "price" && typeof value === "number") {
        return context && typeof context.source === "string" ? context.source : String(value);
      }
      return value;
    });
  }

  function parseId(text) {
    const m = /^(\d+)-(\d+)$/.exec(text || "");
    return m ? [Number(m[1]), Number(m[2])] : null;
  }

  function idAfter(a, b) {
    return a[0] !== b[0] ? a[0] > b[0] : a[1] > b[1];
  }

  function formatPrice(text) {
    if (/e/i.test(text) || text.length > 16) {
      return String(Number(Number(text).toPrecision(8)));
    }
    const [whole, frac] = text.split(".");
    const grouped = whole.replace(/\B(?=(\d{3})+(?!\d))/g, ",");
    return frac === undefined ? grouped : grouped + "." + frac;
  }

  function formatTime(seconds, withSeconds = true) {
    const options = { hour: "2-digit", minute: "2-digit" };
    if (withSeconds) options.second = "2-digit";
    return new Date(seconds * 1000).toLocaleTimeString([], options);
  }

  async function getJSON(url) {
    const response = await fetch(url, { headers: { Accept: "application/json" } });
    if (!response.ok) throw new Error(`${url}: ${response.status}`);
    return parseJSON(await response.text());
  }

  const storage = {
    get(key, fallback) {
      try {
        const text = localStorage.getItem("monkestream." + key);
        return text === null ? fallback : JSON.parse(text);
      } catch (_) {
        return fallback;
      }
    },
    set(key, value) {
      try {
        localStorage.setItem("monkestream." + key, JSON.stringify(value));
      } catch (_) {
        // storage full or disabled: the page still works for this visit
      }
    },
  };

  // -- price cards ------------------------------------------------------------------

  const cards = new Map();
  const priceLog = [];

  class Card {
    constructor(symbol) {
      this.symbol = symbol;
      this.window = "5m";
      this.series = {};        // window -> [{t, price, value}] once loaded
      this.generation = {};    // window -> fetch counter, so a stale answer is dropped
      this.latest = null;      // {t, price, value}
      this.updates = 0;
      const node = $("card-template").content.firstElementChild.cloneNode(true);
      this.node = node;
      this.svg = node.querySelector("svg");
      this.chart = node.querySelector(".chart");
      this.parts = {};
      for (const el of node.querySelectorAll("[data-role]")) this.parts[el.dataset.role] = el;
      node.dataset.symbol = symbol;
      node.setAttribute("aria-label", symbol + " price");
      this.parts.symbol.textContent = symbol;
      node.querySelector(".windows").setAttribute("aria-label", symbol + " chart window");
      for (const button of node.querySelectorAll(".windows button")) {
        button.addEventListener("click", () => this.show(button.dataset.window));
      }
      this.setLoading(true);
    }

    // A price: from the stream (counted) or from a /symbols snapshot (only if newer).
    apply(ticker, fromStream) {
      const point = { t: ticker.createdAt, price: ticker.price, value: Number(ticker.price) };
      if (!fromStream && this.latest && point.t <= this.latest.t) return;
      const previous = this.latest;
      this.latest = point;
      this.parts.currency.textContent = ticker.currency || "";
      if (fromStream) {
        this.updates += 1;
        this.node.dataset.updates = String(this.updates);
      }
      for (const name of Object.keys(this.series)) this.append(name, point);
      if (previous && previous.value !== point.value) {
        this.node.dataset.move = point.value > previous.value ? "up" : "down";
        this.node.classList.toggle("again");
      }
      this.node.dataset.price = point.price;
      this.parts.price.textContent = formatPrice(point.price);
      this.parts.updated.textContent = formatTime(point.t);
      this.parts.updated.dateTime = new Date(point.t * 1000).toISOString();
      this.draw();
    }

    append(name, point) {
      const series = this.series[name];
      if (!series) return;
      const { span, step } = WINDOWS[name];
      const last = series[series.length - 1];
      if (last && point.t - last.t < step) return;
      series.push(point);
      while (series.length && series[0].t < point.t - span) series.shift();
    }

    show(name) {
      if (!WINDOWS[name] || name === this.window && this.series[name]) return;
      this.window = name;
      this.node.dataset.window = name;
      for (const button of this.node.querySelectorAll(".windows button")) {
        button.setAttribute("aria-pressed", String(button.dataset.window === name));
      }
      if (this.series[name]) this.draw();
      else this.load(name);
    }

    async load(name) {
      const generation = (this.generation[name] || 0) + 1;
      this.generation[name] = generation;
      if (name === this.window) this.setLoading(true);
      let body;
      try {
        body = await getJSON(`/ticker/${encodeURIComponent(this.symbol)}/chart?window=${name}`);
      } catch (_) {
        if (this.generation[name] === generation) setTimeout(() => this.retryLoad(name, generation), 2000);
        return;
      }
      if (this.generation[name] !== generation) return;
      this.series[name] = body.points.map((p) => ({ t: p.t, price: p.price, value: Number(p.price) }));
      if (this.latest) this.append(name, this.latest);
      if (name === this.window) this.draw();
    }

    retryLoad(name, generation) {
      if (this.generation[name] === generation && !this.series[name]) this.load(name);
    }

    // Forget the charts (the server could not replay a gap) and load the shown one again.
    reload() {
      this.series = {};
      this.load(this.window);
    }

    setLoading(loading) {
      this.chart.dataset.state = loading ? "loading" : "ready";
      this.chart.querySelector(".chart-empty").textContent = loading ? "Loading the chart…" : "Waiting for points…";
    }

    draw() {
      const name = this.window;
      const series = this.series[name];
      if (!series) return;
      const { span, label } = WINDOWS[name];
      const newest = Math.max(series.length ? series[series.length - 1].t : 0, this.latest ? this.latest.t : 0);
      const points = series.filter((p) => p.t >= newest - span);
      const last = points[points.length - 1];
      // The live price extends the line until it becomes a point of its own.
      if (this.latest && (!last || this.latest.t > last.t)) points.push(this.latest);

      this.svg.dataset.points = String(series.length);
      this.svg.dataset.window = name;
      this.svg.setAttribute("aria-label", `${this.symbol} over the last ${label}: ${series.length} points`);
      this.setLoading(false);
      const paths = this.svg.querySelectorAll("path");
      if (!points.length) {
        this.chart.removeAttribute("data-has-points");
        for (const path of paths) path.setAttribute("d", "");
        this.setTrend(null);
        return;
      }
      this.chart.setAttribute("data-has-points", "");
      let lowPoint = points[0];
      let highPoint = points[0];
      for (const p of points) {
        if (p.value < lowPoint.value) lowPoint = p;
        if (p.value > highPoint.value) highPoint = p;
      }
      const low = lowPoint.value;
      const high = highPoint.value;
      const t0 = points[0].t;
      const t1 = points[points.length - 1].t;
      const x = (t) => (t1 === t0 ? 296 : 4 + ((t - t0) / (t1 - t0)) * 292);
      const y = (v) => (high === low ? 50 : 10 + (1 - (v - low) / (high - low)) * 80);
      const coords = points.map((p) => `${x(p.t).toFixed(2)},${y(p.value).toFixed(2)}`);
      const line = "M" + coords.join("L");
      const [startY] = coords[0].split(",").slice(1);
      const [endX, endY] = coords[coords.length - 1].split(",");
      // the area runs edge to edge, under the line's inset ends
      const area = `M0,${startY}L${coords.join("L")}L300,${endY}L300,100L0,100Z`;
      paths[0].setAttribute("d", points.length > 1 ? area : "");
      paths[1].setAttribute("d", points.length > 1 ? line : "");
      paths[2].setAttribute("d", `M${endX},${endY}l0,0`);
      this.parts.low.textContent = "Low " + formatPrice(lowPoint.price);
      this.parts.high.textContent = "High " + formatPrice(highPoint.price);
      this.setTrend(points.length > 1 ? [points[0].value, points[points.length - 1].value] : null);
    }

    setTrend(ends) {
      const change = this.parts.change;
      if (!ends || ends[0] === 0) {
        this.node.dataset.trend = "flat";
        change.textContent = "";
        return;
      }
      const pct = ((ends[1] - ends[0]) / ends[0]) * 100;
      const trend = pct > 0 ? "up" : pct < 0 ? "down" : "flat";
      this.node.dataset.trend = trend;
      const arrow = trend === "up" ? "▲" : trend === "down" ? "▼" : "■";
      change.textContent = `${arrow} ${Math.abs(pct).toFixed(2)}% · ${this.window}`;
    }
  }

  function cardFor(symbol) {
    let card = cards.get(symbol);
    if (card) return card;
    card = new Card(symbol);
    cards.set(symbol, card);
    const container = $("cards");
    const next = [...container.children].find((el) => el.dataset.symbol > symbol);
    container.insertBefore(card.node, next || null);
    $("prices-empty").hidden = true;
    if (stream.opened) card.load(card.window);
    return card;
  }

  function tickerTopics() {
    return [...cards.keys()].sort().slice(0, MAX_TICKER_TOPICS).map((s) => "ticker:" + s);
  }

  let polling = false;

  // Learn about symbols (and any price the stream could not have carried).
  async function pollSymbols() {
    if (polling) return;
    polling = true;
    try {
      const body = await getJSON("/symbols");
      const before = tickerTopics().join(",");
      for (const ticker of body.symbols) {
        cardFor(ticker.symbol).apply(ticker, false);
      }
      if (tickerTopics().join(",") !== before && stream.source) openStream();
    } catch (_) {
      // offline for now: the stream's reconnection brings us back here
    } finally {
      polling = false;
    }
  }

  // -- chat ------------------------------------------------------------------------

  const chat = {
    user: null,
    members: new Set(),
    comments: new Map(),       // id -> <li>
    deleted: new Set(),        // ids deleted lately, so a slower fetch cannot bring them back
    keys: new Map(),           // "room:id" -> deleteKey, kept in localStorage
  };
  const savedKeys = storage.get("deleteKeys", {});
  if (savedKeys && typeof savedKeys === "object") {
    for (const [id, key] of Object.entries(savedKeys)) if (typeof key === "string") chat.keys.set(id, key);
  }

  function keyOf(id) {
    return chat.keys.get(`${ROOM}:${id}`);
  }

  function rememberKey(id, key) {
    chat.keys.set(`${ROOM}:${id}`, key);
    while (chat.keys.size > MAX_KEYS) chat.keys.delete(chat.keys.keys().next().value);
    storage.set("deleteKeys", Object.fromEntries(chat.keys));
  }

  function forgetKey(id) {
    chat.keys.delete(`${ROOM}:${id}`);
    storage.set("deleteKeys", Object.fromEntries(chat.keys));
  }

  function chatStatus(text) {
    $("chat-status").textContent = text;
  }

  function renderMembers() {
    const list = $("members");
    const names = chat.user ? [...chat.members].sort() : [];
    list.replaceChildren(...names.map((name) => {
      const li = document.createElement("li");
      li.dataset.user = name;
      li.textContent = name;
      if (name === chat.user) li.className = "me";
      return li;
    }));
    list.dataset.count = String(names.length);
    $("member-count").textContent = chat.user ? String(names.length) : "";
    $("members-hint").hidden = Boolean(chat.user);
  }

  function addComment(comment) {
    const known = chat.comments.get(comment.id);
    if (known) {
      markMine(known, comment);   // our own comment, announced by the stream before the POST answered
      return;
    }
    const list = $("comments");
    const stick = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
    const li = document.createElement("li");
    li.dataset.commentId = String(comment.id);
    li.dataset.user = comment.user;
    const meta = document.createElement("div");
    meta.className = "meta";
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = comment.user;
    const time = document.createElement("time");
    time.dateTime = new Date(comment.createdAt * 1000).toISOString();
    time.textContent = formatTime(comment.createdAt, false);
    meta.append(who, " ", time);
    const text = document.createElement("p");
    text.className = "text";
    text.textContent = comment.text;
    li.append(meta, text);
    markMine(li, comment);
    const next = [...chat.comments.keys()].filter((id) => id > comment.id).sort((a, b) => a - b)[0];
    list.insertBefore(li, next === undefined ? null : chat.comments.get(next));
    chat.comments.set(comment.id, li);
    while (chat.comments.size > MAX_COMMENTS) removeComment(Math.min(...chat.comments.keys()));
    updateCommentCount();
    if (stick) list.scrollTop = list.scrollHeight;
  }

  // Comments we hold a deletion key for get a delete button.
  function markMine(li, comment) {
    if (!keyOf(comment.id) || li.querySelector(".delete")) return;
    li.classList.add("mine");
    const del = document.createElement("button");
    del.type = "button";
    del.className = "delete";
    del.dataset.delete = String(comment.id);
    del.textContent = "Delete";
    del.setAttribute("aria-label", `Delete your comment: ${comment.text.slice(0, 40)}`);
    del.addEventListener("click", () => deleteComment(comment.id));
    li.append(del);
  }

  function removeComment(id, deleted = false) {
    if (deleted) {
      chat.deleted.add(id);
      if (chat.deleted.size > MAX_COMMENTS) chat.deleted.delete(chat.deleted.values().next().value);
    }
    const li = chat.comments.get(id);
    if (!li) return;
    li.remove();
    chat.comments.delete(id);
    updateCommentCount();
  }

  function updateCommentCount() {
    $("comments").dataset.count = String(chat.comments.size);
    $("comments-empty").hidden = chat.comments.size > 0;
  }

  // Merge the room's newest comments with what the stream delivered while they were fetched.
  async function loadComments() {
    try {
      const body = await getJSON(`/room/${ROOM}/comments?limit=50`);
      const listed = new Set(body.comments.map((c) => c.id));
      const newest = Math.max(0, ...listed);
      for (const id of [...chat.comments.keys()]) {
        if (id <= newest && !listed.has(id)) removeComment(id);
      }
      for (const comment of body.comments) {
        if (!chat.deleted.has(comment.id)) addComment(comment);
      }
      updateCommentCount();
    } catch (_) {
      setTimeout(() => stream.opened && loadComments(), 2000);
    }
  }

  async function postComment() {
    const box = $("comment-text");
    const text = box.value.trim();
    if (!chat.user) return;
    if (!text) {
      chatStatus("Write something first.");
      box.focus();
      return;
    }
    $("post").disabled = true;
    try {
      const response = await fetch(`/room/${ROOM}/comments`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ user: chat.user, text }),
      });
      const body = await response.json().catch(() => ({}));
      if (response.status === 201) {
        rememberKey(body.id, body.deleteKey);
        addComment(body);
        box.value = "";
        chatStatus("");
      } else if (response.status === 429) {
        chatStatus("Easy there: you are posting too fast. Try again in a moment.");
      } else {
        chatStatus(body.error || `Could not post (${response.status}).`);
      }
    } catch (_) {
      chatStatus("Could not post: the server is unreachable.");
    } finally {
      $("post").disabled = !chat.user;
      box.focus();
    }
  }

  async function deleteComment(id) {
    const key = keyOf(id);
    if (!key) return;
    try {
      const response = await fetch(`/room/${ROOM}/comments/${id}`, {
        method: "DELETE",
        headers: { "X-Delete-Key": key },
      });
      if (response.status === 204 || response.status === 404) {
        forgetKey(id);
        removeComment(id, true);
        chatStatus("Comment deleted.");
        const box = $("comment-text");
        (box.disabled ? $("comments") : box).focus();
      } else {
        const body = await response.json().catch(() => ({}));
        if (response.status === 403) {
          // a key from an older database whose ids were handed out again
          forgetKey(id);
          const li = chat.comments.get(id);
          if (li) {
            li.classList.remove("mine");
            li.querySelector(".delete").remove();
          }
        }
        chatStatus(body.error || `Could not delete (${response.status}).`);
      }
    } catch (_) {
      chatStatus("Could not delete: the server is unreachable.");
    }
  }

  function setJoined(user) {
    chat.user = user;
    chat.members = new Set(user ? [user] : []);
    storage.set("joined", Boolean(user));
    const name = $("name");
    name.readOnly = Boolean(user);
    $("join").hidden = Boolean(user);
    $("name-help").hidden = Boolean(user);
    $("leave").hidden = !user;
    $("comment-text").disabled = !user;
    $("post").disabled = !user;
    $("comment-text").placeholder = user ? `Say something, ${user}` : "Join the lobby to post";
    for (const meme of document.querySelectorAll(".meme")) meme.disabled = !user;
    renderMembers();
  }

  function join(event) {
    event.preventDefault();
    const input = $("name");
    const name = input.value.trim();
    if (!USER_RE.test(name)) {
      input.setAttribute("aria-invalid", "true");
      $("name-error").textContent = "Use 1–24 characters: letters, digits, dot, dash or underscore.";
      input.focus();
      return;
    }
    input.value = name;
    input.removeAttribute("aria-invalid");
    $("name-error").textContent = "";
    storage.set("name", name);
    setJoined(name);
    chatStatus("");
    openStream();
    $("comment-text").focus();
  }

  function leave() {
    setJoined(null);
    openStream();
    $("name").focus();
  }

  // -- the event stream ------------------------------------------------------------

  const stream = {
    source: null,
    sourceOpen: false,
    retiring: new Set(),   // streams replaced by `source`, closed once it is open
    opened: false,         // the first open happened (state has been fetched)
    broken: false,         // an error since the last open
    lastId: null,          // [epoch, seq] of the last applied event
    lastIdText: "",
    reopenTimer: 0,
    reopenDelay: REOPEN_FIRST_MS,
    resumedTimer: 0,
    reconnects: 0,
  };

  function setState(state) {
    const el = $("conn-state");
    if (el.dataset.state === state) return;
    el.dataset.state = state;
    el.querySelector(".conn-text").textContent = STATE_TEXT[state];
    clearTimeout(stream.resumedTimer);
    if (state === "resumed") stream.resumedTimer = setTimeout(() => setState("live"), RESUMED_SHOWN_MS);
  }

  // Rule 2: true when the event is new; it then becomes the position to resume from.
  function fresh(event) {
    const id = parseId(event.lastEventId);
    if (!id) return true;
    if (stream.lastId && !idAfter(id, stream.lastId)) return false;
    stream.lastId = id;
    stream.lastIdText = event.lastEventId;
    $("conn-state").dataset.lastId = event.lastEventId;
    return true;
  }

  const handlers = {
    price_update(event) {
      if (!fresh(event)) return;
      const ticker = parseJSON(event.data);
      const card = cardFor(ticker.symbol);
      card.apply(ticker, true);
      card.node.dataset.lastId = event.lastEventId;
      priceLog.push({ id: event.lastEventId, symbol: ticker.symbol, price: ticker.price });
      if (priceLog.length > MAX_LOG) priceLog.shift();
    },
    members(event) {
      const body = JSON.parse(event.data);
      if (body.room !== ROOM || !chat.user) return;
      chat.members = new Set(body.users);
      renderMembers();
    },
    user_joined(event) {
      if (!fresh(event) || !chat.user) return;
      chat.members.add(JSON.parse(event.data).user);
      renderMembers();
    },
    user_left(event) {
      if (!fresh(event) || !chat.user) return;
      const user = JSON.parse(event.data).user;
      if (user !== chat.user) chat.members.delete(user);
      renderMembers();
    },
    comment_posted(event) {
      if (!fresh(event)) return;
      addComment(JSON.parse(event.data));
    },
    comment_deleted(event) {
      if (!fresh(event)) return;
      removeComment(JSON.parse(event.data).id, true);
    },
    reset(event) {
      // The server could not replay what we missed on these topics: fetch their state anew.
      const body = JSON.parse(event.data);
      for (const topic of body.topics) {
        if (topic === ROOM_TOPIC) loadComments();
        const card = topic.startsWith("ticker:") && cards.get(topic.slice(7));
        if (card) card.reload();
      }
      pollSymbols();
    },
  };

  function streamUrl() {
    const query = new URLSearchParams();
    for (const topic of [...tickerTopics(), ROOM_TOPIC]) query.append("topic", topic);
    if (chat.user) query.set("user", chat.user);
    if (stream.lastIdText) query.set("lastEventId", stream.lastIdText);
    return "/events?" + query;
  }

  // Rule 1: (re)open the one stream on the current topics, resuming after the last event.
  // The stream it replaces keeps delivering until the new one is open (make before break),
  // so a user who is present stays present and no event falls between the two.
  function openStream() {
    clearTimeout(stream.reopenTimer);
    if (stream.source && stream.source.readyState !== EventSource.CLOSED) stream.retiring.add(stream.source);
    const source = new EventSource(streamUrl());
    stream.source = source;
    stream.sourceOpen = false;
    source.onopen = () => {
      if (source !== stream.source) return;
      stream.sourceOpen = true;
      retire();
      stream.reopenDelay = REOPEN_FIRST_MS;
      if (stream.broken) {
        stream.broken = false;
        stream.reconnects += 1;
        $("conn-state").dataset.reconnects = String(stream.reconnects);
        setState("resumed");
      } else if ($("conn-state").dataset.state !== "resumed") {
        setState("live");
      }
      streamOpened();
    };
    source.onerror = () => {
      if (source !== stream.source) return;
      retire();
      stream.broken = true;
      setState("reconnecting");
      // A refused answer (not 200) ends an EventSource for good: start another one.
      if (source.readyState === EventSource.CLOSED) {
        const delay = stream.reopenDelay * (1 + Math.random() * 0.5);
        stream.reopenDelay = Math.min(stream.reopenDelay * 2, REOPEN_MAX_MS);
        stream.reopenTimer = setTimeout(openStream, delay);
      }
    };
    for (const [name, handle] of Object.entries(handlers)) {
      source.addEventListener(name, (event) => {
        if (source === stream.source || (!stream.sourceOpen && stream.retiring.has(source))) handle(event);
      });
    }
  }

  function retire() {
    for (const old of stream.retiring) old.close();
    stream.retiring.clear();
  }

  function streamOpened() {
    if (!stream.opened) {
      stream.opened = true;
      for (const card of cards.values()) card.load(card.window);
      loadComments();
    }
    pollSymbols();
  }

  // -- start -------------------------------------------------------------------------

  async function start() {
    $("join-form").addEventListener("submit", join);
    $("leave").addEventListener("click", leave);
    $("post-form").addEventListener("submit", (event) => {
      event.preventDefault();
      postComment();
    });
    $("comment-text").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        postComment();
      }
    });
    $("name").addEventListener("input", () => {
      $("name").removeAttribute("aria-invalid");
      $("name-error").textContent = "";
    });
    for (const meme of document.querySelectorAll(".meme")) {
      meme.addEventListener("click", () => {
        const box = $("comment-text");
        box.value = (box.value.trim() + " " + meme.dataset.meme).trim();
        box.focus();
      });
    }
    const savedName = storage.get("name", "");
    if (typeof savedName === "string" && USER_RE.test(savedName)) {
      $("name").value = savedName;
      setJoined(storage.get("joined", false) ? savedName : null);
    } else {
      setJoined(null);
    }
    updateCommentCount();

    try {
      const body = await getJSON("/symbols");
      for (const ticker of body.symbols) cardFor(ticker.symbol).apply(ticker, false);
    } catch (_) {
      // the stream's first open polls again
    }
    openStream();
    setInterval(() => {
      if (!document.hidden && !stream.broken) pollSymbols();
    }, SYMBOLS_POLL_MS);
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && !stream.broken) pollSymbols();
    });
  }

  // A read-only view for people (and tests) checking what the page received.
  window.monkestream = Object.freeze({
    prices: (symbol) => priceLog.filter((e) => !symbol || e.symbol === symbol).map((e) => ({ ...e })),
    lastEventId: () => stream.lastIdText,
  });

  start();
})();
