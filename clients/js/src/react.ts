// React bindings: one client per provider, shared by every component below it.
import {
  createContext,
  createElement,
  type ReactNode,
  useCallback,
  useContext,
  useEffect,
  useRef,
  useState,
  useSyncExternalStore,
} from "react";
import {
  type ConnectionState,
  type Gap,
  GatewayClient,
  type GatewayClientOptions,
  type Message,
  type SubscriptionInfo,
  type SubscriptionStatus,
} from "./client";
import { GatewayError } from "./errors";

const GatewayContext = createContext<GatewayClient | null>(null);

export type GatewayProviderProps = {
  children?: ReactNode;
  /** Connect on mount (default). The provider never closes a client it was given. */
  connect?: boolean;
} & (
  | { client: GatewayClient; url?: undefined; options?: undefined }
  | { client?: undefined; url: string; options?: GatewayClientOptions }
);

/**
 * Gives the components below it one GatewayClient: one WebSocket for every
 * subscription, and components subscribed to the same channel share one
 * server-side subscription. With `url` (and `options`) the provider creates
 * the client and closes it on unmount; with `client` the app owns it.
 */
export function GatewayProvider(props: GatewayProviderProps): ReactNode {
  const { client, url, options, connect = true, children } = props;
  // Created once: a new client per render would drop every subscription.
  const [owned] = useState(() =>
    client === undefined ? new GatewayClient(url as string, options) : null,
  );
  const value = client ?? (owned as GatewayClient);
  useEffect(() => {
    if (!connect) return undefined;
    value.connect().catch(() => {
      // Rejects only when closed before opening; the state says so.
    });
    if (value !== owned) return undefined;
    // StrictMode runs this cleanup and the effect again at once: close()
    // keeps the subscriptions, so the second connect() sends them again.
    return () => value.close();
  }, [value, owned, connect]);
  return createElement(GatewayContext.Provider, { value }, children);
}

/** The provider's client, for what the hooks do not cover (ping, request). */
export function useGatewayClient(): GatewayClient {
  const client = useContext(GatewayContext);
  if (client === null) throw new Error("useGatewayClient: no <GatewayProvider> above this component");
  return client;
}

/** The connection state, re-rendering on every change. */
export function useGatewayState(): ConnectionState {
  const client = useGatewayClient();
  // A new subscribe function per render would make React resubscribe each time.
  const subscribe = useCallback((listener: () => void) => client.on("state", listener), [client]);
  const snapshot = useCallback(() => client.state, [client]);
  return useSyncExternalStore(subscribe, snapshot, snapshot);
}

export interface UseGatewayChannelOptions<T> {
  /** Durable channels: start after this offset (`"0"`: the whole history). */
  since?: string | null;
  /**
   * Called for every message, in order: for views that must see each one
   * (an order blotter). The returned state holds only the newest.
   */
  onMessage?: (data: T, msg: Message<T>) => void;
  /**
   * "frame" (default): state updates at most once per animation frame, so a
   * channel at hundreds of messages a second does not re-render as often.
   * "none": one update per message.
   */
  throttle?: "frame" | "none";
}

export interface GatewayChannelState<T> {
  /** The newest message's payload (undefined until one arrived). */
  data: T | undefined;
  message: Message<T> | null;
  /** Messages received on this subscription since it was mounted. */
  count: number;
  /** "idle" without a channel; "failed" with `error` set when the server refused it. */
  status: SubscriptionStatus | "idle";
  /** The subscription's epoch: a change means a new life upstream (see PROTOCOL.md). */
  epoch: string | null;
  /** The last gap seen, with `gaps` counting them: messages were lost. */
  gap: Gap | null;
  gaps: number;
  /** Durable channels: the last offset seen, where a resume continues. */
  offset: string | undefined;
  /** Why the subscription failed: `error.code` is "forbidden", "bad_channel", ... */
  error: GatewayError | null;
}

type Live<T> = Omit<GatewayChannelState<T>, "status" | "epoch" | "offset">;

const EMPTY: Live<never> = { data: undefined, message: null, count: 0, gap: null, gaps: 0, error: null };

const schedule: (callback: () => void) => () => void =
  typeof requestAnimationFrame === "function"
    ? (callback) => {
        const id = requestAnimationFrame(callback);
        return () => cancelAnimationFrame(id);
      }
    : (callback) => {
        const id = setTimeout(callback, 16);
        return () => clearTimeout(id);
      };

/**
 * Subscribe to `channel` (or a pattern) while the component is mounted; the
 * newest message, the subscription's status and any error as state. A falsy
 * channel subscribes to nothing.
 */
export function useGatewayChannel<T = unknown>(
  channel: string | null | undefined,
  options: UseGatewayChannelOptions<T> = {},
): GatewayChannelState<T> {
  const client = useGatewayClient();
  const [live, setLive] = useState<Live<T>>(EMPTY as Live<T>);
  const [info, setInfo] = useState<SubscriptionInfo | null>(null);
  const onMessage = useRef(options.onMessage);
  onMessage.current = options.onMessage;
  const { since, throttle = "frame" } = options;

  useEffect(() => {
    if (!channel) return undefined;
    setLive(EMPTY as Live<T>);
    setInfo(null);
    let latest: Live<T> = EMPTY as Live<T>;
    let cancel: (() => void) | null = null;
    let active = true;
    const flush = () => {
      cancel = null;
      if (active) setLive(latest);
    };
    const unsubscribe = client.subscribe<T>(
      channel,
      (data, msg) => {
        latest = {
          ...latest,
          data,
          message: msg,
          count: latest.count + 1,
          gap: msg.gap ?? latest.gap,
          gaps: latest.gaps + (msg.gap ? 1 : 0),
        };
        onMessage.current?.(data, msg);
        if (throttle === "none") flush();
        else if (cancel === null) cancel = schedule(flush);
      },
      { since },
    );
    const refresh = () => {
      const now = client.subscriptions().find((s) => s.key === channel) ?? null;
      if (!active || now === null) return;
      setInfo((before) =>
        before !== null &&
        before.status === now.status &&
        before.epoch === now.epoch &&
        before.offset === now.offset
          ? before
          : now,
      );
    };
    const offChange = client.on("change", refresh);
    refresh();
    unsubscribe.ready.catch((error: unknown) => {
      if (!active) return;
      const failure =
        error instanceof GatewayError ? error : new GatewayError("bad_frame", String(error));
      latest = { ...latest, error: failure };
      setLive(latest);
    });
    const offError = client.on("error", (error, context) => {
      // The server dropped the subscription by itself (a refreshed token that allows less).
      if (active && context.key === channel && context.action === "unsubscribed") {
        latest = { ...latest, error: error as GatewayError };
        setLive(latest);
      }
    });
    return () => {
      active = false;
      cancel?.();
      offChange();
      offError();
      void unsubscribe();
    };
  }, [client, channel, since, throttle]);

  let status: GatewayChannelState<T>["status"] = channel ? (info?.status ?? "pending") : "idle";
  if (live.error !== null) status = "failed";
  return {
    ...live,
    status,
    epoch: info?.epoch ?? live.message?.epoch ?? null,
    offset: live.message?.offset ?? info?.offset,
  };
}
