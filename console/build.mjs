// Deterministic build of dist/: one ES module bundle, one stylesheet, index.html.
import { build } from "esbuild";
import { copyFileSync, mkdirSync } from "node:fs";

mkdirSync("dist", { recursive: true });
await build({
  entryPoints: ["src/main.ts"],
  bundle: true,
  format: "esm",
  target: "es2022",
  minify: true,
  legalComments: "none",
  charset: "utf8",
  outfile: "dist/app.js",
});
await build({ entryPoints: ["src/app.css"], minify: true, outfile: "dist/app.css" });
copyFileSync("index.html", "dist/index.html");
