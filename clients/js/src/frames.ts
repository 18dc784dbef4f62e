// The frames of docs/PROTOCOL.md as types. Fields the gateway may add later
// pass through untouched: a client must not break on a field it does not know.
import type { Action, ErrorCode } from "./wire";

/** One subscription as `subscribed`, `resubscribed` and `upstream_lost` describe it. */
export interface SubscriptionState {
  channel?: string;
  pattern?: string;
  epoch?: string;
  seq?: number;
  live?: boolean;
  durable?: boolean;
  offset?: string;
  replayed?: number;
  complete?: boolean;
  snapshot?: boolean;
}

export interface DataFrame<T = unknown> {
  type: "data";
  channel: string;
  pattern?: string;
  /** Absent on replayed history: seq counts live messages only. */
  seq?: number;
  data: T;
  /** "base64" when the payload was not UTF-8; `data` is then the base64 text. */
  encoding?: "base64";
  /** Durable channels: the stream entry ID, where a resume continues from. */
  offset?: string;
  replay?: boolean;
}

export interface ErrorFrame {
  type: "error";
  code: ErrorCode;
  message?: string;
  requestId?: string;
  channel?: string;
}

export interface PongFrame {
  type: "pong";
  requestId?: string;
  time?: number;
}

export interface SubscribedFrame {
  type: "subscribed";
  requestId?: string;
  channels: string[];
  subscriptions: SubscriptionState[];
}

export interface UnsubscribedFrame {
  type: "unsubscribed";
  /** Absent when the server dropped the subscriptions by itself. */
  requestId?: string;
  channels: string[];
  reason?: string;
}

export interface AuthenticatedFrame {
  type: "authenticated";
  requestId?: string;
  user?: string;
  roles?: string[];
  expiresAt?: number;
}

export interface UpstreamLostFrame {
  type: "upstream_lost";
  subscriptions: SubscriptionState[];
}

export interface ResubscribedFrame {
  type: "resubscribed";
  subscriptions: SubscriptionState[];
}

/** Every frame the gateway sends (wire.FRAME_TYPES). */
export type ServerFrame =
  | DataFrame
  | ErrorFrame
  | PongFrame
  | SubscribedFrame
  | UnsubscribedFrame
  | AuthenticatedFrame
  | UpstreamLostFrame
  | ResubscribedFrame;

/** A `channels` entry of a subscribe request. */
export type ChannelRequest = string | { channel: string; since?: string; snapshot?: number };

/** What the client sends. */
export interface ClientFrame {
  action: Action;
  requestId?: string;
  channels?: ChannelRequest[];
  token?: string;
  [field: string]: unknown;
}
