/**
 * Browser client for redis-ws-gateway (docs/PROTOCOL.md), as served at
 * /client.js: an ES module with no imports.
 *
 *   import { GatewayClient } from "/client.js";
 *   const client = new GatewayClient("wss://gateway.example/ws", { token });
 *   client.connect();
 *   const off = client.subscribe("market:tick:*", (data, msg) => {});
 *
 * The same client as the npm package @redis-ws-gateway/client 0.1.0; the API is
 * documented in docs/CLIENT.md. Built from clients/js/src by
 * `npm run build:static`: edit the source there, not this file.
 */

// src/wire.ts
var SUBPROTOCOL = "rwg.v1";
var TOKEN_PROTOCOL_PREFIX = "bearer.";
var FROM_START = "0";
var MAX_REQUEST_ID_LENGTH = 128;
var REFUSAL_HEADER = "X-Refusal-Reason";
var PATTERN_CHARS = "*?[";
var ACTIONS = ["auth", "ping", "subscribe", "unsubscribe"];
var FRAME_TYPES = ["authenticated", "data", "error", "pong", "resubscribed", "subscribed", "unsubscribed", "upstream_lost"];
var ErrorCode = {
  BAD_JSON: "bad_json",
  BAD_REQUEST: "bad_request",
  UNKNOWN_ACTION: "unknown_action",
  BAD_CHANNEL: "bad_channel",
  FORBIDDEN: "forbidden",
  TOO_MANY_CHANNELS: "too_many_channels",
  TOO_MANY_WILDCARDS: "too_many_wildcards",
  NOT_SUBSCRIBED: "not_subscribed",
  UNAUTHORIZED: "unauthorized",
  UPSTREAM_UNAVAILABLE: "upstream_unavailable",
  RATE_LIMITED: "rate_limited",
  TOO_LARGE: "too_large",
  NOT_FOUND: "not_found",
  UNAVAILABLE: "unavailable"
};
var ERROR_CODES = {
  "bad_json": "the frame is not JSON, or not a JSON object",
  "bad_request": "a field has the wrong type or is missing",
  "unknown_action": "action is not subscribe, unsubscribe, ping or auth",
  "bad_channel": "a channel name or pattern is not acceptable",
  "forbidden": "the connection's roles may not read that channel",
  "too_many_channels": "the request would exceed the subscriptions per connection",
  "too_many_wildcards": "the request would exceed the patterns per connection",
  "not_subscribed": "unsubscribe names something not subscribed",
  "unauthorized": "authenticate first, or the credential is not valid",
  "upstream_unavailable": "Redis could not be reached in time; retry",
  "rate_limited": "too many messages; the frame was ignored"
};
var TRANSIENT_ERROR_CODES = /* @__PURE__ */ new Set(["rate_limited", "upstream_unavailable"]);
var HTTP_ERROR_CODES = /* @__PURE__ */ new Set(["bad_channel", "bad_json", "bad_request", "forbidden", "not_found", "rate_limited", "too_large", "unauthorized", "unavailable", "upstream_unavailable"]);
var Close = {
  NORMAL: 1e3,
  PROTOCOL_ERROR: 1002,
  ABNORMAL: 1006,
  INVALID_DATA: 1007,
  POLICY: 1008,
  TOO_BIG: 1009,
  SERVER_ERROR: 1011,
  SERVICE_RESTART: 1012,
  ADMIN: 4e3,
  UNAUTHORIZED: 4001,
  SLOW_CONSUMER: 4008,
  RATE_LIMITED: 4029
};
var CLOSE_NAMES = {
  1e3: "normal",
  1002: "protocol_error",
  1006: "abnormal",
  1007: "invalid_data",
  1008: "policy",
  1009: "too_big",
  1011: "server_error",
  1012: "service_restart",
  4e3: "admin",
  4001: "unauthorized",
  4008: "slow_consumer",
  4029: "rate_limited"
};
var FATAL_CLOSE_CODES = /* @__PURE__ */ new Set([1008, 1009]);

// src/errors.ts
var GatewayError = class extends Error {
  constructor(code, message, frame) {
    super(message || code);
    this.name = "GatewayError";
    this.code = code;
    if (frame !== void 0) this.frame = frame;
  }
  /** True for codes that mean "not now" (wire.TRANSIENT_ERROR_CODES). */
  get transient() {
    return TRANSIENT_ERROR_CODES.has(this.code);
  }
  /** Narrows `code`: `if (error.is("forbidden")) ...` */
  is(code) {
    return this.code === code;
  }
};
function isGatewayError(error, code) {
  return error instanceof GatewayError && (code === void 0 || error.code === code);
}

// src/transport.ts
var WS_OPEN = 1;
function socketUrl(url, token) {
  const base = globalThis.location?.href;
  const parsed = new URL(url, base);
  if (parsed.protocol === "http:") parsed.protocol = "ws:";
  else if (parsed.protocol === "https:") parsed.protocol = "wss:";
  if (token) parsed.searchParams.set("token", token);
  return parsed.toString();
}
function webSocketTransport(WebSocketImpl) {
  return (context, handlers) => {
    const Impl = WebSocketImpl ?? globalThis.WebSocket;
    if (Impl === void 0) throw new TypeError("no WebSocket implementation: pass options.WebSocket");
    const url = socketUrl(context.url, context.token);
    const ws = context.protocols === void 0 ? new Impl(url) : new Impl(url, context.protocols);
    let opened = false;
    ws.onopen = () => {
      opened = true;
      handlers.open();
    };
    ws.onmessage = (event) => handlers.message(event.data);
    ws.onclose = (event) => handlers.close({ code: event.code, reason: event.reason, opened });
    ws.onerror = () => {
    };
    return {
      name: "websocket",
      get isOpen() {
        return ws.readyState === WS_OPEN;
      },
      send(frame) {
        ws.send(JSON.stringify(frame));
      },
      close(code, reason) {
        try {
          ws.close(code, reason);
        } catch {
          ws.close();
        }
      }
    };
  };
}
var ES_OPEN = 1;
function sseUrl(url, token, channels) {
  const base = globalThis.location?.href;
  const parsed = new URL(url, base);
  if (parsed.protocol === "ws:") parsed.protocol = "http:";
  else if (parsed.protocol === "wss:") parsed.protocol = "https:";
  if (parsed.pathname.endsWith("/ws")) parsed.pathname = `${parsed.pathname.slice(0, -3)}/sse`;
  else if (!parsed.pathname.endsWith("/sse")) {
    parsed.pathname = `${parsed.pathname.replace(/\/$/, "")}/sse`;
  }
  const names = channels.map((c) => typeof c === "string" ? c : c.channel);
  parsed.searchParams.set("channels", names.join(","));
  for (const c of channels) {
    if (typeof c !== "string" && c.since !== void 0 && c.since !== null) {
      parsed.searchParams.append("since", `${c.channel}@${c.since}`);
    }
  }
  if (token) parsed.searchParams.set("token", token);
  return parsed.toString();
}
function nameOf(c) {
  return typeof c === "string" ? c : c.channel;
}
function sseTransport(EventSourceImpl) {
  return (context, handlers) => {
    const Impl = EventSourceImpl ?? globalThis.EventSource;
    if (Impl === void 0) throw new TypeError("no EventSource implementation");
    const carried = new Set(context.channels.map(nameOf));
    const es = new Impl(sseUrl(context.url, context.token, context.channels));
    let opened = false;
    let closed = false;
    let states = null;
    const refused = /* @__PURE__ */ new Map();
    const waiting = [];
    const deliver = (frame) => handlers.message(JSON.stringify(frame));
    const answer = (requestId, names) => {
      const no = names.find((n) => refused.has(n));
      if (no !== void 0) {
        deliver({ ...refused.get(no), requestId });
        return;
      }
      const subscriptions = names.map((n) => states?.get(n) ?? { channel: n, live: false });
      deliver({ type: "subscribed", requestId, channels: names, subscriptions });
    };
    const finish = (code, reason) => {
      if (closed) return;
      closed = true;
      es.close();
      handlers.close({ code, reason, opened });
    };
    es.onopen = () => {
      if (closed) return;
      opened = true;
      handlers.open();
    };
    es.onmessage = (event) => {
      if (closed || typeof event.data !== "string") return;
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        handlers.message(event.data);
        return;
      }
      if (frame.type === "error" && frame.code === "forbidden" && typeof frame.channel === "string") {
        refused.set(frame.channel, frame);
        const name = frame.channel;
        for (const w of waiting.filter((w2) => w2.names.includes(name))) {
          waiting.splice(waiting.indexOf(w), 1);
          answer(w.requestId, w.names);
        }
        return;
      }
      if (frame.type === "subscribed" && states === null && frame.requestId === void 0) {
        states = /* @__PURE__ */ new Map();
        for (const state of frame.subscriptions ?? []) {
          const key = state.pattern ?? state.channel;
          states.set(key, state);
        }
        for (const w of waiting.splice(0)) answer(w.requestId, w.names);
        return;
      }
      handlers.message(event.data);
    };
    es.onerror = () => finish(1006, "");
    return {
      name: "sse",
      get isOpen() {
        return !closed && es.readyState === ES_OPEN;
      },
      send(frame) {
        if (closed) throw new Error("the stream is closed");
        const requestId = frame.requestId;
        if (frame.action === "subscribe") {
          const names = (frame.channels ?? []).map(nameOf);
          if (names.some((n) => !carried.has(n))) {
            setTimeout(() => finish(1012, "resubscribe"), 0);
            return;
          }
          if (states === null && !names.some((n) => refused.has(n))) {
            waiting.push({ requestId, names });
          } else {
            const reply = () => answer(requestId, names);
            setTimeout(reply, 0);
          }
        } else if (frame.action === "unsubscribe") {
          const names = frame.channels ? frame.channels.map(nameOf) : [...carried];
          setTimeout(() => deliver({ type: "unsubscribed", requestId, channels: names }), 0);
        } else if (frame.action === "ping") {
          setTimeout(() => deliver({ type: "pong", requestId, time: Date.now() }), 0);
        } else {
          const message = `${frame.action} is not available over SSE: reconnect instead`;
          setTimeout(() => deliver({ type: "error", code: "bad_request", message, requestId }), 0);
        }
      },
      close() {
        if (closed) return;
        closed = true;
        es.close();
        setTimeout(() => handlers.close({ code: 1e3, reason: "", opened }), 0);
      }
    };
  };
}

// src/client.ts
var STABLE_AFTER_MS = 5e3;
var QUIET_CODES = /* @__PURE__ */ new Set(["disconnected", "not_connected", "not_subscribed"]);
var PATTERN_RE = new RegExp(`[${PATTERN_CHARS.replace(/[\\\]^-]/g, "\\$&")}]`);
function isPattern(name) {
  return PATTERN_RE.test(name);
}
function backoffDelay(attempt, minDelayMs, maxDelayMs, random = Math.random) {
  const cap = Math.min(maxDelayMs, minDelayMs * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * cap);
}
var GatewayClient = class {
  constructor(url, options = {}) {
    this.state = "idle";
    this.stats = { messages: 0, gaps: 0, reconnects: 0 };
    this._listeners = {
      state: /* @__PURE__ */ new Set(),
      gap: /* @__PURE__ */ new Set(),
      upstreamLost: /* @__PURE__ */ new Set(),
      resubscribed: /* @__PURE__ */ new Set(),
      error: /* @__PURE__ */ new Set(),
      change: /* @__PURE__ */ new Set(),
      fallback: /* @__PURE__ */ new Set()
    };
    this._transportIndex = 0;
    this._subs = /* @__PURE__ */ new Map();
    this._pending = /* @__PURE__ */ new Map();
    this._nextId = 1;
    this._transport = null;
    this._wanted = false;
    this._retrying = false;
    this._attempt = 0;
    this._generation = 0;
    this._retryTimer = null;
    this._stableTimer = void 0;
    this._openWaiters = [];
    this._warned = false;
    this._fallingFrom = null;
    this.url = url;
    this._token = options.token;
    this._protocols = options.protocols;
    const reconnect = options.reconnect || {};
    this._reconnect = options.reconnect !== false;
    this._minDelay = Math.max(0, reconnect.minDelayMs ?? 250);
    this._maxDelay = Math.max(this._minDelay, reconnect.maxDelayMs ?? 1e4);
    this._requestTimeout = options.requestTimeoutMs ?? 1e4;
    this._on = {
      state: options.onState,
      gap: options.onGap,
      upstreamLost: options.onUpstreamLost,
      resubscribed: options.onResubscribed,
      error: options.onError,
      fallback: options.onFallback
    };
    const EventSourceImpl = options.EventSource ?? globalThis.EventSource;
    this._transports = options.transports?.length ? [...options.transports] : [
      webSocketTransport(options.WebSocket),
      ...options.sseFallback !== false && EventSourceImpl !== void 0 ? [sseTransport(EventSourceImpl)] : []
    ];
  }
  /**
   * Listen to an event besides the constructor's callback (several parts of
   * an app, a React provider, may each want the state). Returns the remover.
   */
  on(event, listener) {
    const set = this._listeners[event];
    set.add(listener);
    return () => {
      set.delete(listener);
    };
  }
  // --- connection -------------------------------------------------------------
  /** Start connecting (if not already). Resolves when a connection is open. */
  connect() {
    if (this._isOpen()) return Promise.resolve();
    const opened = new Promise(
      (resolve, reject) => this._openWaiters.push({ resolve, reject })
    );
    if (!this._wanted) {
      this._wanted = true;
      this._attempt = 0;
      this._retrying = false;
      this._transportIndex = 0;
      void this._open();
    } else if (this._retryTimer !== null) {
      clearTimeout(this._retryTimer);
      this._retryTimer = null;
      void this._open();
    }
    return opened;
  }
  /** Close the connection and stop reconnecting. Subscriptions are kept for connect(). */
  close(code = Close.NORMAL, reason = "") {
    this._wanted = false;
    this._generation += 1;
    if (this._retryTimer !== null) clearTimeout(this._retryTimer);
    clearTimeout(this._stableTimer);
    this._retryTimer = null;
    const transport = this._transport;
    this._transport = null;
    if (transport) transport.close(code, reason);
    this._connectionGone();
    const waiters = this._openWaiters.splice(0);
    for (const w of waiters) w.reject(new GatewayError("closed", "client closed"));
    this._setState("closed", { code, reason });
  }
  /** The transport in use ("websocket" or "sse"), or null while not connected. */
  get transport() {
    return this._transport?.name ?? null;
  }
  async _open() {
    const generation = ++this._generation;
    this._setState(this._retrying ? "reconnecting" : "connecting", { attempt: this._attempt });
    let token;
    try {
      token = typeof this._token === "function" ? await this._token() : this._token;
    } catch (error) {
      if (generation !== this._generation) return;
      this._report(error, { during: "connect" });
      this._scheduleReconnect(void 0, "token or URL failed");
      return;
    }
    if (generation !== this._generation || !this._wanted) return;
    const factory = this._transports[this._transportIndex];
    let transport;
    try {
      transport = factory(
        {
          url: this.url,
          token,
          protocols: this._protocols,
          channels: [...this._subs.values()].map(wireName)
        },
        {
          open: () => this._onOpen(transport),
          message: (data) => this._onMessage(transport, data),
          close: (event) => this._onClose(transport, event)
        }
      );
    } catch (error) {
      this._report(error, { during: "connect" });
      this.close();
      return;
    }
    this._transport = transport;
    const from = this._fallingFrom;
    this._fallingFrom = null;
    if (from !== null && from !== transport.name) this._fellBack(from, transport.name);
  }
  _isOpen() {
    return this._transport !== null && this._transport.isOpen;
  }
  _onOpen(transport) {
    if (transport !== this._transport) return;
    if (this._retrying) this.stats.reconnects += 1;
    this._retrying = false;
    clearTimeout(this._stableTimer);
    this._stableTimer = setTimeout(() => {
      this._attempt = 0;
    }, STABLE_AFTER_MS);
    this._setState("open", { transport: transport.name });
    for (const w of this._openWaiters.splice(0)) w.resolve();
    const entries = [...this._subs.values()];
    if (entries.length) void this._subscribeEntries(entries);
  }
  _onClose(transport, event) {
    if (transport !== this._transport) return;
    this._transport = null;
    clearTimeout(this._stableTimer);
    this._connectionGone();
    if (!this._wanted) {
      this._setState("closed", { code: event.code, reason: event.reason });
      return;
    }
    if (FATAL_CLOSE_CODES.has(event.code)) {
      this._wanted = false;
      const name = CLOSE_NAMES[event.code] ?? String(event.code);
      const error = new GatewayError("closed", `closed by the gateway: ${name} ${event.reason}`);
      this._report(error, { during: "connection" });
      for (const w of this._openWaiters.splice(0)) w.reject(error);
      this._setState("closed", { code: event.code, reason: event.reason, fatal: true });
      return;
    }
    if (!event.opened && this._transportIndex + 1 < this._transports.length) {
      this._transportIndex += 1;
      this._fallingFrom = transport.name;
      void this._open();
      return;
    }
    this._transportIndex = 0;
    this._scheduleReconnect(event.code, event.reason);
  }
  _fellBack(from, to) {
    if (!this._warned) {
      this._warned = true;
      const note = to === "sse" ? " (Server-Sent Events: channels fixed per connection)" : "";
      console.warn(
        `GatewayClient: the ${from} connection to ${this.url} never opened; falling back to ${to}${note}`
      );
    }
    this._emit("fallback", { from, to });
  }
  /** Everything tied to one connection ends with it. */
  _connectionGone() {
    const error = new GatewayError("disconnected", "connection closed");
    for (const [id, pending] of this._pending) {
      clearTimeout(pending.timer);
      this._pending.delete(id);
      pending.reject(error);
    }
    for (const entry of this._subs.values()) {
      entry.sent = false;
      entry.requestId = void 0;
      entry.confirmed = false;
      entry.live = false;
      entry.synced = false;
      entry.sawUnsynced = false;
    }
    if (this._subs.size) this._emit("change");
  }
  _scheduleReconnect(code, reason) {
    if (!this._reconnect) {
      this._wanted = false;
      this._setState("closed", { code, reason });
      return;
    }
    if (code === Close.SERVICE_RESTART) this._attempt = 0;
    const delayMs = backoffDelay(this._attempt, this._minDelay, this._maxDelay);
    this._attempt += 1;
    this._retrying = true;
    this._setState("reconnecting", { code, reason, delayMs, attempt: this._attempt });
    if (this._retryTimer !== null) clearTimeout(this._retryTimer);
    this._retryTimer = setTimeout(() => {
      this._retryTimer = null;
      if (this._wanted) void this._open();
    }, delayMs);
  }
  _setState(state, info = {}) {
    if (state === this.state && state !== "reconnecting") return;
    this.state = state;
    this._emit("state", state, info);
  }
  // --- requests ---------------------------------------------------------------
  /** Send `{action, ...fields, requestId}`; resolves with the reply frame. */
  request(action, fields = {}) {
    return this._request(action, fields).reply;
  }
  _request(action, fields) {
    if (!this._isOpen()) {
      const reply2 = Promise.reject(new GatewayError("not_connected", `${action}: not connected`));
      return { requestId: void 0, reply: reply2 };
    }
    const requestId = `r${this._nextId++}`;
    const transport = this._transport;
    const reply = new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(requestId);
        reject(new GatewayError("timeout", `${action}: no reply within ${this._requestTimeout} ms`));
      }, this._requestTimeout);
      this._pending.set(requestId, { resolve, reject, timer });
      try {
        transport.send({ ...fields, action, requestId });
      } catch (error) {
        clearTimeout(timer);
        this._pending.delete(requestId);
        reject(new GatewayError("disconnected", String(error)));
      }
    });
    return { requestId, reply };
  }
  /** Application-level round trip. Resolves with `{ time, rttMs }`. */
  async ping() {
    const started = performance.now();
    const reply = await this.request("ping");
    return { time: reply.time, rttMs: performance.now() - started };
  }
  // --- subscriptions ----------------------------------------------------------
  /**
   * Call `handler(data, msg)` for every message of `name` (a channel or a
   * pattern). Returns a function that removes this handler; it carries a
   * `ready` promise.
   */
  subscribe(name, handler, options = {}) {
    if (typeof name !== "string" || name === "") {
      throw new TypeError("subscribe: name must be a non-empty string");
    }
    if (typeof handler !== "function") throw new TypeError("subscribe: handler must be a function");
    let entry = this._subs.get(name);
    const created = entry === void 0;
    if (entry === void 0) {
      entry = newEntry(name);
      this._subs.set(name, entry);
    }
    if (options.since !== void 0 && options.since !== null && entry.kind === "channel" && !entry.sent && entry.offset === void 0) {
      entry.offset = options.since;
    }
    const registration = { handler };
    entry.handlers.add(registration);
    if (created && this._isOpen()) void this._subscribeEntries([entry]);
    let removed = false;
    const target = entry;
    const unsubscribe = (() => {
      if (removed) return Promise.resolve();
      removed = true;
      return this._removeHandler(target, registration);
    });
    unsubscribe.ready = entry.ready;
    unsubscribe.key = name;
    return unsubscribe;
  }
  /** A snapshot of every subscription, for display. */
  subscriptions() {
    return [...this._subs.values()].map(describe);
  }
  async _subscribeEntries(entries) {
    const transport = this._transport;
    for (const entry of entries) entry.sent = true;
    const channels = entries.map(wireName);
    const { requestId, reply } = this._request("subscribe", { channels });
    for (const entry of entries) entry.requestId = requestId;
    try {
      await reply;
    } catch (caught) {
      const error = caught;
      if (transport !== this._transport || !this._isOpen()) return;
      if (error.code === "timeout") {
        for (const entry2 of entries) this._report(error, { key: entry2.key, action: "subscribe" });
        return;
      }
      const current = entries.filter((entry2) => this._subs.get(entry2.key) === entry2);
      if (TRANSIENT_ERROR_CODES.has(error.code)) {
        const delayMs = this._minDelay + backoffDelay(2, this._minDelay, this._maxDelay);
        setTimeout(() => {
          const still = current.filter((e) => this._subs.get(e.key) === e && !e.confirmed);
          if (transport === this._transport && this._isOpen() && still.length) {
            void this._subscribeEntries(still);
          }
        }, delayMs);
        return;
      }
      if (current.length > 1) {
        for (const entry2 of current) void this._subscribeEntries([entry2]);
        return;
      }
      const entry = current[0];
      if (entry === void 0) return;
      if (error.code === "bad_request" && typeof channels[0] === "object") {
        entry.offset = void 0;
        void this._subscribeEntries([entry]);
        return;
      }
      this._subs.delete(entry.key);
      entry.failed = true;
      entry.rejectReady(error);
      this._emit("change");
      this._report(error, { key: entry.key, action: "subscribe" });
    }
  }
  _removeHandler(entry, registration) {
    entry.handlers.delete(registration);
    if (entry.handlers.size > 0 || this._subs.get(entry.key) !== entry) return Promise.resolve();
    this._subs.delete(entry.key);
    if (!entry.sent || !this._isOpen()) return Promise.resolve();
    return this.request("unsubscribe", { channels: [entry.key] }).then(
      () => void 0,
      (error) => this._report(error, { key: entry.key, action: "unsubscribe" })
    );
  }
  // --- frames -------------------------------------------------------------------
  _onMessage(transport, data) {
    if (transport !== this._transport) return;
    if (typeof data !== "string") {
      this._report(new GatewayError("bad_frame", "binary frame from server"), {});
      return;
    }
    let frame;
    try {
      frame = JSON.parse(data);
    } catch (error) {
      this._report(new GatewayError("bad_frame", `invalid JSON from server: ${error}`), {});
      return;
    }
    if (frame === null || typeof frame !== "object") return;
    this._onFrame(frame);
  }
  /**
   * Handle one parsed server frame. Public for tests and for feeding frames
   * from another transport; it changes subscription state as a real frame would.
   * @internal
   */
  _onFrame(frame) {
    switch (frame.type) {
      case "data":
        this._onData(frame);
        return;
      case "subscribed":
        this._applyStates(frame.subscriptions, frame.requestId);
        break;
      case "resubscribed": {
        const subscriptions = this._applyStates(frame.subscriptions, void 0);
        this._emit("resubscribed", { subscriptions, frame });
        break;
      }
      case "unsubscribed":
        if (frame.requestId === void 0) this._onDropped(frame);
        break;
      case "upstream_lost": {
        const keys = [];
        for (const state of frame.subscriptions ?? []) {
          const key = state.pattern ?? state.channel;
          const entry = this._subs.get(key);
          if (entry === void 0) continue;
          entry.live = false;
          entry.synced = false;
          entry.sawUnsynced = false;
          keys.push(key);
        }
        if (keys.length) this._emit("change");
        this._emit("upstreamLost", { keys, frame });
        break;
      }
      default:
        break;
    }
    const requestId = frame.requestId;
    const pending = requestId === void 0 ? void 0 : this._pending.get(String(requestId));
    if (pending !== void 0) {
      this._pending.delete(String(requestId));
      clearTimeout(pending.timer);
      if (frame.type === "error") {
        pending.reject(new GatewayError(frame.code, frame.message, frame));
      } else {
        pending.resolve(frame);
      }
    } else if (frame.type === "error") {
      const error = frame;
      this._report(new GatewayError(error.code, error.message, error), { frame });
    }
  }
  _onDropped(frame) {
    for (const key of frame.channels ?? []) {
      const entry = this._subs.get(key);
      if (entry === void 0) continue;
      this._subs.delete(key);
      entry.failed = true;
      this._emit("change");
      const reason = frame.reason ?? "unsubscribed";
      this._report(new GatewayError(reason, `the server dropped ${key} (${reason})`, frame), {
        key,
        action: "unsubscribed"
      });
    }
  }
  /**
   * `requestId` is the reply's (undefined for notices). A reply to an older
   * request for the same key (subscribe, unsubscribe, subscribe again in one
   * breath, as React's StrictMode does) describes a subscription the server
   * has since dropped, so only the latest request's reply counts.
   */
  _applyStates(states, requestId) {
    const applied = [];
    for (const state of states ?? []) {
      const key = state.pattern ?? state.channel;
      const entry = this._subs.get(key);
      if (entry === void 0) continue;
      if (requestId !== void 0 && entry.requestId !== void 0 && String(requestId) !== entry.requestId) {
        continue;
      }
      const seq = typeof state.seq === "number" ? state.seq : 0;
      entry.lastSeq = requestId === void 0 && entry.sawUnsynced && entry.lastSeq !== null ? Math.max(entry.lastSeq, seq) : seq;
      entry.epoch = state.epoch ?? null;
      entry.live = state.live !== false;
      entry.synced = entry.live;
      entry.sawUnsynced = false;
      entry.confirmed = true;
      const described = describe(entry);
      applied.push(described);
      entry.resolveReady(described);
    }
    if (applied.length) this._emit("change");
    return applied;
  }
  _onData(frame) {
    const key = frame.pattern ?? frame.channel;
    const entry = this._subs.get(key);
    if (entry === void 0) return;
    this.stats.messages += 1;
    const msg = frame;
    const seq = frame.seq;
    if (typeof seq === "number") {
      if (!entry.synced) {
        entry.sawUnsynced = true;
      } else if (entry.lastSeq !== null && seq !== entry.lastSeq + 1) {
        const gap = {
          key,
          channel: frame.channel,
          expected: entry.lastSeq + 1,
          got: seq,
          missed: Math.max(0, seq - entry.lastSeq - 1),
          epoch: entry.epoch
        };
        msg.gap = gap;
        this.stats.gaps += 1;
        this._emit("gap", gap);
      }
      entry.lastSeq = seq;
    }
    if (frame.offset !== void 0 && frame.pattern === void 0) entry.offset = frame.offset;
    msg.key = key;
    msg.epoch = entry.epoch;
    for (const registration of entry.handlers) {
      try {
        registration.handler(frame.data, msg);
      } catch (error) {
        this._report(error, { key, during: "handler" });
      }
    }
  }
  // --- callbacks ----------------------------------------------------------------
  _report(error, context) {
    if (error && QUIET_CODES.has(error.code)) return;
    if (typeof this._on.error === "function" || this._listeners.error.size > 0) {
      this._emit("error", error, context);
    } else {
      console.error("GatewayClient:", error, context);
    }
  }
  _emit(event, ...args) {
    const own = this._on[event];
    const callbacks = [...own ? [own] : [], ...this._listeners[event]];
    for (const callback of callbacks) {
      try {
        callback(...args);
      } catch (error) {
        if (event !== "error") this._report(error, { during: "callback" });
        else console.error("GatewayClient: onError threw", error);
      }
    }
  }
};
function newEntry(key) {
  let resolveReady;
  let rejectReady;
  const ready = new Promise((resolve, reject) => {
    resolveReady = resolve;
    rejectReady = reject;
  });
  ready.catch(() => {
  });
  return {
    key,
    kind: isPattern(key) ? "pattern" : "channel",
    handlers: /* @__PURE__ */ new Set(),
    sent: false,
    requestId: void 0,
    confirmed: false,
    failed: false,
    live: false,
    synced: false,
    sawUnsynced: false,
    epoch: null,
    lastSeq: null,
    offset: void 0,
    ready,
    resolveReady,
    rejectReady
  };
}
function wireName(entry) {
  if (entry.kind === "channel" && entry.offset !== void 0 && entry.offset !== null) {
    return { channel: entry.key, since: entry.offset };
  }
  return entry.key;
}
function describe(entry) {
  let status = "pending";
  if (entry.failed) status = "failed";
  else if (entry.confirmed) status = entry.live ? "live" : "waiting";
  return {
    key: entry.key,
    kind: entry.kind,
    status,
    live: entry.live,
    epoch: entry.epoch,
    lastSeq: entry.lastSeq,
    offset: entry.offset,
    handlers: entry.handlers.size
  };
}
export {
  ACTIONS,
  CLOSE_NAMES,
  Close,
  ERROR_CODES,
  ErrorCode,
  FATAL_CLOSE_CODES,
  FRAME_TYPES,
  FROM_START,
  GatewayClient,
  GatewayError,
  HTTP_ERROR_CODES,
  MAX_REQUEST_ID_LENGTH,
  PATTERN_CHARS,
  REFUSAL_HEADER,
  SUBPROTOCOL,
  TOKEN_PROTOCOL_PREFIX,
  TRANSIENT_ERROR_CODES,
  backoffDelay,
  isGatewayError,
  isPattern,
  socketUrl,
  sseTransport,
  sseUrl,
  webSocketTransport
};
