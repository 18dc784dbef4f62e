// A small React app built on the packed npm package, as an application would
// use it: one provider, a hook per channel, typed errors. The test reads the
// data-* attributes.
import { StrictMode, useState } from "react";
import { createRoot } from "react-dom/client";
import { type Gap, GatewayError, isGatewayError } from "@redis-ws-gateway/client";
import { GatewayProvider, useGatewayChannel, useGatewayState } from "@redis-ws-gateway/client/react";

declare global {
  interface Window {
    gaps: Gap[];
    errors: [string, string | null][];
  }
}
window.gaps = [];
window.errors = [];

const params = new URLSearchParams(location.search);
const gatewayUrl = params.get("gw") ?? "/ws";
const token = params.get("token") ?? undefined;
const channels = (params.get("channels") ?? "").split(",").filter(Boolean);

type Seen = { data: unknown; seq: number | null; offset: string | null; replay: boolean };

function Channel({ name }: { name: string }) {
  const [seen, setSeen] = useState<Seen[]>([]);
  const channel = useGatewayChannel<{ i?: number; ltp?: number }>(name, {
    onMessage: (data, msg) =>
      setSeen((before) => [
        ...before,
        { data, seq: msg.seq ?? null, offset: msg.offset ?? null, replay: msg.replay === true },
      ]),
  });
  const error = channel.error;
  return (
    <section
      className="channel"
      data-channel={name}
      data-status={channel.status}
      data-epoch={channel.epoch ?? ""}
      data-offset={channel.offset ?? ""}
      data-count={channel.count}
      data-gaps={channel.gaps}
      data-error={error?.code ?? ""}
      data-typed={String(error instanceof GatewayError && isGatewayError(error, "forbidden"))}
    >
      <h2>{name}</h2>
      <span className="status">{channel.status}</span>
      {error ? <span className="error">{error.code}</span> : null}
      <span className="latest">{JSON.stringify(channel.data ?? null)}</span>
      <ol className="seen">
        {seen.map((m, index) => (
          <li key={index} data-replay={String(m.replay)}>
            {JSON.stringify(m.data)}
          </li>
        ))}
      </ol>
    </section>
  );
}

function Connection() {
  const state = useGatewayState();
  return (
    <div id="state" data-state={state}>
      {state}
    </div>
  );
}

function App() {
  return (
    <GatewayProvider
      url={gatewayUrl}
      options={{
        token,
        reconnect: { minDelayMs: 50, maxDelayMs: 400 },
        onGap: (gap) => window.gaps.push(gap),
        onError: (error, context) =>
          window.errors.push([(error as GatewayError).code ?? String(error), context.key ?? null]),
      }}
    >
      <Connection />
      {channels.map((name) => (
        <Channel key={name} name={name} />
      ))}
    </GatewayProvider>
  );
}

createRoot(document.getElementById("root") as HTMLElement).render(
  <StrictMode>
    <App />
  </StrictMode>,
);
