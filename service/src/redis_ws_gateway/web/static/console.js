// The live console served at "/". Everything it knows comes through
// GatewayClient, the same module a React UI imports.
//
// Messages only update plain objects; the DOM is written once per animation
// frame, touching only rows that changed, so a 1,000 msg/s stream costs a few
// text-node writes per frame instead of one layout per message.

import { GatewayClient } from "./client.js";

const LOG_LIMIT = 500;
const VALUE_CHARS = 160;
const LOG_DATA_CHARS = 240;
const TICK_MS = 500;

const $ = (id) => document.getElementById(id);

/** Events per second over a sliding window of fixed-width buckets. */
class RateMeter {
  constructor(windowMs = 5000, buckets = 20) {
    this.width = windowMs / buckets;
    this.counts = new Float64Array(buckets);
    this.head = 0;
    this.headStart = 0;
    this.windowMs = windowMs;
    this.startedAt = null;
  }

  _advance(now) {
    if (this.startedAt === null) {
      this.startedAt = now;
      this.headStart = now;
      return;
    }
    const steps = Math.floor((now - this.headStart) / this.width);
    if (steps <= 0) return;
    const n = this.counts.length;
    for (let i = 0; i < Math.min(steps, n); i++) {
      this.head = (this.head + 1) % n;
      this.counts[this.head] = 0;
    }
    this.headStart += steps * this.width;
  }

  add(now, n = 1) {
    this._advance(now);
    this.counts[this.head] += n;
  }

  rate(now) {
    if (this.startedAt === null) return 0;
    this._advance(now);
    let sum = 0;
    for (const c of this.counts) sum += c;
    // A young meter divides by what it has seen, not by the whole window.
    const span = Math.min(this.windowMs, Math.max(now - this.startedAt, 1000));
    return (sum * 1000) / span;
  }
}

const view = {
  client: null,
  wanted: [], // names in the order the user added them
  offs: new Map(), // name -> unsubscribe function of the current client
  errors: new Map(), // name -> refusal message
  rows: new Map(), // channel (+ pattern) -> row state
  sortedKeys: [], // keys of rows that have a <tr>, in table order
  dirtyRows: new Set(),
  pendingLog: [],
  total: 0,
  gaps: 0,
  reconnectsBefore: 0,
  meter: new RateMeter(),
  paused: false,
  lost: new Set(),
  subsDirty: true,
  statsDirty: true,
  scheduled: false,
  connState: { state: "idle", info: {} },
};

// --- formatting -----------------------------------------------------------------

function clip(text, max) {
  return text.length > max ? `${text.slice(0, max - 1)}…` : text;
}

function formatData(data, encoding, max) {
  if (encoding === "base64") return clip(`base64 ${data}`, max);
  if (typeof data === "string") return clip(data, max);
  return clip(JSON.stringify(data), max);
}

function formatRate(rate) {
  return rate >= 100 ? rate.toFixed(0) : rate.toFixed(1);
}

function formatCount(n) {
  return n.toLocaleString("en-US");
}

function clock(ms) {
  const d = new Date(ms);
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// --- client events ------------------------------------------------------------------

function onMessage(data, msg) {
  const now = performance.now();
  view.total += 1;
  view.meter.add(now);
  const rowKey = msg.pattern === undefined ? msg.channel : `${msg.channel}\u0000${msg.pattern}`;
  let row = view.rows.get(rowKey);
  if (row === undefined) {
    row = {
      key: rowKey,
      channel: msg.channel,
      via: msg.pattern,
      count: 0,
      meter: new RateMeter(),
      tr: null,
      cells: null,
    };
    view.rows.set(rowKey, row);
  }
  row.count += 1;
  row.meter.add(now);
  row.data = data;
  row.encoding = msg.encoding;
  row.seq = msg.seq;
  row.at = Date.now();
  row.gap = msg.gap !== undefined;
  view.dirtyRows.add(row);
  if (!view.paused) {
    view.pendingLog.push({
      kind: msg.gap === undefined ? "msg" : "msg gap",
      at: row.at,
      channel: msg.channel,
      via: msg.pattern,
      seq: msg.seq,
      data,
      encoding: msg.encoding,
      gap: msg.gap,
    });
    // Only the newest LOG_LIMIT can ever be shown; a hidden tab (no
    // animation frames) must not grow this without bound.
    if (view.pendingLog.length > LOG_LIMIT * 2) view.pendingLog.splice(0, view.pendingLog.length - LOG_LIMIT);
  }
  schedule();
}

function logEvent(kind, text) {
  view.pendingLog.push({ kind, at: Date.now(), text });
  schedule();
}

function describeState({ state, info }) {
  switch (state) {
    case "open":
      return "connected";
    case "connecting":
      return "connecting…";
    case "reconnecting":
      if (info.delayMs !== undefined) {
        const code = info.code !== undefined ? ` after close ${info.code}` : "";
        return `reconnecting in ${(info.delayMs / 1000).toFixed(1)} s${code}`;
      }
      return "reconnecting…";
    case "closed":
      return "disconnected";
    default:
      return "not connected";
  }
}

function onState(state, info) {
  view.connState = { state, info };
  if (state === "open") {
    view.lost.clear();
    logEvent("event", "connected");
  } else if (state === "reconnecting" && info.delayMs !== undefined) {
    const reason = info.reason ? ` (${info.reason})` : "";
    logEvent("event", `connection closed${info.code !== undefined ? ` with ${info.code}` : ""}${reason}; reconnecting`);
  }
  view.subsDirty = true;
  view.statsDirty = true;
  schedule();
}

function onGap(gap) {
  view.gaps += 1;
  view.statsDirty = true;
  schedule();
}

function onUpstreamLost({ keys }) {
  for (const key of keys) view.lost.add(key);
  logEvent("warn", `upstream lost for ${keys.length} subscription${keys.length === 1 ? "" : "s"}`);
  view.subsDirty = true;
}

function onResubscribed({ subscriptions }) {
  for (const s of subscriptions) if (s.live) view.lost.delete(s.key);
  const names = subscriptions.map((s) => s.key).join(", ");
  logEvent("event", `resubscribed: ${names} (new epoch, messages may have been missed)`);
  view.subsDirty = true;
}

function onError(error, context) {
  const where = context && context.key ? `${context.key}: ` : "";
  logEvent("error", `${where}${error.code ? `[${error.code}] ` : ""}${error.message || error}`);
}

// --- actions ------------------------------------------------------------------------

function defaultUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/ws`;
}

function attach(name) {
  const off = view.client.subscribe(name, onMessage);
  view.offs.set(name, off);
  view.errors.delete(name);
  off.ready.then(
    () => {
      view.subsDirty = true;
      schedule();
    },
    (error) => {
      if (view.offs.get(name) !== off) return;
      view.offs.delete(name);
      view.errors.set(name, error.code || "refused");
      view.subsDirty = true;
      schedule();
    },
  );
}

function connect() {
  const url = $("url-input").value.trim() || defaultUrl();
  const token = $("token-input").value;
  if (view.client !== null) {
    view.reconnectsBefore += view.client.stats.reconnects;
    view.client.close();
  }
  view.offs.clear();
  view.lost.clear();
  view.client = new GatewayClient(url, {
    token: token || undefined,
    onState,
    onGap,
    onUpstreamLost,
    onResubscribed,
    onError,
  });
  for (const name of view.wanted) attach(name);
  view.client.connect().catch(() => {});
  $("disconnect-btn").disabled = false;
  view.subsDirty = true;
  schedule();
}

function disconnect() {
  if (view.client === null) return;
  view.client.close();
  $("disconnect-btn").disabled = true;
}

function addSubscriptions(text) {
  const names = text.split(",").map((s) => s.trim()).filter(Boolean);
  for (const name of names) {
    if (!view.wanted.includes(name)) view.wanted.push(name);
    if (view.client !== null && !view.offs.has(name)) attach(name);
  }
  view.subsDirty = true;
  schedule();
}

function removeSubscription(name) {
  view.wanted = view.wanted.filter((n) => n !== name);
  const off = view.offs.get(name);
  view.offs.delete(name);
  view.errors.delete(name);
  view.lost.delete(name);
  if (off) off();
  view.subsDirty = true;
  schedule();
}

// --- rendering ------------------------------------------------------------------------

function schedule() {
  if (view.scheduled) return;
  view.scheduled = true;
  requestAnimationFrame(render);
}

function render() {
  view.scheduled = false;
  const now = performance.now();
  renderConnection();
  // Subscriptions show their last seq, so messages redraw them too.
  if (view.subsDirty || view.dirtyRows.size) renderSubscriptions();
  if (view.dirtyRows.size) renderRows(now);
  if (view.pendingLog.length) renderLog();
  renderStats(now);
}

function renderConnection() {
  const box = $("conn-state");
  const { state } = view.connState;
  if (box.dataset.state !== state) box.dataset.state = state;
  const label = describeState(view.connState);
  const node = $("conn-label");
  if (node.textContent !== label) node.textContent = label;
  const banner = $("upstream-banner");
  const lost = view.lost.size > 0;
  if (banner.hidden === lost) banner.hidden = !lost;
  if (lost) {
    const names = [...view.lost].slice(0, 4).join(", ");
    const more = view.lost.size > 4 ? ` and ${view.lost.size - 4} more` : "";
    $("upstream-text").textContent =
      `The gateway is reconnecting to Redis (${names}${more}); messages published meanwhile are not delivered.`;
  }
}

function subscriptionStatus(name, states) {
  if (view.errors.has(name)) return { status: "failed", detail: view.errors.get(name) };
  const s = states.get(name);
  if (s === undefined) return { status: "pending", detail: "" };
  if (view.lost.has(name)) return { status: "waiting", detail: "upstream lost" };
  const detail = s.epoch ? `epoch ${s.epoch} · seq ${s.lastSeq ?? 0}` : "";
  return { status: view.client && view.client.state === "open" ? s.status : "pending", detail };
}

function subscriptionItem(name) {
  const li = el("li", "sub");
  li.dataset.key = name;
  const main = el("div", "sub-main");
  const kind = /[*?[]/.test(name) ? "pattern" : "channel";
  main.append(el("span", `badge badge-${kind}`, kind === "pattern" ? "PSUB" : "SUB"));
  main.append(el("span", "sub-name", name));
  const meta = el("div", "sub-meta");
  const status = el("span", "status");
  const detail = el("span", "sub-detail");
  meta.append(status, detail);
  const button = el("button", "btn-icon", "×");
  button.type = "button";
  button.title = `Unsubscribe ${name}`;
  button.setAttribute("aria-label", `Unsubscribe ${name}`);
  button.dataset.unsubscribe = name;
  li.append(main, meta, button);
  return { li, status, detail };
}

// Items are updated in place: rebuilding them on every tick would swallow
// clicks that land between mousedown and mouseup.
const subItems = new Map();

function renderSubscriptions() {
  view.subsDirty = false;
  const list = $("subs");
  const states = new Map((view.client ? view.client.subscriptions() : []).map((s) => [s.key, s]));
  for (const [name, item] of subItems) {
    if (!view.wanted.includes(name)) {
      item.li.remove();
      subItems.delete(name);
    }
  }
  for (const name of view.wanted) {
    let item = subItems.get(name);
    if (item === undefined) {
      item = subscriptionItem(name);
      subItems.set(name, item);
      list.append(item.li);
    }
    const { status, detail } = subscriptionStatus(name, states);
    if (item.li.dataset.status !== status) {
      item.li.dataset.status = status;
      item.status.className = `status status-${status}`;
      item.status.textContent = status;
    }
    if (item.detail.textContent !== detail) item.detail.textContent = detail;
  }
  $("subs-count").textContent = String(view.wanted.length);
  $("subs-empty").hidden = view.wanted.length > 0;
}

function createRow(row) {
  const tr = el("tr");
  tr.dataset.channel = row.channel;
  if (row.via !== undefined) tr.dataset.pattern = row.via;
  const channelCell = el("td", "col-channel");
  channelCell.append(el("div", "channel-name", row.channel));
  if (row.via !== undefined) channelCell.append(el("div", "channel-via", `via ${row.via}`));
  const cells = {
    value: el("td", "col-value value"),
    count: el("td", "col-num count-cell"),
    rate: el("td", "col-num rate-cell"),
    seq: el("td", "col-num seq-cell"),
    time: el("td", "col-time"),
  };
  tr.append(channelCell, cells.value, cells.count, cells.rate, cells.seq, cells.time);
  row.tr = tr;
  row.cells = cells;
  // Sorted by name once, at creation; updates never move rows.
  const keys = view.sortedKeys;
  let lo = 0;
  let hi = keys.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (keys[mid] < row.key) lo = mid + 1;
    else hi = mid;
  }
  const before = lo < keys.length ? view.rows.get(keys[lo]).tr : null;
  keys.splice(lo, 0, row.key);
  $("live").tBodies[0].insertBefore(tr, before);
  $("live-empty").hidden = true;
  $("rows-count").textContent = String(view.rows.size);
}

function renderRows(now) {
  for (const row of view.dirtyRows) {
    if (row.tr === null) createRow(row);
    const c = row.cells;
    c.value.textContent = formatData(row.data, row.encoding, VALUE_CHARS);
    c.count.textContent = formatCount(row.count);
    c.rate.textContent = formatRate(row.meter.rate(now));
    c.seq.textContent = row.seq === undefined ? "" : String(row.seq);
    c.seq.classList.toggle("gap", row.gap);
    c.time.textContent = clock(row.at);
  }
  view.dirtyRows.clear();
}

function logRow(entry) {
  const div = el("div", `log-row ${entry.kind}`);
  div.append(el("span", "log-time", clock(entry.at)));
  if (entry.text !== undefined) {
    div.append(el("span", "log-text", entry.text));
    return div;
  }
  const channel = el("span", "log-channel", entry.channel);
  if (entry.via !== undefined) channel.append(el("span", "log-via", ` ← ${entry.via}`));
  div.append(channel);
  div.append(el("span", "log-seq", entry.seq === undefined ? "" : `#${entry.seq}`));
  const data = el("span", "log-data", formatData(entry.data, entry.encoding, LOG_DATA_CHARS));
  div.append(data);
  if (entry.gap) {
    const missed = entry.gap.missed > 0 ? `${entry.gap.missed} missed` : "out of order";
    div.append(el("span", "gap-note", `gap: expected #${entry.gap.expected} (${missed})`));
    div.title = `seq jumped from ${entry.gap.expected - 1} to ${entry.gap.got}`;
  }
  return div;
}

function renderLog() {
  const log = $("log");
  const entries = view.pendingLog.length > LOG_LIMIT
    ? view.pendingLog.slice(-LOG_LIMIT)
    : view.pendingLog;
  view.pendingLog = [];
  const stick = log.scrollTop < 8;
  const fragment = document.createDocumentFragment();
  for (let i = entries.length - 1; i >= 0; i--) fragment.append(logRow(entries[i]));
  log.prepend(fragment);
  while (log.childElementCount > LOG_LIMIT) log.lastElementChild.remove();
  if (stick) log.scrollTop = 0;
}

function setText(id, text) {
  const node = $(id);
  if (node.textContent !== text) node.textContent = text;
}

function renderStats(now) {
  setText("stat-rate", formatRate(view.meter.rate(now)));
  setText("stat-total", formatCount(view.total));
  setText("stat-gaps", formatCount(view.gaps));
  const reconnects = view.reconnectsBefore + (view.client ? view.client.stats.reconnects : 0);
  setText("stat-reconnects", formatCount(reconnects));
  $("stat-gaps").parentElement.classList.toggle("alert", view.gaps > 0);
}

// Rates decay while nothing arrives, so they are redrawn on a timer too.
function tick() {
  const now = performance.now();
  for (const row of view.rows.values()) {
    if (row.tr !== null) row.cells.rate.textContent = formatRate(row.meter.rate(now));
  }
  view.subsDirty = true;
  schedule();
}

// --- wiring -----------------------------------------------------------------------------

function init() {
  $("url-input").value = defaultUrl();
  $("connect-form").addEventListener("submit", (event) => {
    event.preventDefault();
    connect();
  });
  $("disconnect-btn").addEventListener("click", disconnect);
  $("sub-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = $("sub-input");
    addSubscriptions(input.value);
    input.value = "";
    input.focus();
  });
  $("subs").addEventListener("click", (event) => {
    const button = event.target.closest("[data-unsubscribe]");
    if (button) removeSubscription(button.dataset.unsubscribe);
  });
  $("pause-btn").addEventListener("click", (event) => {
    view.paused = !view.paused;
    event.currentTarget.textContent = view.paused ? "Resume" : "Pause";
    event.currentTarget.setAttribute("aria-pressed", String(view.paused));
  });
  $("clear-log-btn").addEventListener("click", () => {
    view.pendingLog = [];
    $("log").replaceChildren();
  });
  $("clear-live-btn").addEventListener("click", () => {
    view.rows.clear();
    view.sortedKeys = [];
    view.dirtyRows.clear();
    $("live").tBodies[0].replaceChildren();
    $("live-empty").hidden = false;
    $("rows-count").textContent = "0";
  });
  // ?channels=a,b:* subscribes on load, so a link can open the console live.
  const fromUrl = new URLSearchParams(location.search).get("channels");
  if (fromUrl) addSubscriptions(fromUrl);
  setInterval(tick, TICK_MS);
  connect();
}

init();
