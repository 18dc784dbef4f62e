// Builds the gateway's /client.js from this package's source: one ES module
// with no imports, committed under service/ so that the gateway serves it
// without Node at run time. tests/unit/test_js_bundle.py rebuilds it into a
// temporary file and fails when the committed one differs.
//
//   node scripts/build-static.mjs [--outfile PATH]
import { readFileSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { build } from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const root = resolve(here, "..");
const pkg = JSON.parse(readFileSync(resolve(root, "package.json"), "utf8"));
const args = process.argv.slice(2);
const at = args.indexOf("--outfile");
const outfile =
  at >= 0
    ? resolve(args[at + 1])
    : resolve(root, "../../service/src/redis_ws_gateway/web/static/client.js");

const banner = `/**
 * Browser client for redis-ws-gateway (docs/PROTOCOL.md), as served at
 * /client.js: an ES module with no imports.
 *
 *   import { GatewayClient } from "/client.js";
 *   const client = new GatewayClient("wss://gateway.example/ws", { token });
 *   client.connect();
 *   const off = client.subscribe("market:tick:*", (data, msg) => {});
 *
 * The same client as the npm package ${pkg.name} ${pkg.version}; the API is
 * documented in docs/CLIENT.md. Built from clients/js/src by
 * \`npm run build:static\`: edit the source there, not this file.
 */`;

await build({
  entryPoints: [resolve(root, "src/index.ts")],
  outfile,
  bundle: true,
  format: "esm",
  platform: "browser",
  target: "es2020",
  charset: "utf8",
  legalComments: "none",
  banner: { js: banner },
  logLevel: "warning",
});
