// How frames get to and from a gateway. The client speaks frames; a transport
// only moves them. Two transports: the WebSocket, and Server-Sent Events
// (`GET /sse?channels=...`, frames identical in content) for networks that
// refuse WebSocket upgrades. The SSE transport learns what to subscribe from
// `context.channels` when it connects, and the client moves on to it when the
// WebSocket upgrade fails (a transport that closes before it ever opened).
import type { ChannelRequest, ClientFrame } from "./frames";

export interface TransportContext {
  /** The gateway URL as the application gave it (may be relative). */
  url: string;
  /** The credential for this connect, if any. */
  token?: string;
  /** Extra WebSocket subprotocols the application asked for. */
  protocols?: string | string[];
  /** What the client will subscribe once open, as the wire spells it. */
  channels: ChannelRequest[];
}

export interface TransportCloseEvent {
  code: number;
  reason: string;
  /** False when the connection never opened (refused upgrade, unreachable host). */
  opened: boolean;
}

export interface TransportHandlers {
  open(): void;
  /** One frame's text as received; the client parses and checks it. */
  message(data: unknown): void;
  /** Called once, last. */
  close(event: TransportCloseEvent): void;
}

export interface Transport {
  readonly name: string;
  readonly isOpen: boolean;
  /** Throws when the frame cannot be sent. */
  send(frame: ClientFrame): void;
  close(code?: number, reason?: string): void;
}

export type TransportFactory = (context: TransportContext, handlers: TransportHandlers) => Transport;

type WebSocketLike = {
  readonly readyState: number;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event: unknown) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
};

export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

const WS_OPEN = 1;

/** The gateway URL with ws(s): scheme and the token as `?token=`. */
export function socketUrl(url: string, token?: string): string {
  const base = (globalThis as { location?: { href: string } }).location?.href;
  const parsed = new URL(url, base);
  if (parsed.protocol === "http:") parsed.protocol = "ws:";
  else if (parsed.protocol === "https:") parsed.protocol = "wss:";
  if (token) parsed.searchParams.set("token", token);
  return parsed.toString();
}

/** The WebSocket transport; `WebSocketImpl` defaults to the global one. */
export function webSocketTransport(WebSocketImpl?: WebSocketConstructor): TransportFactory {
  return (context, handlers) => {
    const Impl =
      WebSocketImpl ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (Impl === undefined) throw new TypeError("no WebSocket implementation: pass options.WebSocket");
    const url = socketUrl(context.url, context.token);
    const ws =
      context.protocols === undefined ? new Impl(url) : new Impl(url, context.protocols);
    let opened = false;
    ws.onopen = () => {
      opened = true;
      handlers.open();
    };
    ws.onmessage = (event) => handlers.message(event.data);
    ws.onclose = (event) => handlers.close({ code: event.code, reason: event.reason, opened });
    // Browsers hide the reason of a failed connection; the close event that
    // follows carries everything there is to know.
    ws.onerror = () => {};
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
      },
    };
  };
}

type EventSourceLike = {
  readonly readyState: number;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onerror: ((event: unknown) => void) | null;
  close(): void;
};

export type EventSourceConstructor = new (url: string) => EventSourceLike;

const ES_OPEN = 1;

/**
 * The gateway's SSE URL for a WebSocket URL: http(s) scheme, `/ws` becomes
 * `/sse`, the channels (and where durable ones resume) in the query.
 */
export function sseUrl(url: string, token: string | undefined, channels: ChannelRequest[]): string {
  const base = (globalThis as { location?: { href: string } }).location?.href;
  const parsed = new URL(url, base);
  if (parsed.protocol === "ws:") parsed.protocol = "http:";
  else if (parsed.protocol === "wss:") parsed.protocol = "https:";
  if (parsed.pathname.endsWith("/ws")) parsed.pathname = `${parsed.pathname.slice(0, -3)}/sse`;
  else if (!parsed.pathname.endsWith("/sse")) {
    parsed.pathname = `${parsed.pathname.replace(/\/$/, "")}/sse`;
  }
  const names = channels.map((c) => (typeof c === "string" ? c : c.channel));
  parsed.searchParams.set("channels", names.join(","));
  for (const c of channels) {
    if (typeof c !== "string" && c.since !== undefined && c.since !== null) {
      parsed.searchParams.append("since", `${c.channel}@${c.since}`);
    }
  }
  if (token) parsed.searchParams.set("token", token);
  return parsed.toString();
}

function nameOf(c: ChannelRequest): string {
  return typeof c === "string" ? c : c.channel;
}

/**
 * The Server-Sent Events transport; `EventSourceImpl` defaults to the global.
 *
 * A stream's channels are fixed when it connects. Requests are answered here
 * from what the stream says: `subscribe` of names the stream carries gets the
 * stream's own `subscribed` state (or its `forbidden` error) as its reply;
 * `subscribe` of a name it does not carry ends the stream (close code 1012,
 * reason "resubscribe") so that the client reconnects with the new set;
 * `unsubscribe` and `ping` are answered at once. The EventSource's own
 * reconnects are not used: an error ends the transport and the client
 * reconnects with its backoff, passing each durable channel's offset.
 */
export function sseTransport(EventSourceImpl?: EventSourceConstructor): TransportFactory {
  return (context, handlers) => {
    const Impl =
      EventSourceImpl ?? (globalThis as { EventSource?: EventSourceConstructor }).EventSource;
    if (Impl === undefined) throw new TypeError("no EventSource implementation");
    const carried = new Set(context.channels.map(nameOf));
    const es = new Impl(sseUrl(context.url, context.token, context.channels));
    let opened = false;
    let closed = false;
    // What the stream said of each name: its state, or the error refusing it.
    let states: Map<string, Record<string, unknown>> | null = null;
    const refused = new Map<string, Record<string, unknown>>();
    const waiting: { requestId: unknown; names: string[] }[] = [];

    const deliver = (frame: Record<string, unknown>) => handlers.message(JSON.stringify(frame));
    const answer = (requestId: unknown, names: string[]) => {
      const no = names.find((n) => refused.has(n));
      if (no !== undefined) {
        deliver({ ...(refused.get(no) as Record<string, unknown>), requestId });
        return;
      }
      const subscriptions = names.map((n) => states?.get(n) ?? { channel: n, live: false });
      deliver({ type: "subscribed", requestId, channels: names, subscriptions });
    };
    const finish = (code: number, reason: string) => {
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
      let frame: Record<string, unknown>;
      try {
        frame = JSON.parse(event.data) as Record<string, unknown>;
      } catch {
        handlers.message(event.data);
        return;
      }
      if (frame.type === "error" && frame.code === "forbidden" && typeof frame.channel === "string") {
        // Answered to the subscribe request that names it.
        refused.set(frame.channel, frame);
        const name = frame.channel;
        for (const w of waiting.filter((w) => w.names.includes(name))) {
          waiting.splice(waiting.indexOf(w), 1);
          answer(w.requestId, w.names);
        }
        return;
      }
      if (frame.type === "subscribed" && states === null && frame.requestId === undefined) {
        states = new Map();
        for (const state of (frame.subscriptions as Record<string, unknown>[]) ?? []) {
          const key = (state.pattern ?? state.channel) as string;
          states.set(key, state);
        }
        for (const w of waiting.splice(0)) answer(w.requestId, w.names);
        return;
      }
      handlers.message(event.data);
    };
    // Network errors and refusals (EventSource hides the status) alike.
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
            // A new channel: only a new stream can carry it.
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
          // The stream keeps carrying them until it reconnects; the client
          // ignores what it no longer wants.
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
        // The client asked for it: the close is reported as a WebSocket's is.
        setTimeout(() => handlers.close({ code: 1000, reason: "", opened }), 0);
      },
    };
  };
}
