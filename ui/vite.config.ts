/// <reference types="vitest/config" />
// Build goes to the Python package (server/static) with relative asset paths, so the same
// files are served by `model-forensics serve` and inlined into the one-file offline report.
import { defineConfig } from "vite";
import react from "@vitejs/plugin-react";

export default defineConfig({
  plugins: [react()],
  base: "./",
  build: {
    outDir: "../src/model_forensics/server/static",
    emptyOutDir: true,
    assetsDir: "assets",
    // One JS and one CSS file: the report inlines them, and nothing is fetched lazily.
    cssCodeSplit: false,
    modulePreload: false,
    rollupOptions: { output: { inlineDynamicImports: true } },
  },
  server: { proxy: { "/api": "http://127.0.0.1:8765" } },
  test: {
    environment: "jsdom",
    globals: true,
    include: ["src/**/*.test.ts", "src/**/*.test.tsx"],
  },
});
