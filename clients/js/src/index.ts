export {
  backoffDelay,
  type ClientEvents,
  type ConnectionState,
  type ErrorContext,
  type FallbackEvent,
  type Gap,
  GatewayClient,
  type GatewayClientOptions,
  type Handler,
  isPattern,
  type Message,
  type StateInfo,
  type SubscribeOptions,
  type SubscriptionInfo,
  type SubscriptionStatus,
  type Unsubscribe,
} from "./client";
export { type ClientErrorCode, GatewayError, type GatewayErrorCode, isGatewayError } from "./errors";
export type * from "./frames";
export {
  type EventSourceConstructor,
  socketUrl,
  sseTransport,
  sseUrl,
  type Transport,
  type TransportCloseEvent,
  type TransportContext,
  type TransportFactory,
  type TransportHandlers,
  type WebSocketConstructor,
  webSocketTransport,
} from "./transport";
export * from "./wire";
