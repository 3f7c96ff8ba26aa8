// monkestream's page: a live chart per coin and the lobby chat, fed by one EventSource.
//
// Theory of operation
// 1. One EventSource carries every topic (each symbol's ticker, room:lobby and `symbols`,
//    where the server announces a symbol it sees for the first time). When the topic list
//    or the user changes, it is replaced by a new one that starts with ?lastEventId= of the
//    last event applied, so the server replays the gap; the old one is closed only once
//    the new one is open.
// 2. Events are applied at most once: ids ("EPOCH-SEQ") only grow, so an event whose id
//    is not above the last applied one is a replay already seen.
// 3. State from HTTP (symbols, charts, comments) is fetched after the stream is open, so
//    nothing published between the two is lost; a `reset` event refetches it. New symbols
//    come from the stream (`symbol_added`), never from polling.
// 4. User text only ever reaches the page through textContent.
// 5. Events change state only; the DOM is written once per animation frame, for the cards
//    that changed since the last one, so a flood of prices costs a frame's work, not an
//    event's. Screen readers hear a summary of price moves at most every ANNOUNCE_MS.
"use strict";

(() => {
  const ROOM = "lobby";
  const ROOM_TOPIC = "room:" + ROOM;
  const SYMBOLS_TOPIC = "symbols";
  const USER_RE = /^[A-Za-z0-9._-]{1,24}$/;
  // step: the finest spacing of a chart's points; 1d is finer than the server's 30-minute
  // points because its newest stretch is filled from /history
  const WINDOWS = {
    "5m": { span: 300, step: 5, label: "5 minutes" },
    "1h": { span: 3600, step: 60, label: "hour" },
    "1d": { span: 86400, step: 300, label: "day" },
  };
  const HISTORY_LIMIT = 2000;        // tickers fetched to fill the 1d chart after its last cached point
  const MAX_TICKER_TOPICS = 30;      // the server takes 32 topics per stream: the room and `symbols` too
  const RESUMED_SHOWN_MS = 4000;
  const REOPEN_FIRST_MS = 1000;
  const REOPEN_MAX_MS = 15000;
  const ANNOUNCE_FIRST_MS = 1000;    // a burst of prices is gathered this long before it is announced
  const ANNOUNCE_MS = 10000;         // and announcements are at least this far apart
  const ANNOUNCE_MAX = 3;            // symbols in one announcement
  const TOUCH_READOUT_MS = 3000;
  const CARD_FRAME_MS = 100;         // a card is drawn at most this often
  const CARDS_PER_FRAME = 4;         // and a frame draws at most this many cards
  const FLASH_MS = 1000;             // and flashes a price move at most this often     // the readout stays this long after a finger lifts
  const MAX_COMMENTS = 100;
  const MAX_LOG = 500;
  const MAX_KEYS = 200;
  const STICK_PX = 40;               // a comment list scrolled this close to its end follows new ones
  const STATE_TEXT = {
    connecting: "Connecting…",
    live: "Live",
    reconnecting: "Reconnecting…",
    resumed: "Resumed",
  };
  const SVG_NS = "http://www.w3.org/2000/svg";
  // chart geometry, in CSS pixels
  const PAD_TOP = 10;
  const X_AXIS_H = 20;
  const Y_TICK_PX = 34;              // at least this far apart
  const X_TICK_GAP_PX = 8;           // at least this between time labels
  const TIME_STEPS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400];

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

  // A decimal's own digits without an exponent ("1E-8" -> "0.00000001"), never through a float.
  function plainDecimal(text) {
    const m = /^([+-]?)(\d*)(?:\.(\d*))?[eE]([+-]?\d+)$/.exec(text);
    if (!m) return text;
    const digits = (m[2] + (m[3] || "")).replace(/^0+(?=\d)/, "");
    const point = m[2].length + Number(m[4]);
    let out;
    if (point <= 0) out = "0." + "0".repeat(-point) + digits;
    else if (point >= digits.length) out = digits + "0".repeat(point - digits.length);
    else out = digits.slice(0, point) + "." + digits.slice(point);
    return m[1] + out.replace(/^0+(?=\d)/, "");
  }

  function group(whole) {
    return whole.replace(/\B(?=(\d{3})+(?!\d))/g, ",");
  }

  // Every digit of the price, the whole part grouped by thousands.
  function formatPrice(text) {
    const [whole, frac] = plainDecimal(String(text)).split(".");
    return frac === undefined ? group(whole) : group(whole) + "." + frac;
  }

  // A scale label: as many decimals as the tick step needs.
  function formatTick(value, step) {
    if (Math.abs(value) >= 1e15) return value.toExponential(Math.min(8, Math.max(2, Math.ceil(Math.log10(Math.abs(value) / step)))));
    const decimals = Math.min(12, Math.max(0, Math.ceil(-Math.log10(step) - 1e-9)));
    const [whole, frac] = Math.abs(value).toFixed(decimals).split(".");
    const sign = value < 0 ? "-" : "";
    return sign + (frac === undefined ? group(whole) : group(whole) + "." + frac);
  }

  const clock = new Intl.DateTimeFormat([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23" });
  const clockShort = new Intl.DateTimeFormat([], { hour: "2-digit", minute: "2-digit", hourCycle: "h23" });

  // The width of a chart label as drawn (11px, the page's font), for laying out the scales.
  const measurer = document.createElement("canvas").getContext("2d");
  let labelFont = "";
  const widths = new Map();          // label -> width: labels repeat from frame to frame
  function labelWidth(label, bold = false) {
    const key = (bold ? "b" : "") + label;
    let width = widths.get(key);
    if (width === undefined) {
      if (!labelFont) labelFont = "11px " + getComputedStyle(document.body).fontFamily;
      measurer.font = (bold ? "650 " : "") + labelFont;
      width = measurer.measureText(label).width;
      if (widths.size > 2000) widths.clear();
      widths.set(key, width);
    }
    return width;
  }

  function formatTime(seconds, withSeconds = true) {
    return (withSeconds ? clock : clockShort).format(seconds * 1000);
  }

  async function getJSON(url) {
    const response = await fetch(url, { headers: { Accept: "application/json" } });
    if (!response.ok) throw new Error(`${url}: ${response.status}`);
    return parseJSON(await response.text());
  }

  const storage = {
    get(key, fallback, store = localStorage) {
      try {
        const text = store.getItem("monkestream." + key);
        return text === null ? fallback : JSON.parse(text);
      } catch (_) {
        return fallback;
      }
    },
    set(key, value, store = localStorage) {
      try {
        store.setItem("monkestream." + key, JSON.stringify(value));
      } catch (_) {
        // storage full or disabled: the page still works for this visit
      }
    },
  };

  function svgEl(name, attrs) {
    const el = document.createElementNS(SVG_NS, name);
    for (const [key, value] of Object.entries(attrs || {})) el.setAttribute(key, value);
    return el;
  }

  // Set an attribute only when it changes: most frames change few of them.
  function attr(el, name, value) {
    const text = String(value);
    if (el.getAttribute(name) !== text) el.setAttribute(name, text);
  }

  function setText(el, value) {
    if (el.textContent !== value) el.textContent = value;
  }

  // Round steps for a scale: 1, 2 or 5 times a power of ten, about `span / count` apart.
  function niceStep(span, count) {
    const raw = span / Math.max(1, count);
    const power = 10 ** Math.floor(Math.log10(raw));
    for (const m of [1, 2, 5, 10]) if (m * power >= raw) return m * power;
    return 10 * power;
  }

  // Time ticks on round local times: the smallest step whose labels fit in `width` pixels.
  function timeTicks(t0, t1, width) {
    const span = Math.max(1, t1 - t0);
    const fits = (s) => (width * s) / span >= labelWidth(formatTime(t1, s < 60)) + X_TICK_GAP_PX;
    const step = TIME_STEPS.find(fits) || TIME_STEPS[TIME_STEPS.length - 1];
    const offset = -new Date(t1 * 1000).getTimezoneOffset() * 60;
    const ticks = [];
    for (let t = Math.ceil((t0 + offset) / step) * step - offset; t <= t1; t += step) ticks.push(t);
    return { step, ticks };
  }

  // -- rendering, batched to animation frames (Rule 5) -----------------------------

  const dirty = new Set();
  const stats = { events: 0, frames: 0, renders: 0 };
  let frameRequested = false;

  function schedule(card) {
    dirty.add(card);
    if (!frameRequested) {
      frameRequested = true;
      requestAnimationFrame(frame);
    }
  }

  // Each frame draws a few of the cards that changed, each at most every CARD_FRAME_MS: under
  // a flood a card shows up to ten prices a second, the newest each time, and frames stay short.
  function frame(now) {
    frameRequested = false;
    stats.frames += 1;
    let drawn = 0;
    for (const card of dirty) {   // oldest change first: a Set keeps insertion order
      if (drawn >= CARDS_PER_FRAME) break;
      if (now - card.renderedAt < CARD_FRAME_MS) continue;
      drawn += 1;
      card.renderedAt = now;
      dirty.delete(card);
      stats.renders += 1;
      card.render();
    }
    if (dirty.size && !frameRequested) {
      frameRequested = true;
      requestAnimationFrame(frame);
    }
  }

  // -- announcing prices politely ---------------------------------------------------

  const announcer = { pending: new Map(), said: new Map(), timer: 0, last: 0 };

  function notePrice(card) {
    announcer.pending.set(card.symbol, card);
    if (announcer.timer) return;
    const wait = Math.max(ANNOUNCE_FIRST_MS, announcer.last + ANNOUNCE_MS - Date.now());
    announcer.timer = setTimeout(announce, wait);
  }

  // One sentence for the few biggest moves since they were last said; the focused card first.
  function announce() {
    announcer.timer = 0;
    announcer.last = Date.now();
    const focused = document.activeElement && document.activeElement.closest && document.activeElement.closest(".card");
    const moves = [];
    for (const card of announcer.pending.values()) {
      if (!card.latest) continue;
      const before = announcer.said.get(card.symbol);
      const pct = before ? ((card.latest.value - before) / before) * 100 : 0;
      moves.push({ card, pct, first: card.node === focused });
    }
    announcer.pending.clear();
    moves.sort((a, b) => (b.first - a.first) || (Math.abs(b.pct) - Math.abs(a.pct)));
    const parts = moves.slice(0, ANNOUNCE_MAX).map(({ card, pct }) => {
      announcer.said.set(card.symbol, card.latest.value);
      const way = pct > 0 ? `up ${pct.toFixed(2)}%` : pct < 0 ? `down ${Math.abs(pct).toFixed(2)}%` : "";
      return `${card.symbol} ${formatPrice(card.latest.price)}${way ? ", " + way : ""}`;
    });
    if (parts.length) $("price-announcer").textContent = parts.join(". ") + ".";
  }

  // -- price cards ------------------------------------------------------------------

  const cards = new Map();
  const priceLog = [];

  const resizes = new ResizeObserver((entries) => {
    for (const entry of entries) {
      const card = cards.get(entry.target.dataset.symbol);
      if (!card) continue;
      card.size = [entry.contentRect.width, entry.contentRect.height];
      schedule(card);
    }
  });

  function toPoint(p) {
    return { t: p.t, price: p.price, value: Number(p.price) };
  }

  // The index of the point nearest to time t (points ordered by t).
  function nearest(points, t) {
    let lo = 0;
    let hi = points.length - 1;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (points[mid].t < t) lo = mid + 1;
      else hi = mid;
    }
    return lo > 0 && t - points[lo - 1].t < points[lo].t - t ? lo - 1 : lo;
  }

  // Keep a group's children in step with `items`, creating or removing as few as possible.
  function syncChildren(group, tag, items, apply) {
    const nodes = group.children;
    while (nodes.length < items.length) group.append(svgEl(tag));
    while (nodes.length > items.length) group.lastChild.remove();
    items.forEach((item, i) => apply(nodes[i], item));
  }

  class Card {
    constructor(symbol) {
      this.symbol = symbol;
      this.window = "5m";
      this.series = {};        // window -> [{t, price, value}] once loaded
      this.generation = {};    // window -> fetch counter, so a stale answer is dropped
      this.latest = null;      // {t, price, value}
      this.drawn = null;       // the latest price as last rendered
      this.currency = "";
      this.updates = 0;
      this.lastId = "";
      this.points = [];        // what the chart shows, oldest first
      this.geo = null;         // the chart's scales, for the pointer
      this.cursor = null;      // {t, keyboard}: where the crosshair is, or null
      this.touchTimer = 0;
      this.size = null;        // the chart's [width, height] in CSS pixels
      this.renderedAt = -Infinity;
      this.flashedAt = -Infinity;
      this.chars = 0;
      const node = $("card-template").content.firstElementChild.cloneNode(true);
      this.node = node;
      this.svg = node.querySelector("svg");
      this.chart = node.querySelector(".chart");
      this.chart.dataset.symbol = symbol;
      this.parts = {};
      for (const el of node.querySelectorAll("[data-role]")) this.parts[el.dataset.role] = el;
      this.g = {};
      for (const cls of ["grid", "area", "line", "dot", "y-axis", "x-axis", "last-price", "last-line", "last-tag",
        "last-text", "cross", "cross-x", "cross-y", "cross-dot"]) {
        this.g[cls] = this.svg.querySelector("." + cls);
      }
      node.dataset.symbol = symbol;
      node.setAttribute("aria-label", symbol + " price");
      this.parts.symbol.textContent = symbol;
      node.querySelector(".windows").setAttribute("aria-label", symbol + " chart window");
      for (const button of node.querySelectorAll(".windows button")) {
        button.addEventListener("click", () => this.show(button.dataset.window));
      }
      const svg = this.svg;
      svg.addEventListener("pointermove", (e) => this.pointAt(e));
      svg.addEventListener("pointerdown", (e) => this.pointAt(e));
      svg.addEventListener("pointerleave", (e) => {
        if (e.pointerType === "mouse" && this.cursor && !this.cursor.keyboard) this.setCursor(null);
      });
      const lifted = (e) => {
        if (e.pointerType === "mouse") return;
        clearTimeout(this.touchTimer);
        this.touchTimer = setTimeout(() => this.setCursor(null), TOUCH_READOUT_MS);
      };
      svg.addEventListener("pointerup", lifted);
      svg.addEventListener("pointercancel", lifted);
      svg.addEventListener("keydown", (e) => this.key(e));
      svg.addEventListener("blur", () => {
        if (this.cursor && this.cursor.keyboard) this.setCursor(null);
      });
      this.setLoading(true);
      resizes.observe(this.chart);
    }

    // A price: from the stream (counted) or from a snapshot (only if newer). State only (Rule 5).
    apply(ticker, fromStream) {
      const point = toPoint({ t: ticker.createdAt, price: ticker.price });
      if (!fromStream && this.latest && point.t <= this.latest.t) return;
      // moves are announced from the price the page had before the first one
      if (this.latest && !announcer.said.has(this.symbol)) announcer.said.set(this.symbol, this.latest.value);
      this.latest = point;
      this.currency = ticker.currency || "";
      if (fromStream) {
        this.updates += 1;
        notePrice(this);
      }
      for (const name of Object.keys(this.series)) this.append(name, point);
      schedule(this);
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
      this.cursor = null;
      for (const button of this.node.querySelectorAll(".windows button")) {
        button.setAttribute("aria-pressed", String(button.dataset.window === name));
      }
      if (this.series[name]) schedule(this);
      else this.load(name);
    }

    // The shown chart, and the 1d one in the background, so that it is full when asked for.
    loadAll() {
      this.load(this.window);
      if (this.window !== "1d" && !this.series["1d"]) this.load("1d");
    }

    async load(name) {
      const generation = (this.generation[name] || 0) + 1;
      this.generation[name] = generation;
      if (name === this.window) this.setLoading(true);
      const base = `/ticker/${encodeURIComponent(this.symbol)}`;
      let series;
      try {
        const body = await getJSON(`${base}/chart?window=${name}`);
        series = body.points.map(toPoint);
        if (name === "1d") {
          // the cache keeps one point per 30 minutes: the day's history fills in between, one
          // point per step (a busy symbol's first HISTORY_LIMIT tickers; the cache's points after)
          const since = Math.floor(Date.now() / 1000) - WINDOWS[name].span;
          const history = await getJSON(`${base}/history?since=${since}&limit=${HISTORY_LIMIT}`);
          const all = [...series, ...history.tickers.map((t) => toPoint({ t: t.createdAt, price: t.price }))];
          all.sort((a, b) => a.t - b.t);
          series = [];
          for (const point of all) {
            const end = series[series.length - 1];
            if (!end || point.t - end.t >= WINDOWS[name].step) series.push(point);
          }
        }
      } catch (_) {
        if (this.generation[name] === generation) setTimeout(() => this.retryLoad(name, generation), 2000);
        return;
      }
      if (this.generation[name] !== generation) return;
      this.series[name] = series;
      if (this.latest) this.append(name, this.latest);
      if (name === this.window) schedule(this);
    }

    retryLoad(name, generation) {
      if (this.generation[name] === generation && !this.series[name]) this.load(name);
    }

    // Forget the charts (the server could not replay a gap) and load them again.
    reload() {
      this.series = {};
      this.loadAll();
    }

    setLoading(loading) {
      const state = loading ? "loading" : "ready";
      if (this.chart.dataset.state === state && this.empty) return;
      this.empty = this.empty || this.chart.querySelector(".chart-empty");
      this.chart.dataset.state = state;
      this.empty.textContent = loading ? "Loading the chart…" : "Waiting for points…";
    }

    // -- the crosshair ---------------------------------------------------------------

    pointAt(event) {
      if (!this.geo) return;
      clearTimeout(this.touchTimer);
      const rect = this.svg.getBoundingClientRect();
      this.setCursor({ t: this.geo.timeAt(event.clientX - rect.left), keyboard: false });
    }

    setCursor(cursor) {
      this.cursor = cursor;
      schedule(this);
    }

    key(event) {
      const points = this.points;
      if (event.key === "Escape" && this.cursor) {
        this.setCursor(null);
        event.preventDefault();
        return;
      }
      const moves = { ArrowLeft: -1, ArrowRight: 1, Home: -Infinity, End: Infinity };
      if (!(event.key in moves) || !points.length) return;
      event.preventDefault();
      const last = points.length - 1;
      let i = this.cursor ? nearest(points, this.cursor.t) + moves[event.key] : last;
      if (event.key === "Home") i = 0;
      if (event.key === "End") i = last;
      i = Math.max(0, Math.min(last, i));
      const p = points[i];
      this.setCursor({ t: p.t, keyboard: true });
      this.parts.cursor.textContent = `${formatTime(p.t)}, ${formatPrice(p.price)} ${this.currency}`;
    }

    // -- drawing, once per frame at most (Rule 5) ------------------------------------

    render() {
      const node = this.node;
      const latest = this.latest;
      if (latest && this.drawn !== latest) {
        if (this.drawn && this.drawn.value !== latest.value) {
          const move = latest.value > this.drawn.value ? "up" : "down";
          const now = performance.now();
          if (move !== node.dataset.move || now - this.flashedAt > FLASH_MS) {
            this.flashedAt = now;
            node.dataset.move = move;
            node.classList.toggle("again");   // restarts the flash
          }
        }
        this.drawn = latest;
        const shown = formatPrice(latest.price);
        node.dataset.price = latest.price;
        setText(this.parts.price, shown);
        if (shown.length !== this.chars) {
          this.chars = shown.length;
          this.parts.price.style.setProperty("--chars", String(shown.length));
        }
        setText(this.parts.updated, formatTime(latest.t));
        this.parts.updated.dateTime = new Date(latest.t * 1000).toISOString();
      }
      setText(this.parts.currency, this.currency);
      attr(node, "data-updates", this.updates);
      if (this.lastId) attr(node, "data-last-id", this.lastId);
      this.draw();
    }

    draw() {
      const name = this.window;
      const series = this.series[name];
      if (!series) return;
      const { span, label } = WINDOWS[name];
      const latest = this.latest;
      const newest = Math.max(series.length ? series[series.length - 1].t : 0, latest ? latest.t : 0);
      const points = series.filter((p) => p.t >= newest - span);
      // The live price extends the line until it becomes a point of its own.
      const end = points[points.length - 1];
      if (latest && end && latest.t === end.t) points[points.length - 1] = latest;
      else if (latest && (!end || latest.t > end.t)) points.push(latest);
      this.points = points;

      const svg = this.svg;
      attr(svg, "data-points", series.length);
      attr(svg, "data-window", name);
      this.setLoading(false);
      if (!points.length) {
        this.chart.removeAttribute("data-has-points");
        for (const path of [this.g.area, this.g.line, this.g.dot]) attr(path, "d", "");
        for (const group of [this.g.grid, this.g["y-axis"], this.g["x-axis"]]) group.replaceChildren();
        this.g["last-price"].setAttribute("hidden", "");
        this.showCursor(null);
        attr(svg, "aria-label", `${this.symbol} over the last ${label}: no points yet`);
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
      const low = formatPrice(lowPoint.price);
      const high = formatPrice(highPoint.price);
      setText(this.parts.low, "Low " + low);
      setText(this.parts.high, "High " + high);
      attr(svg, "aria-label", `${this.symbol} over the last ${label}: ${series.length} points, low ${low}, ` +
        `high ${high}. Arrow keys move a crosshair along them.`);
      this.setTrend(points.length > 1 ? [points[0].value, points[points.length - 1].value] : null);

      if (!this.size) this.size = [this.chart.clientWidth, this.chart.clientHeight];
      const [width, height] = this.size;
      if (!width || !height) return;
      attr(svg, "viewBox", `0 0 ${width} ${height}`);

      // the price scale: round ticks over the range, padded
      let lo = lowPoint.value;
      let hi = highPoint.value;
      if (hi - lo <= Math.abs(hi) * 1e-12) {
        const pad = Math.abs(hi) * 0.001 || 1e-8;
        lo -= pad;
        hi += pad;
      } else {
        const pad = (hi - lo) * 0.08;
        lo -= pad;
        hi += pad;
      }
      const plotTop = PAD_TOP;
      const plotH = height - PAD_TOP - X_AXIS_H;
      const yStep = niceStep(hi - lo, Math.max(2, Math.floor(plotH / Y_TICK_PX)));
      const yTicks = [];
      for (let k = Math.ceil(lo / yStep); k * yStep <= hi && yTicks.length < 12; k++) yTicks.push(k * yStep);
      const full = formatPrice(latest ? latest.price : points[points.length - 1].price);
      const lastLabel = full.length <= 14 ? full : formatTick(latest ? latest.value : hi, yStep / 100);
      const labels = yTicks.map((v) => formatTick(v, yStep));
      const axisW = Math.ceil(Math.max(labelWidth(lastLabel, true), ...labels.map((l) => labelWidth(l)))) + 12;
      const plotR = Math.max(40, width - axisW);
      const inset = 4;
      const y = (v) => plotTop + (1 - (v - lo) / (hi - lo)) * plotH;

      // the time axis: the window, or less while the points cover less of it
      const t1 = newest;
      const t0 = Math.min(t1 - 10, Math.max(newest - span, points[0].t));
      const plotW = plotR - 2 * inset;
      const x = (t) => inset + ((t - t0) / (t1 - t0)) * plotW;
      this.geo = { timeAt: (px) => t0 + ((px - inset) / plotW) * (t1 - t0), x, y, plotR, plotTop, plotH };

      const coords = points.map((p) => `${x(p.t).toFixed(1)},${y(p.value).toFixed(1)}`);
      const bottom = (plotTop + plotH).toFixed(1);
      const xStart = x(points[0].t).toFixed(1);
      const xEnd = x(points[points.length - 1].t).toFixed(1);
      attr(this.g.line, "d", points.length > 1 ? "M" + coords.join("L") : "");
      attr(this.g.area, "d", points.length > 1 ? `M${xStart},${bottom}L${coords.join("L")}L${xEnd},${bottom}Z` : "");
      attr(this.g.dot, "d", `M${coords[coords.length - 1]}l0,0`);

      const lastY = Math.max(plotTop, Math.min(plotTop + plotH, y(latest ? latest.value : points[points.length - 1].value)));
      syncChildren(this.g.grid, "line", yTicks, (el, v) => {
        const at = y(v).toFixed(1);
        attr(el, "x1", 0);
        attr(el, "x2", plotR.toFixed(1));
        attr(el, "y1", at);
        attr(el, "y2", at);
      });
      // a scale label hidden under the last price's tag is left out
      const yItems = yTicks.map((v, i) => ({ v, text: labels[i] })).filter((item) => Math.abs(y(item.v) - lastY) > 13);
      syncChildren(this.g["y-axis"], "text", yItems, (el, item) => {
        attr(el, "x", (plotR + 7).toFixed(1));
        attr(el, "y", (y(item.v) + 4).toFixed(1));
        setText(el, item.text);
      });
      const { step: tStep, ticks } = timeTicks(t0, t1, plotW);
      const half = labelWidth(formatTime(t1, tStep < 60)) / 2;
      const shown = ticks.filter((t) => x(t) - half >= 0 && x(t) + half <= width);   // whole labels only
      syncChildren(this.g["x-axis"], "text", shown, (el, t) => {
        const at = x(t);
        attr(el, "x", at.toFixed(1));
        attr(el, "y", height - 5);
        attr(el, "text-anchor", "middle");
        attr(el, "data-t", t);
        setText(el, formatTime(t, tStep < 60));
      });
      const tag = this.g["last-price"];
      tag.removeAttribute("hidden");
      attr(this.g["last-line"], "x1", 0);
      attr(this.g["last-line"], "x2", plotR.toFixed(1));
      attr(this.g["last-line"], "y1", lastY.toFixed(1));
      attr(this.g["last-line"], "y2", lastY.toFixed(1));
      attr(this.g["last-tag"], "x", (plotR + 2).toFixed(1));
      attr(this.g["last-tag"], "y", (lastY - 8).toFixed(1));
      attr(this.g["last-tag"], "width", axisW - 3);
      attr(this.g["last-tag"], "height", 16);
      attr(this.g["last-text"], "x", (plotR + 7).toFixed(1));
      attr(this.g["last-text"], "y", (lastY + 4).toFixed(1));
      setText(this.g["last-text"], lastLabel);
      this.showCursor(this.cursor);
    }

    showCursor(cursor) {
      const cross = this.g.cross;
      const readout = this.parts.readout;
      if (!cursor || !this.points.length || !this.geo) {
        cross.setAttribute("hidden", "");
        readout.hidden = true;
        return;
      }
      const p = this.points[nearest(this.points, cursor.t)];
      const { x, y, plotR, plotTop, plotH } = this.geo;
      const px = x(p.t);
      const py = y(p.value);
      cross.removeAttribute("hidden");
      for (const [el, a] of [[this.g["cross-x"], [px, plotTop, px, plotTop + plotH]], [this.g["cross-y"], [0, py, plotR, py]]]) {
        ["x1", "y1", "x2", "y2"].forEach((name, i) => attr(el, name, a[i].toFixed(1)));
      }
      attr(this.g["cross-dot"], "cx", px.toFixed(1));
      attr(this.g["cross-dot"], "cy", py.toFixed(1));
      setText(this.parts["readout-time"], formatTime(p.t));
      this.parts["readout-time"].dateTime = new Date(p.t * 1000).toISOString();
      setText(this.parts["readout-price"], `${formatPrice(p.price)} ${this.currency}`.trim());
      readout.dataset.t = String(p.t);
      readout.dataset.price = p.price;
      readout.hidden = false;
      // beside the point, on the side with more room, inside the plot
      const w = readout.offsetWidth;
      const left = px > plotR / 2 ? px - w - 10 : px + 10;
      readout.style.left = Math.max(4, Math.min(plotR - w - 4, left)) + "px";
    }

    setTrend(ends) {
      const change = this.parts.change;
      if (!ends || ends[0] === 0) {
        attr(this.node, "data-trend", "flat");
        setText(change, "");
        return;
      }
      const pct = ((ends[1] - ends[0]) / ends[0]) * 100;
      const trend = pct > 0 ? "up" : pct < 0 ? "down" : "flat";
      attr(this.node, "data-trend", trend);
      // the arrow and the word say what the colour says
      const arrow = trend === "up" ? "▲" : trend === "down" ? "▼" : "■";
      setText(change, `${arrow} ${Math.abs(pct).toFixed(2)}% · ${this.window}`);
      attr(change, "aria-label", `${trend === "flat" ? "unchanged" : trend} ${Math.abs(pct).toFixed(2)}% over ${this.window}`);
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
    if (stream.opened) card.loadAll();
    return card;
  }

  function tickerTopics() {
    return [...cards.keys()].sort().slice(0, MAX_TICKER_TOPICS).map((s) => "ticker:" + s);
  }

  let polling = false;

  // Learn every symbol and its last price: at the first open and after a `reset` (Rule 3).
  async function fetchSymbols() {
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
      // offline for now: a reconnection that cannot be replayed brings a `reset`, and us back here
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

  function atBottom(list) {
    return list.scrollHeight - list.scrollTop - list.clientHeight < STICK_PX;
  }

  // A new comment scrolls into view only for a reader at the bottom (or its author);
  // anyone reading further up gets the "new messages" marker instead.
  function addComment(comment, own = false) {
    const known = chat.comments.get(comment.id);
    if (known) {
      markMine(known, comment);   // our own comment, announced by the stream before the POST answered
      if (own) scrollToNewest();
      return;
    }
    const list = $("comments");
    const stick = own || list.hidden || chat.comments.size === 0 || atBottom(list);
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
    else if (next === undefined) {
      const marker = $("new-messages");
      marker.dataset.count = String(Number(marker.dataset.count) + 1);
      marker.hidden = false;
    }
  }

  function scrollToNewest() {
    const list = $("comments");
    list.scrollTop = list.scrollHeight;
    hideMarker();
  }

  function hideMarker() {
    const marker = $("new-messages");
    marker.hidden = true;
    marker.dataset.count = "0";
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
        addComment(body, true);
        box.value = "";
        saveDraft();
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
      stats.events += 1;
      const ticker = parseJSON(event.data);
      const card = cardFor(ticker.symbol);
      card.apply(ticker, true);
      card.lastId = event.lastEventId;
      priceLog.push({ id: event.lastEventId, symbol: ticker.symbol, price: ticker.price });
      if (priceLog.length > MAX_LOG) priceLog.shift();
    },
    symbol_added(event) {
      // a symbol the server has never had: its card now, its prices on the stream that follows
      if (!fresh(event)) return;
      const ticker = parseJSON(event.data);
      const before = tickerTopics().join(",");
      cardFor(ticker.symbol).apply(ticker, false);
      if (tickerTopics().join(",") !== before) openStream();
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
      fetchSymbols();
    },
  };

  function streamUrl() {
    const query = new URLSearchParams();
    for (const topic of [...tickerTopics(), ROOM_TOPIC, SYMBOLS_TOPIC]) query.append("topic", topic);
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
        fetchSymbols();   // announcements made while no stream listened are not kept: look once
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
    if (stream.opened) return;   // later opens resume from the last id: the stream brings what changed
    stream.opened = true;
    for (const card of cards.values()) card.loadAll();
    loadComments();
    fetchSymbols();
  }

  // The composer's text is kept for the tab's life: a reconnect or a reload does not lose it.
  function saveDraft() {
    storage.set("draft", $("comment-text").value, sessionStorage);
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
    const draft = storage.get("draft", "", sessionStorage);
    if (typeof draft === "string") $("comment-text").value = draft;
    $("comment-text").addEventListener("input", saveDraft);
    $("comments").addEventListener("scroll", () => {
      if (atBottom($("comments"))) hideMarker();
    }, { passive: true });
    $("new-messages").addEventListener("click", () => {
      scrollToNewest();
      $("comments").focus();
    });
    $("name").addEventListener("input", () => {
      $("name").removeAttribute("aria-invalid");
      $("name-error").textContent = "";
    });
    for (const meme of document.querySelectorAll(".meme")) {
      meme.addEventListener("click", () => {
        const box = $("comment-text");
        box.value = (box.value.trim() + " " + meme.dataset.meme).trim();
        saveDraft();
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
      // the stream's first open fetches them again
    }
    openStream();
  }

  // A read-only view for people (and tests) checking what the page received.
  window.monkestream = Object.freeze({
    prices: (symbol) => priceLog.filter((e) => !symbol || e.symbol === symbol).map((e) => ({ ...e })),
    lastEventId: () => stream.lastIdText,
    stats: () => ({ ...stats }),
  });

  start();
})();
