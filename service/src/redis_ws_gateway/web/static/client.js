/**
 * Browser client for redis-ws-gateway (docs/PROTOCOL.md). An ES module with no
 * dependencies: import it from the gateway itself (`/client.js`) or copy it
 * into an app.
 *
 *   import { GatewayClient } from "/client.js";
 *
 *   const client = new GatewayClient("wss://gateway.example/ws", {
 *     token: "secret",                 // or () => string | Promise<string>, called per connect
 *     protocols: undefined,            // passed to new WebSocket(url, protocols)
 *     reconnect: { minDelayMs: 250, maxDelayMs: 10000 },  // or false: never reconnect
 *     requestTimeoutMs: 10000,         // subscribe / unsubscribe / ping replies
 *     onState(state, info) {},         // "idle" | "connecting" | "open" | "reconnecting" | "closed"
 *     onGap({ key, channel, expected, got, missed, epoch }) {},
 *     onUpstreamLost({ keys, frame }) {},
 *     onResubscribed({ subscriptions, frame }) {},
 *     onError(error, context) {},      // error.code is the server's code when it has one
 *   });
 *   client.connect();                  // Promise: resolves once open; rejects (code "closed")
 *                                      // only if close() comes first
 *
 *   const off = client.subscribe("market:tick:*", (data, msg) => {
 *     // data: the payload (JSON as parsed; text as a string; base64 text when
 *     //       msg.encoding === "base64")
 *     // msg:  the data frame plus { key, epoch, gap? }; msg.gap is set when
 *     //       this message followed a seq gap
 *   });
 *   await off.ready;                   // the subscription's state once the server confirmed it
 *   off();                             // drops this handler; the last one unsubscribes
 *
 *   await client.ping();               // { time, rttMs }
 *   await client.request(action, fields);  // any request; resolves with its reply frame
 *   client.subscriptions();            // [{ key, kind, status, live, epoch, lastSeq, offset, handlers }]
 *   client.stats;                      // { messages, gaps, reconnects }
 *   client.close();                    // stops reconnecting; connect() starts again
 *
 * Also exported: GatewayError (the errors above), isPattern(name) and
 * backoffDelay(attempt, minDelayMs, maxDelayMs).
 *
 * Behaviour
 *
 * - Subscriptions are keyed by the name as subscribed: an exact channel, or a
 *   pattern (a name containing `*`, `?` or `[`). Several handlers may share a
 *   key; the server sees one subscription. subscribe() may be called at any
 *   time: while disconnected the subscription is sent once the socket opens.
 *   Subscribe, unsubscribe and subscribe again in one breath (React's
 *   StrictMode) is safe: only the reply to the latest request counts.
 * - Handlers of one key share the `msg` object: treat it as read-only.
 * - `ready` resolves with `{ key, kind, status, live, epoch, lastSeq }` on the
 *   first confirmation and rejects (error.code = the server's code) only when
 *   the server refuses the name; the subscription is then forgotten. A reply
 *   that times out is reported to onError and the subscription stays pending
 *   (a late reply, or the next reconnect, still activates it).
 * - A subscribe answered with rate_limited is sent again after a short delay.
 *   An `unsubscribed` frame the client did not ask for (the server dropped
 *   subscriptions, e.g. after a token refresh that allows less) removes them
 *   and calls onError with code = its `reason`.
 * - Data frames replayed from a durable channel's history (`replay: true`)
 *   carry no seq and are passed to handlers like any other; their `offset`
 *   counts for resume.
 * - Requests reject with an Error whose `.code` is the server's error code, or
 *   one of the client's own: "timeout", "disconnected", "not_connected",
 *   "closed".
 * - Any close the application did not ask for is followed by reconnecting
 *   with exponential backoff and full jitter (a random delay between 0 and
 *   min(maxDelayMs, minDelayMs * 2^attempt)). Close 1012 (the pod is
 *   draining) resets the backoff, so the client comes back within minDelayMs.
 *   After reconnecting every active subscription is sent again in one request;
 *   if the server refuses that request, each one is retried alone so that one
 *   bad name does not take the others down.
 * - Gap detection: per key, a data frame whose seq is not last + 1 within the
 *   same epoch calls onGap. An epoch from `subscribed`/`resubscribed` resets
 *   the expected seq. Between `upstream_lost` and `resubscribed` no gaps are
 *   reported: messages of the new epoch may arrive before the notice that
 *   names it, and count towards it when it does.
 * - Durable channels: when data frames of an exact channel carry `offset`, the
 *   last one is kept, and re-subscribing (after a reconnect) sends
 *   `{"channel": name, "since": offset}` for that channel instead of the plain
 *   name. subscribe(name, handler, { since }) starts from a known offset. A
 *   server that answers such a request with bad_request gets the plain name.
 */

const CLOSE_SERVICE_RESTART = 1012;
const WS_OPEN = 1;
// A connection must survive this long before the backoff forgets earlier
// failures: a server that accepts and then drops us at once must not make the
// client reconnect in a tight loop.
const STABLE_AFTER_MS = 5000;
const QUIET_CODES = new Set(["disconnected", "not_connected", "not_subscribed"]);

/** True when the gateway treats `name` as a PSUBSCRIBE pattern. */
export function isPattern(name) {
  return /[*?[]/.test(name);
}

/** Full-jitter backoff: a uniform delay in [0, min(max, min * 2^attempt)). */
export function backoffDelay(attempt, minDelayMs, maxDelayMs, random = Math.random) {
  const cap = Math.min(maxDelayMs, minDelayMs * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * cap);
}

/** An error with a machine-readable `code` (the server's, or the client's own). */
export class GatewayError extends Error {
  constructor(code, message, frame) {
    super(message || code);
    this.name = "GatewayError";
    this.code = code;
    if (frame !== undefined) this.frame = frame;
  }
}

export class GatewayClient {
  constructor(url, options = {}) {
    this.url = url;
    this._token = options.token;
    this._protocols = options.protocols;
    const reconnect = options.reconnect ?? {};
    this._reconnect = options.reconnect !== false;
    this._minDelay = Math.max(0, reconnect.minDelayMs ?? 250);
    this._maxDelay = Math.max(this._minDelay, reconnect.maxDelayMs ?? 10000);
    this._requestTimeout = options.requestTimeoutMs ?? 10000;
    this._on = {
      state: options.onState,
      gap: options.onGap,
      upstreamLost: options.onUpstreamLost,
      resubscribed: options.onResubscribed,
      error: options.onError,
    };
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this.state = "idle";
    this.stats = { messages: 0, gaps: 0, reconnects: 0 };
    this._subs = new Map();
    this._pending = new Map();
    this._nextId = 1;
    this._ws = null;
    this._wanted = false;
    this._retrying = false;
    this._attempt = 0;
    this._generation = 0;
    this._retryTimer = null;
    this._stableTimer = null;
    this._openWaiters = [];
  }

  // --- connection -------------------------------------------------------------

  /** Start connecting (if not already). Resolves when a socket is open. */
  connect() {
    if (this._isOpen()) return Promise.resolve();
    const opened = new Promise((resolve, reject) => this._openWaiters.push({ resolve, reject }));
    if (!this._wanted) {
      this._wanted = true;
      this._attempt = 0;
      this._retrying = false;
      this._open();
    } else if (this._retryTimer !== null) {
      // Asked again while waiting out a backoff (the user pressed Connect,
      // the network came back): try now.
      clearTimeout(this._retryTimer);
      this._retryTimer = null;
      this._open();
    }
    return opened;
  }

  /** Close the socket and stop reconnecting. Subscriptions are kept for connect(). */
  close(code = 1000, reason = "") {
    this._wanted = false;
    this._generation += 1;
    clearTimeout(this._retryTimer);
    clearTimeout(this._stableTimer);
    this._retryTimer = null;
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      try {
        ws.close(code, reason);
      } catch {
        ws.close();
      }
    }
    this._connectionGone();
    const waiters = this._openWaiters.splice(0);
    for (const w of waiters) w.reject(new GatewayError("closed", "client closed"));
    this._setState("closed", { code, reason });
  }

  async _open() {
    const generation = ++this._generation;
    this._setState(this._retrying ? "reconnecting" : "connecting", { attempt: this._attempt });
    let url;
    try {
      const token = typeof this._token === "function" ? await this._token() : this._token;
      url = this._socketUrl(token);
    } catch (error) {
      if (generation !== this._generation) return;
      this._report(error, { during: "connect" });
      this._scheduleReconnect(undefined, "token or URL failed");
      return;
    }
    if (generation !== this._generation || !this._wanted) return;
    let ws;
    try {
      ws = this._protocols === undefined
        ? new this._WebSocket(url)
        : new this._WebSocket(url, this._protocols);
    } catch (error) {
      // A malformed URL will not get better by retrying.
      this._report(error, { during: "connect" });
      this.close();
      return;
    }
    this._ws = ws;
    ws.onopen = () => this._onOpen(ws);
    ws.onmessage = (event) => this._onMessage(ws, event);
    ws.onclose = (event) => this._onClose(ws, event);
    // Browsers hide the reason of a failed connection; the close event that
    // follows carries everything there is to know.
    ws.onerror = () => {};
  }

  _socketUrl(token) {
    const url = new URL(this.url, globalThis.location?.href);
    if (url.protocol === "http:") url.protocol = "ws:";
    else if (url.protocol === "https:") url.protocol = "wss:";
    if (token) url.searchParams.set("token", token);
    return url.toString();
  }

  _isOpen() {
    return this._ws !== null && this._ws.readyState === WS_OPEN;
  }

  _onOpen(ws) {
    if (ws !== this._ws) return;
    if (this._retrying) this.stats.reconnects += 1;
    this._retrying = false;
    clearTimeout(this._stableTimer);
    this._stableTimer = setTimeout(() => {
      this._attempt = 0;
    }, STABLE_AFTER_MS);
    this._setState("open");
    for (const w of this._openWaiters.splice(0)) w.resolve();
    const entries = [...this._subs.values()];
    if (entries.length) this._subscribeEntries(entries);
  }

  _onClose(ws, event) {
    if (ws !== this._ws) return;
    this._ws = null;
    clearTimeout(this._stableTimer);
    this._connectionGone();
    if (!this._wanted) {
      this._setState("closed", { code: event.code, reason: event.reason });
      return;
    }
    this._scheduleReconnect(event.code, event.reason);
  }

  /** Everything tied to one socket ends with it. */
  _connectionGone() {
    const error = new GatewayError("disconnected", "connection closed");
    for (const [id, pending] of this._pending) {
      clearTimeout(pending.timer);
      this._pending.delete(id);
      pending.reject(error);
    }
    for (const entry of this._subs.values()) {
      entry.sent = false;
      entry.requestId = undefined;
      entry.confirmed = false;
      entry.live = false;
      entry.synced = false;
      entry.sawUnsynced = false;
    }
  }

  _scheduleReconnect(code, reason) {
    if (!this._reconnect) {
      this._wanted = false;
      this._setState("closed", { code, reason });
      return;
    }
    if (code === CLOSE_SERVICE_RESTART) this._attempt = 0;
    const delayMs = backoffDelay(this._attempt, this._minDelay, this._maxDelay);
    this._attempt += 1;
    this._retrying = true;
    this._setState("reconnecting", { code, reason, delayMs, attempt: this._attempt });
    clearTimeout(this._retryTimer);
    this._retryTimer = setTimeout(() => {
      this._retryTimer = null;
      if (this._wanted) this._open();
    }, delayMs);
  }

  _setState(state, info = {}) {
    if (state === this.state && state !== "reconnecting") return;
    this.state = state;
    this._call(this._on.state, state, info);
  }

  // --- requests ---------------------------------------------------------------

  /** Send `{action, ...fields, requestId}`; resolves with the reply frame. */
  request(action, fields = {}) {
    return this._request(action, fields).reply;
  }

  _request(action, fields) {
    if (!this._isOpen()) {
      const reply = Promise.reject(new GatewayError("not_connected", `${action}: not connected`));
      return { requestId: undefined, reply };
    }
    const requestId = `r${this._nextId++}`;
    const ws = this._ws;
    const reply = new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(requestId);
        reject(new GatewayError(
          "timeout", `${action}: no reply within ${this._requestTimeout} ms`));
      }, this._requestTimeout);
      this._pending.set(requestId, { resolve, reject, timer });
      try {
        ws.send(JSON.stringify({ ...fields, action, requestId }));
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
   * `ready` promise (see the header).
   */
  subscribe(name, handler, options = {}) {
    if (typeof name !== "string" || name === "") {
      throw new TypeError("subscribe: name must be a non-empty string");
    }
    if (typeof handler !== "function") throw new TypeError("subscribe: handler must be a function");
    let entry = this._subs.get(name);
    const created = entry === undefined;
    if (created) {
      entry = newEntry(name);
      this._subs.set(name, entry);
    }
    if (options.since !== undefined && options.since !== null && entry.kind === "channel"
        && !entry.sent && entry.offset === undefined) {
      entry.offset = options.since;
    }
    const registration = { handler };
    entry.handlers.add(registration);
    if (created && this._isOpen()) this._subscribeEntries([entry]);
    let removed = false;
    const unsubscribe = () => {
      if (removed) return Promise.resolve();
      removed = true;
      return this._removeHandler(entry, registration);
    };
    unsubscribe.ready = entry.ready;
    unsubscribe.key = name;
    return unsubscribe;
  }

  /** A snapshot of every subscription, for display. */
  subscriptions() {
    return [...this._subs.values()].map(describe);
  }

  async _subscribeEntries(entries) {
    const ws = this._ws;
    for (const entry of entries) entry.sent = true;
    const channels = entries.map((entry) => wireName(entry));
    const { requestId, reply } = this._request("subscribe", { channels });
    for (const entry of entries) entry.requestId = requestId;
    try {
      await reply;
      // The reply's states were applied by _onFrame, before this resumes.
    } catch (error) {
      if (ws !== this._ws || !this._isOpen()) return;
      if (error.code === "timeout") {
        for (const entry of entries) this._report(error, { key: entry.key, action: "subscribe" });
        return;
      }
      const current = entries.filter((entry) => this._subs.get(entry.key) === entry);
      if (error.code === "rate_limited") {
        // The server ignored the frame; nothing was refused. Ask again later.
        const delayMs = this._minDelay + backoffDelay(2, this._minDelay, this._maxDelay);
        setTimeout(() => {
          const still = current.filter((e) => this._subs.get(e.key) === e && !e.confirmed);
          if (ws === this._ws && this._isOpen() && still.length) this._subscribeEntries(still);
        }, delayMs);
        return;
      }
      if (current.length > 1) {
        // The request is all or nothing: find out which names are refused.
        for (const entry of current) this._subscribeEntries([entry]);
        return;
      }
      if (current.length === 0) return;
      const entry = current[0];
      if (error.code === "bad_request" && typeof channels[0] === "object") {
        // A gateway without durable channels: resume is not possible there.
        entry.offset = undefined;
        this._subscribeEntries([entry]);
        return;
      }
      this._subs.delete(entry.key);
      entry.failed = true;
      entry.rejectReady(error);
      this._report(error, { key: entry.key, action: "subscribe" });
    }
  }

  _removeHandler(entry, registration) {
    entry.handlers.delete(registration);
    if (entry.handlers.size > 0 || this._subs.get(entry.key) !== entry) return Promise.resolve();
    this._subs.delete(entry.key);
    if (!entry.sent || !this._isOpen()) return Promise.resolve();
    return this.request("unsubscribe", { channels: [entry.key] }).then(
      () => undefined,
      (error) => this._report(error, { key: entry.key, action: "unsubscribe" }),
    );
  }

  // --- frames -------------------------------------------------------------------

  _onMessage(ws, event) {
    if (ws !== this._ws) return;
    if (typeof event.data !== "string") {
      this._report(new GatewayError("bad_frame", "binary frame from server"), {});
      return;
    }
    let frame;
    try {
      frame = JSON.parse(event.data);
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
        const subscriptions = this._applyStates(frame.subscriptions, undefined);
        this._call(this._on.resubscribed, { subscriptions, frame });
        break;
      }
      case "unsubscribed":
        // Without a requestId the server dropped these by itself (a refreshed
        // token that allows less): they are gone, and the app should know.
        if (frame.requestId === undefined) this._onDropped(frame);
        break;
      case "upstream_lost": {
        const keys = [];
        for (const state of frame.subscriptions ?? []) {
          const key = state.pattern ?? state.channel;
          const entry = this._subs.get(key);
          if (entry === undefined) continue;
          entry.live = false;
          entry.synced = false;
          entry.sawUnsynced = false;
          keys.push(key);
        }
        this._call(this._on.upstreamLost, { keys, frame });
        break;
      }
      default:
        break;
    }
    const requestId = frame.requestId;
    const pending = requestId === undefined ? undefined : this._pending.get(String(requestId));
    if (pending !== undefined) {
      this._pending.delete(String(requestId));
      clearTimeout(pending.timer);
      if (frame.type === "error") {
        pending.reject(new GatewayError(frame.code, frame.message, frame));
      } else {
        pending.resolve(frame);
      }
    } else if (frame.type === "error") {
      this._report(new GatewayError(frame.code, frame.message, frame), { frame });
    }
  }

  /**
   * `requestId` is the reply's (undefined for notices). A reply to an older
   * request for the same key (subscribe, unsubscribe, subscribe again in one
   * breath, as React's StrictMode does) describes a subscription the server
   * has since dropped, so only the latest request's reply counts.
   */
  _onDropped(frame) {
    for (const key of frame.channels ?? []) {
      const entry = this._subs.get(key);
      if (entry === undefined) continue;
      this._subs.delete(key);
      entry.failed = true;
      const reason = frame.reason ?? "unsubscribed";
      this._report(new GatewayError(reason, `the server dropped ${key} (${reason})`, frame), {
        key,
        action: "unsubscribed",
      });
    }
  }

  _applyStates(states, requestId) {
    const applied = [];
    for (const state of states ?? []) {
      const key = state.pattern ?? state.channel;
      const entry = this._subs.get(key);
      if (entry === undefined) continue;
      if (requestId !== undefined && entry.requestId !== undefined
          && String(requestId) !== entry.requestId) continue;
      const seq = typeof state.seq === "number" ? state.seq : 0;
      // A reply is built the moment the server attaches the subscription, so
      // every later frame follows its seq. A notice may trail frames of the
      // epoch it names (seen while unsynced); those count towards it.
      entry.lastSeq = requestId === undefined && entry.sawUnsynced && entry.lastSeq !== null
        ? Math.max(entry.lastSeq, seq)
        : seq;
      entry.epoch = state.epoch ?? null;
      entry.live = state.live !== false;
      entry.synced = entry.live;
      entry.sawUnsynced = false;
      entry.confirmed = true;
      const described = describe(entry);
      applied.push(described);
      entry.resolveReady(described);
    }
    return applied;
  }

  _onData(frame) {
    const key = frame.pattern ?? frame.channel;
    const entry = this._subs.get(key);
    if (entry === undefined) return;
    this.stats.messages += 1;
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
          epoch: entry.epoch,
        };
        frame.gap = gap;
        this.stats.gaps += 1;
        this._call(this._on.gap, gap);
      }
      entry.lastSeq = seq;
    }
    if (frame.offset !== undefined && frame.pattern === undefined) entry.offset = frame.offset;
    frame.key = key;
    frame.epoch = entry.epoch;
    for (const registration of entry.handlers) {
      try {
        registration.handler(frame.data, frame);
      } catch (error) {
        this._report(error, { key, during: "handler" });
      }
    }
  }

  // --- callbacks ----------------------------------------------------------------

  _report(error, context) {
    if (error && QUIET_CODES.has(error.code)) return;
    if (typeof this._on.error === "function") {
      this._call(this._on.error, error, context);
    } else {
      console.error("GatewayClient:", error, context);
    }
  }

  _call(callback, ...args) {
    if (typeof callback !== "function") return;
    try {
      callback(...args);
    } catch (error) {
      // A throwing callback must not break frame handling.
      if (callback !== this._on.error) this._report(error, { during: "callback" });
      else console.error("GatewayClient: onError threw", error);
    }
  }
}

function newEntry(key) {
  const entry = {
    key,
    kind: isPattern(key) ? "pattern" : "channel",
    handlers: new Set(),
    sent: false,
    requestId: undefined,
    confirmed: false,
    failed: false,
    live: false,
    synced: false,
    sawUnsynced: false,
    epoch: null,
    lastSeq: null,
    offset: undefined,
  };
  entry.ready = new Promise((resolve, reject) => {
    entry.resolveReady = resolve;
    entry.rejectReady = reject;
  });
  // Callers that never look at `ready` must not get unhandled-rejection noise.
  entry.ready.catch(() => {});
  return entry;
}

function wireName(entry) {
  if (entry.kind === "channel" && entry.offset !== undefined && entry.offset !== null) {
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
    handlers: entry.handlers.size,
  };
}
