import { GatewayError } from "./errors";
import type {
  ChannelRequest,
  ClientFrame,
  DataFrame,
  ErrorFrame,
  ResubscribedFrame,
  ServerFrame,
  SubscriptionState,
  UnsubscribedFrame,
  UpstreamLostFrame,
} from "./frames";
import {
  type EventSourceConstructor,
  sseTransport,
  type Transport,
  type TransportFactory,
  type WebSocketConstructor,
  webSocketTransport,
} from "./transport";
import {
  type Action,
  Close,
  CLOSE_NAMES,
  type ErrorCode,
  FATAL_CLOSE_CODES,
  PATTERN_CHARS,
  TRANSIENT_ERROR_CODES,
} from "./wire";

export type ConnectionState = "idle" | "connecting" | "open" | "reconnecting" | "closed";

export interface StateInfo {
  code?: number;
  reason?: string;
  /** Reconnecting: how long until the next attempt. */
  delayMs?: number;
  attempt?: number;
  /** Closed by a code after which reconnecting cannot help (wire.FATAL_CLOSE_CODES). */
  fatal?: boolean;
  /** Open: the transport in use ("websocket", or "sse" after a fallback). */
  transport?: string;
}

/** The client moved to another transport because `from` never opened. */
export interface FallbackEvent {
  from: string;
  to: string;
}

/** Messages lost on one subscription: seq jumped within one epoch. */
export interface Gap {
  key: string;
  channel: string;
  expected: number;
  got: number;
  missed: number;
  epoch: string | null;
}

/** A data frame as handlers see it: the frame plus what the client knows. */
export interface Message<T = unknown> extends DataFrame<T> {
  /** The subscription it arrived on: the channel, or the pattern that matched. */
  key: string;
  epoch: string | null;
  /** Set when this message followed a seq gap. */
  gap?: Gap;
}

export type Handler<T = unknown> = (data: T, msg: Message<T>) => void;

export type SubscriptionStatus = "pending" | "live" | "waiting" | "failed";

export interface SubscriptionInfo {
  key: string;
  kind: "channel" | "pattern";
  status: SubscriptionStatus;
  live: boolean;
  epoch: string | null;
  lastSeq: number | null;
  offset: string | undefined;
  handlers: number;
}

/** What subscribe() returns: call it to remove the handler. */
export interface Unsubscribe {
  (): Promise<void>;
  /** Resolves once the server confirmed the subscription; rejects if it refused the name. */
  readonly ready: Promise<SubscriptionInfo>;
  readonly key: string;
}

export interface SubscribeOptions {
  /** Durable channels: resume after this offset (`"0"`: the whole history). */
  since?: string | null;
}

export interface ErrorContext {
  key?: string;
  action?: string;
  during?: string;
  frame?: ServerFrame | Record<string, unknown>;
}

export interface ClientEvents {
  state: (state: ConnectionState, info: StateInfo) => void;
  gap: (gap: Gap) => void;
  upstreamLost: (event: { keys: string[]; frame: UpstreamLostFrame }) => void;
  resubscribed: (event: { subscriptions: SubscriptionInfo[]; frame: ResubscribedFrame }) => void;
  error: (error: GatewayError | Error, context: ErrorContext) => void;
  /** Some subscription's status, epoch or membership changed: re-read subscriptions(). */
  change: () => void;
  /** The WebSocket could not connect (a proxy refusing upgrades?): trying the next transport. */
  fallback: (event: FallbackEvent) => void;
}

export interface GatewayClientOptions {
  /** A credential, or a function called on every (re)connect so a refreshed token is used. */
  token?: string | (() => string | undefined | Promise<string | undefined>);
  /** Passed to `new WebSocket(url, protocols)`. */
  protocols?: string | string[];
  /** Backoff bounds, or false: never reconnect. */
  reconnect?: false | { minDelayMs?: number; maxDelayMs?: number };
  /** Subscribe / unsubscribe / ping replies. */
  requestTimeoutMs?: number;
  onState?: ClientEvents["state"];
  onGap?: ClientEvents["gap"];
  onUpstreamLost?: ClientEvents["upstreamLost"];
  onResubscribed?: ClientEvents["resubscribed"];
  /** error.code is the server's code when it has one. */
  onError?: ClientEvents["error"];
  /** A WebSocket implementation (Node's `ws`, a test double); default: the global. */
  WebSocket?: WebSocketConstructor;
  /** An EventSource implementation for the SSE fallback; default: the global. */
  EventSource?: EventSourceConstructor;
  /**
   * Fall back to Server-Sent Events (`/sse`) when the WebSocket never opens.
   * Default true where an EventSource exists. Ignored when `transports` is given.
   */
  sseFallback?: boolean;
  onFallback?: ClientEvents["fallback"];
  /**
   * Transports in order of preference. The client moves to the next one when
   * a connection closes before it ever opened. Default: the WebSocket, then
   * Server-Sent Events (see `sseFallback`).
   */
  transports?: TransportFactory[];
}

// A connection must survive this long before the backoff forgets earlier
// failures: a server that accepts and then drops us at once must not make the
// client reconnect in a tight loop.
const STABLE_AFTER_MS = 5000;
const QUIET_CODES = new Set(["disconnected", "not_connected", "not_subscribed"]);
const PATTERN_RE = new RegExp(`[${PATTERN_CHARS.replace(/[\\\]^-]/g, "\\$&")}]`);

/** True when the gateway treats `name` as a PSUBSCRIBE pattern. */
export function isPattern(name: string): boolean {
  return PATTERN_RE.test(name);
}

/** Full-jitter backoff: a uniform delay in [0, min(max, min * 2^attempt)). */
export function backoffDelay(
  attempt: number,
  minDelayMs: number,
  maxDelayMs: number,
  random: () => number = Math.random,
): number {
  const cap = Math.min(maxDelayMs, minDelayMs * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * cap);
}

type Registration = { handler: Handler<any> };

interface Entry {
  key: string;
  kind: "channel" | "pattern";
  handlers: Set<Registration>;
  sent: boolean;
  requestId: string | undefined;
  confirmed: boolean;
  failed: boolean;
  live: boolean;
  synced: boolean;
  sawUnsynced: boolean;
  epoch: string | null;
  lastSeq: number | null;
  offset: string | undefined;
  ready: Promise<SubscriptionInfo>;
  resolveReady: (info: SubscriptionInfo) => void;
  rejectReady: (error: Error) => void;
}

interface Pending {
  resolve: (frame: ServerFrame) => void;
  reject: (error: Error) => void;
  timer: ReturnType<typeof setTimeout>;
}

type Listeners = { [K in keyof ClientEvents]: Set<ClientEvents[K]> };

export class GatewayClient {
  readonly url: string;
  state: ConnectionState = "idle";
  readonly stats = { messages: 0, gaps: 0, reconnects: 0 };

  private readonly _token: GatewayClientOptions["token"];
  private readonly _protocols: string | string[] | undefined;
  private readonly _reconnect: boolean;
  private readonly _minDelay: number;
  private readonly _maxDelay: number;
  private readonly _requestTimeout: number;
  private readonly _on: Partial<ClientEvents>;
  private readonly _listeners: Listeners = {
    state: new Set(),
    gap: new Set(),
    upstreamLost: new Set(),
    resubscribed: new Set(),
    error: new Set(),
    change: new Set(),
    fallback: new Set(),
  };
  private readonly _transports: TransportFactory[];
  private _transportIndex = 0;
  private readonly _subs = new Map<string, Entry>();
  private readonly _pending = new Map<string, Pending>();
  private _nextId = 1;
  private _transport: Transport | null = null;
  private _wanted = false;
  private _retrying = false;
  private _attempt = 0;
  private _generation = 0;
  private _retryTimer: ReturnType<typeof setTimeout> | null = null;
  private _stableTimer: ReturnType<typeof setTimeout> | undefined = undefined;
  private _openWaiters: { resolve: () => void; reject: (error: Error) => void }[] = [];
  private _warned = false;
  private _fallingFrom: string | null = null;

  constructor(url: string, options: GatewayClientOptions = {}) {
    this.url = url;
    this._token = options.token;
    this._protocols = options.protocols;
    const reconnect = options.reconnect || {};
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
      fallback: options.onFallback,
    };
    const EventSourceImpl =
      options.EventSource ?? (globalThis as { EventSource?: EventSourceConstructor }).EventSource;
    this._transports = options.transports?.length
      ? [...options.transports]
      : [
          webSocketTransport(options.WebSocket),
          ...(options.sseFallback !== false && EventSourceImpl !== undefined
            ? [sseTransport(EventSourceImpl)]
            : []),
        ];
  }

  /**
   * Listen to an event besides the constructor's callback (several parts of
   * an app, a React provider, may each want the state). Returns the remover.
   */
  on<K extends keyof ClientEvents>(event: K, listener: ClientEvents[K]): () => void {
    const set = this._listeners[event] as Set<ClientEvents[K]>;
    set.add(listener);
    return () => {
      set.delete(listener);
    };
  }

  // --- connection -------------------------------------------------------------

  /** Start connecting (if not already). Resolves when a connection is open. */
  connect(): Promise<void> {
    if (this._isOpen()) return Promise.resolve();
    const opened = new Promise<void>((resolve, reject) =>
      this._openWaiters.push({ resolve, reject }),
    );
    if (!this._wanted) {
      this._wanted = true;
      this._attempt = 0;
      this._retrying = false;
      this._transportIndex = 0;
      void this._open();
    } else if (this._retryTimer !== null) {
      // Asked again while waiting out a backoff (the user pressed Connect,
      // the network came back): try now.
      clearTimeout(this._retryTimer);
      this._retryTimer = null;
      void this._open();
    }
    return opened;
  }

  /** Close the connection and stop reconnecting. Subscriptions are kept for connect(). */
  close(code: number = Close.NORMAL, reason = ""): void {
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
  get transport(): string | null {
    return this._transport?.name ?? null;
  }

  private async _open(): Promise<void> {
    const generation = ++this._generation;
    this._setState(this._retrying ? "reconnecting" : "connecting", { attempt: this._attempt });
    let token: string | undefined;
    try {
      token = typeof this._token === "function" ? await this._token() : this._token;
    } catch (error) {
      if (generation !== this._generation) return;
      this._report(error as Error, { during: "connect" });
      this._scheduleReconnect(undefined, "token or URL failed");
      return;
    }
    if (generation !== this._generation || !this._wanted) return;
    const factory = this._transports[this._transportIndex] as TransportFactory;
    let transport: Transport;
    try {
      transport = factory(
        {
          url: this.url,
          token,
          protocols: this._protocols,
          channels: [...this._subs.values()].map(wireName),
        },
        {
          open: () => this._onOpen(transport),
          message: (data) => this._onMessage(transport, data),
          close: (event) => this._onClose(transport, event),
        },
      );
    } catch (error) {
      // A malformed URL will not get better by retrying.
      this._report(error as Error, { during: "connect" });
      this.close();
      return;
    }
    this._transport = transport;
    const from = this._fallingFrom;
    this._fallingFrom = null;
    if (from !== null && from !== transport.name) this._fellBack(from, transport.name);
  }

  private _isOpen(): boolean {
    return this._transport !== null && this._transport.isOpen;
  }

  private _onOpen(transport: Transport): void {
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

  private _onClose(
    transport: Transport,
    event: { code: number; reason: string; opened: boolean },
  ): void {
    if (transport !== this._transport) return;
    this._transport = null;
    clearTimeout(this._stableTimer);
    this._connectionGone();
    if (!this._wanted) {
      this._setState("closed", { code: event.code, reason: event.reason });
      return;
    }
    if (FATAL_CLOSE_CODES.has(event.code)) {
      // The same connection would be closed the same way: the application
      // has to change something (fewer connections per user, smaller frames).
      this._wanted = false;
      const name = CLOSE_NAMES[event.code] ?? String(event.code);
      const error = new GatewayError("closed", `closed by the gateway: ${name} ${event.reason}`);
      this._report(error, { during: "connection" });
      for (const w of this._openWaiters.splice(0)) w.reject(error);
      this._setState("closed", { code: event.code, reason: event.reason, fatal: true });
      return;
    }
    if (!event.opened && this._transportIndex + 1 < this._transports.length) {
      // Never opened: a refused upgrade looks like this (a proxy that does
      // not pass WebSockets). The next transport is tried at once.
      this._transportIndex += 1;
      this._fallingFrom = transport.name;
      void this._open();
      return;
    }
    // Every reconnect starts from the first transport again: a fallback
    // taken while the gateway was merely unreachable (a restart) must not
    // keep the client off the WebSocket for good. Where upgrades are
    // refused, that costs one quick refusal per reconnect.
    this._transportIndex = 0;
    this._scheduleReconnect(event.code, event.reason);
  }

  private _fellBack(from: string, to: string): void {
    if (!this._warned) {
      this._warned = true;
      const note = to === "sse" ? " (Server-Sent Events: channels fixed per connection)" : "";
      console.warn(
        `GatewayClient: the ${from} connection to ${this.url} never opened; falling back to ${to}${note}`,
      );
    }
    this._emit("fallback", { from, to });
  }

  /** Everything tied to one connection ends with it. */
  private _connectionGone(): void {
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
    if (this._subs.size) this._emit("change");
  }

  private _scheduleReconnect(code: number | undefined, reason: string): void {
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

  private _setState(state: ConnectionState, info: StateInfo = {}): void {
    if (state === this.state && state !== "reconnecting") return;
    this.state = state;
    this._emit("state", state, info);
  }

  // --- requests ---------------------------------------------------------------

  /** Send `{action, ...fields, requestId}`; resolves with the reply frame. */
  request(action: Action, fields: Record<string, unknown> = {}): Promise<ServerFrame> {
    return this._request(action, fields).reply;
  }

  private _request(
    action: Action,
    fields: Record<string, unknown>,
  ): { requestId: string | undefined; reply: Promise<ServerFrame> } {
    if (!this._isOpen()) {
      const reply = Promise.reject(new GatewayError("not_connected", `${action}: not connected`));
      return { requestId: undefined, reply };
    }
    const requestId = `r${this._nextId++}`;
    const transport = this._transport as Transport;
    const reply = new Promise<ServerFrame>((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(requestId);
        reject(new GatewayError("timeout", `${action}: no reply within ${this._requestTimeout} ms`));
      }, this._requestTimeout);
      this._pending.set(requestId, { resolve, reject, timer });
      try {
        transport.send({ ...fields, action, requestId } as ClientFrame);
      } catch (error) {
        clearTimeout(timer);
        this._pending.delete(requestId);
        reject(new GatewayError("disconnected", String(error)));
      }
    });
    return { requestId, reply };
  }

  /** Application-level round trip. Resolves with `{ time, rttMs }`. */
  async ping(): Promise<{ time: number | undefined; rttMs: number }> {
    const started = performance.now();
    const reply = (await this.request("ping")) as { time?: number };
    return { time: reply.time, rttMs: performance.now() - started };
  }

  // --- subscriptions ----------------------------------------------------------

  /**
   * Call `handler(data, msg)` for every message of `name` (a channel or a
   * pattern). Returns a function that removes this handler; it carries a
   * `ready` promise.
   */
  subscribe<T = unknown>(name: string, handler: Handler<T>, options: SubscribeOptions = {}): Unsubscribe {
    if (typeof name !== "string" || name === "") {
      throw new TypeError("subscribe: name must be a non-empty string");
    }
    if (typeof handler !== "function") throw new TypeError("subscribe: handler must be a function");
    let entry = this._subs.get(name);
    const created = entry === undefined;
    if (entry === undefined) {
      entry = newEntry(name);
      this._subs.set(name, entry);
    }
    if (
      options.since !== undefined &&
      options.since !== null &&
      entry.kind === "channel" &&
      !entry.sent &&
      entry.offset === undefined
    ) {
      entry.offset = options.since;
    }
    const registration: Registration = { handler };
    entry.handlers.add(registration);
    if (created && this._isOpen()) void this._subscribeEntries([entry]);
    let removed = false;
    const target = entry;
    const unsubscribe = (() => {
      if (removed) return Promise.resolve();
      removed = true;
      return this._removeHandler(target, registration);
    }) as Unsubscribe & { ready: Promise<SubscriptionInfo>; key: string };
    unsubscribe.ready = entry.ready;
    unsubscribe.key = name;
    return unsubscribe;
  }

  /** A snapshot of every subscription, for display. */
  subscriptions(): SubscriptionInfo[] {
    return [...this._subs.values()].map(describe);
  }

  private async _subscribeEntries(entries: Entry[]): Promise<void> {
    const transport = this._transport;
    for (const entry of entries) entry.sent = true;
    const channels = entries.map(wireName);
    const { requestId, reply } = this._request("subscribe", { channels });
    for (const entry of entries) entry.requestId = requestId;
    try {
      await reply;
      // The reply's states were applied by _onFrame, before this resumes.
    } catch (caught) {
      const error = caught as GatewayError;
      if (transport !== this._transport || !this._isOpen()) return;
      if (error.code === "timeout") {
        for (const entry of entries) this._report(error, { key: entry.key, action: "subscribe" });
        return;
      }
      const current = entries.filter((entry) => this._subs.get(entry.key) === entry);
      if (TRANSIENT_ERROR_CODES.has(error.code as ErrorCode)) {
        // Nothing was refused: the server could not do it now. Ask again later.
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
        // The request is all or nothing: find out which names are refused.
        for (const entry of current) void this._subscribeEntries([entry]);
        return;
      }
      const entry = current[0];
      if (entry === undefined) return;
      if (error.code === "bad_request" && typeof channels[0] === "object") {
        // A gateway without durable channels: resume is not possible there.
        entry.offset = undefined;
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

  private _removeHandler(entry: Entry, registration: Registration): Promise<void> {
    entry.handlers.delete(registration);
    if (entry.handlers.size > 0 || this._subs.get(entry.key) !== entry) return Promise.resolve();
    this._subs.delete(entry.key);
    if (!entry.sent || !this._isOpen()) return Promise.resolve();
    return this.request("unsubscribe", { channels: [entry.key] }).then(
      () => undefined,
      (error: Error) => this._report(error, { key: entry.key, action: "unsubscribe" }),
    );
  }

  // --- frames -------------------------------------------------------------------

  private _onMessage(transport: Transport, data: unknown): void {
    if (transport !== this._transport) return;
    if (typeof data !== "string") {
      this._report(new GatewayError("bad_frame", "binary frame from server"), {});
      return;
    }
    let frame: unknown;
    try {
      frame = JSON.parse(data);
    } catch (error) {
      this._report(new GatewayError("bad_frame", `invalid JSON from server: ${error}`), {});
      return;
    }
    if (frame === null || typeof frame !== "object") return;
    this._onFrame(frame as ServerFrame);
  }

  /**
   * Handle one parsed server frame. Public for tests and for feeding frames
   * from another transport; it changes subscription state as a real frame would.
   * @internal
   */
  _onFrame(frame: ServerFrame): void {
    switch (frame.type) {
      case "data":
        this._onData(frame);
        return;
      case "subscribed":
        this._applyStates(frame.subscriptions, frame.requestId);
        break;
      case "resubscribed": {
        const subscriptions = this._applyStates(frame.subscriptions, undefined);
        this._emit("resubscribed", { subscriptions, frame });
        break;
      }
      case "unsubscribed":
        // Without a requestId the server dropped these by itself (a refreshed
        // token that allows less): they are gone, and the app should know.
        if (frame.requestId === undefined) this._onDropped(frame);
        break;
      case "upstream_lost": {
        const keys: string[] = [];
        for (const state of frame.subscriptions ?? []) {
          const key = (state.pattern ?? state.channel) as string;
          const entry = this._subs.get(key);
          if (entry === undefined) continue;
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
    const requestId = (frame as { requestId?: unknown }).requestId;
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
      const error = frame as ErrorFrame;
      this._report(new GatewayError(error.code, error.message, error), { frame });
    }
  }

  private _onDropped(frame: UnsubscribedFrame): void {
    for (const key of frame.channels ?? []) {
      const entry = this._subs.get(key);
      if (entry === undefined) continue;
      this._subs.delete(key);
      entry.failed = true;
      this._emit("change");
      const reason = frame.reason ?? "unsubscribed";
      this._report(new GatewayError(reason, `the server dropped ${key} (${reason})`, frame as never), {
        key,
        action: "unsubscribed",
      });
    }
  }

  /**
   * `requestId` is the reply's (undefined for notices). A reply to an older
   * request for the same key (subscribe, unsubscribe, subscribe again in one
   * breath, as React's StrictMode does) describes a subscription the server
   * has since dropped, so only the latest request's reply counts.
   */
  private _applyStates(
    states: SubscriptionState[] | undefined,
    requestId: string | undefined,
  ): SubscriptionInfo[] {
    const applied: SubscriptionInfo[] = [];
    for (const state of states ?? []) {
      const key = (state.pattern ?? state.channel) as string;
      const entry = this._subs.get(key);
      if (entry === undefined) continue;
      if (
        requestId !== undefined &&
        entry.requestId !== undefined &&
        String(requestId) !== entry.requestId
      ) {
        continue;
      }
      const seq = typeof state.seq === "number" ? state.seq : 0;
      // A reply is built the moment the server attaches the subscription, so
      // every later frame follows its seq. A notice may trail frames of the
      // epoch it names (seen while unsynced); those count towards it.
      entry.lastSeq =
        requestId === undefined && entry.sawUnsynced && entry.lastSeq !== null
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
    if (applied.length) this._emit("change");
    return applied;
  }

  private _onData(frame: DataFrame): void {
    const key = frame.pattern ?? frame.channel;
    const entry = this._subs.get(key);
    if (entry === undefined) return;
    this.stats.messages += 1;
    const msg = frame as Message;
    const seq = frame.seq;
    if (typeof seq === "number") {
      if (!entry.synced) {
        entry.sawUnsynced = true;
      } else if (entry.lastSeq !== null && seq !== entry.lastSeq + 1) {
        const gap: Gap = {
          key,
          channel: frame.channel,
          expected: entry.lastSeq + 1,
          got: seq,
          missed: Math.max(0, seq - entry.lastSeq - 1),
          epoch: entry.epoch,
        };
        msg.gap = gap;
        this.stats.gaps += 1;
        this._emit("gap", gap);
      }
      entry.lastSeq = seq;
    }
    if (frame.offset !== undefined && frame.pattern === undefined) entry.offset = frame.offset;
    msg.key = key;
    msg.epoch = entry.epoch;
    for (const registration of entry.handlers) {
      try {
        registration.handler(frame.data, msg);
      } catch (error) {
        this._report(error as Error, { key, during: "handler" });
      }
    }
  }

  // --- callbacks ----------------------------------------------------------------

  private _report(error: Error, context: ErrorContext): void {
    if (error && QUIET_CODES.has((error as GatewayError).code)) return;
    if (typeof this._on.error === "function" || this._listeners.error.size > 0) {
      this._emit("error", error, context);
    } else {
      console.error("GatewayClient:", error, context);
    }
  }

  private _emit<K extends keyof ClientEvents>(event: K, ...args: Parameters<ClientEvents[K]>): void {
    const own = this._on[event];
    const callbacks = [...(own ? [own] : []), ...this._listeners[event]] as ((
      ...a: Parameters<ClientEvents[K]>
    ) => void)[];
    for (const callback of callbacks) {
      try {
        callback(...args);
      } catch (error) {
        // A throwing callback must not break frame handling.
        if (event !== "error") this._report(error as Error, { during: "callback" });
        else console.error("GatewayClient: onError threw", error);
      }
    }
  }
}

function newEntry(key: string): Entry {
  let resolveReady!: (info: SubscriptionInfo) => void;
  let rejectReady!: (error: Error) => void;
  const ready = new Promise<SubscriptionInfo>((resolve, reject) => {
    resolveReady = resolve;
    rejectReady = reject;
  });
  // Callers that never look at `ready` must not get unhandled-rejection noise.
  ready.catch(() => {});
  return {
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
    ready,
    resolveReady,
    rejectReady,
  };
}

function wireName(entry: Entry): ChannelRequest {
  if (entry.kind === "channel" && entry.offset !== undefined && entry.offset !== null) {
    return { channel: entry.key, since: entry.offset };
  }
  return entry.key;
}

function describe(entry: Entry): SubscriptionInfo {
  let status: SubscriptionStatus = "pending";
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
