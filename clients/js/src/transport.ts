// How frames get to and from a gateway. The client speaks frames; a transport
// only moves them. The WebSocket is the one transport today. An SSE transport
// (`GET /sse?channels=...`, `Last-Event-ID` for durable resume, frames
// identical in content) fits the same shape: it learns what to subscribe from
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
