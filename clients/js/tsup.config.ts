import { defineConfig } from "tsup";

export default defineConfig({
  entry: { index: "src/index.ts", react: "src/react.ts" },
  format: ["esm", "cjs"],
  dts: true,
  // One shared chunk for both entries, in both formats: the React entry must
  // use the same GatewayClient and GatewayError classes as the main one, or
  // `instanceof` would fail across them.
  splitting: true,
  clean: true,
  target: "es2020",
  platform: "neutral",
  external: ["react"],
  sourcemap: false,
});
