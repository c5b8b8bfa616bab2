// Browser tests of the web console: a real `blockvault serve` (plain HTTP on
// 127.0.0.1) over a fresh data dir with a real vault and real qemu-img images, driven
// by Debian's chromium through playwright-core.
//
//   cd console && npm ci && node tests/console.mjs
//
// BLOCKVAULT_BIN: the binary (default ../target/debug/blockvault; `cargo build` first).
// CHROMIUM: the browser (default /usr/bin/chromium).
// Screenshots of every main view go to ../target/console-screenshots/.
// BLOCKVAULT_CONSOLE_BACKUPS=N (default 1000): backups put in a second catalog to time
// the dashboard's load.

import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, mkdirSync, readFileSync, writeFileSync, readdirSync, existsSync, statSync, rmSync } from "node:fs";
import { createInterface } from "node:readline";
import { connect } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import assert from "node:assert/strict";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, "../..");
const BIN = process.env.BLOCKVAULT_BIN || join(repo, "target/debug/blockvault");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const SHOTS = join(repo, "target/console-screenshots");
const DEADLINE = 120_000;
mkdirSync(SHOTS, { recursive: true });

const work = mkdtempSync(join(tmpdir(), "bv-console-"));
const data = join(work, "data");
// The API only reaches host paths under [paths] (the defaults are inside the data dir):
// this test's images, restores and the nbdkit socket live in `work`.
const config = join(work, "serve.toml");
// One webhook target (to a closed loopback port: every delivery fails and waits for its
// retry): the alerts view shows its host and "signed", never its secret or its URL's
// path, and the drill_failed delivery with its state, attempts and error.
const HOOK_SECRET = "console-test-signing-secret";
writeFileSync(
  config,
  `[paths]\nsources = ["${work}"]\nrestore_to = ["${work}"]\n` +
    `[instant]\ntls = true\n` +
    `[alerts]\nallowed_hosts = ["127.0.0.1"]\nretry_seconds = [600]\n` +
    `[[alerts.webhook]]\nurl = "http://127.0.0.1:9/hooks/PATH-TOKEN"\nevents = ["vault_full", "drill_failed"]\nsecret = "${HOOK_SECRET}"\n`,
);
const children = [];
process.on("exit", () => {
  for (const c of children) c.kill("SIGTERM");
});

function bv(...args) {
  return execFileSync(BIN, ["--data", data, "--quiet", ...args], { encoding: "utf8" });
}
function tokenOf(role, name) {
  return bv("token", "create", "--role", role, "--name", name).trim().split("\n").pop().trim();
}

/** Start `serve` on `dataDir`; resolves with its URL once it prints its ready line. */
function serve(dataDir) {
  const c = spawn(BIN, ["--data", dataDir, "--quiet", "serve", "--config", config, "--listen", "127.0.0.1:0", "--plain-http"], {
    stdio: ["ignore", "pipe", "inherit"],
  });
  children.push(c);
  return new Promise((ok, fail) => {
    const rl = createInterface({ input: c.stdout });
    rl.once("line", (l) => {
      const m = l.match(/listening on (\S+)/);
      m ? ok({ url: m[1], child: c }) : fail(new Error(`not a ready line: ${l}`));
    });
    c.once("exit", (code) => fail(new Error(`serve exited ${code}`)));
  });
}

const results = [];
async function step(name, f) {
  const t0 = Date.now();
  try {
    await f();
    results.push(["ok", name, Date.now() - t0]);
    console.log(`ok   ${name} (${Date.now() - t0} ms)`);
  } catch (e) {
    results.push(["FAIL", name]);
    console.log(`FAIL ${name}\n${e.stack}`);
    throw e;
  }
}

// ---- fixtures: a vault, a qcow2 image with data, a slow NBD source ----
bv("vault", "create", "v");
const admin = tokenOf("admin", "root");
const auditor = tokenOf("auditor", "watcher");
const src = join(work, "web.qcow2");
execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", src, "64M"]);
execFileSync("qemu-io", ["-f", "qcow2", "-c", "write -P 0x5a 0 3M", "-c", "write -P 0xa7 40M 1M", "-c", "write -P 0x11 63M 64k", src], { stdio: "ignore" });
const sock = join(work, "slow.sock");
const nbdkit = spawn("nbdkit", ["-f", "-U", sock, "--filter=delay", "pattern", "size=2G", "delay-read=500ms"], { stdio: "ignore" });
children.push(nbdkit);

const { url } = await serve(data);
// A fresh profile each run (chromium hangs on the closed network otherwise).
const browser = await chromium.launchPersistentContext(mkdtempSync(join(work, "chromium-")), {
  executablePath: CHROMIUM,
  headless: true,
  viewport: { width: 1280, height: 800 },
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
const page = await browser.newPage();
page.setDefaultTimeout(DEADLINE);
page.on("dialog", (d) => d.accept());

async function login(t) {
  await page.goto(url + "/");
  await page.getByLabel("API token").fill(t);
  await page.getByRole("button", { name: "Log in" }).click();
}
async function view(name) {
  await page.locator(`nav a[data-view="${name}"]`).click();
  await page.locator(`main [data-view="${name}"]`).waitFor();
}
/** No horizontal scroll bar at 1280×800: the layout holds. */
async function fits() {
  const w = await page.evaluate(() => document.documentElement.scrollWidth);
  assert.ok(w <= 1280, `page is ${w} px wide at 1280×800`);
}
async function shot(name) {
  await fits();
  await page.screenshot({ path: join(SHOTS, `${name}.png`), fullPage: true });
}
/** Wait on the task detail of the current page until its state is `want`. */
async function taskEnds(want) {
  const badge = page.locator("section[aria-label^='task'] [data-state]");
  await page.waitForFunction(
    (w) => ["succeeded", "failed", "cancelled"].includes(document.querySelector("section[aria-label^='task'] [data-state]")?.getAttribute("data-state")),
    want,
    { timeout: DEADLINE },
  );
  const state = await badge.getAttribute("data-state");
  const log = await page.locator("pre.log").textContent();
  const err = await page.locator("section[aria-label^='task'] p.error").allTextContents();
  assert.equal(state, want, `task ended ${state}: ${err} ${log}`);
}

try {
  await step("a wrong token shows a clear message and nothing else", async () => {
    await login("not-a-token");
    await page.locator("#login-error", { hasText: "not known to the appliance" }).waitFor();
    assert.equal(await page.locator("nav").count(), 0);
    await shot("login-refused");
  });

  await step("an admin logs in; the token stays out of the URL and in sessionStorage", async () => {
    await login(admin);
    await page.locator("#who", { hasText: "root (admin)" }).waitFor();
    assert.ok(!page.url().includes(admin));
    assert.equal(await page.evaluate(() => sessionStorage.getItem("blockvault.token")), admin);
    await shot("dashboard-empty");
  });

  await step("create a resource and a policy whose cron shows its next 5 runs", async () => {
    await view("resources");
    const f = page.locator("form[aria-label=resource]");
    await f.getByLabel("Name").fill("web");
    await f.locator("[name=sources]").fill(src);
    await f.getByRole("button", { name: "Save resource" }).click();
    await page.locator("main td", { hasText: src }).waitFor();
    await f.getByLabel("Name").fill("slow");
    await f.locator("[name=sources]").fill(`nbd+unix:///?socket=${sock}`);
    await f.getByRole("button", { name: "Save resource" }).click();
    await page.locator("main td", { hasText: "slow.sock" }).waitFor();
    await shot("resources");
    await view("policies");
    const p = page.locator("form[aria-label=policy]");
    await p.getByLabel("Name").fill("nightly");
    await p.locator("[name=schedule]").fill("30 1 * * *");
    await page.waitForFunction(() => document.querySelectorAll("ol.next-runs li").length === 5 && !document.querySelector("ol.next-runs .error"));
    await p.locator("[name=resources]").fill("web");
    await p.getByRole("button", { name: "Save policy" }).click();
    await page.locator("main td", { hasText: "nightly" }).waitFor();
    const api = await (await fetch(`${url}/api/v1/policies/nightly`, { headers: { Authorization: `Bearer ${admin}` } })).json();
    assert.equal(api.schedule, "30 1 * * *");
    assert.deepEqual(api.resources, ["web"]);
    const next = await (await fetch(`${url}/api/v1/schedules/next?cron=30%201%20*%20*%20*`, { headers: { Authorization: `Bearer ${admin}` } })).json();
    assert.equal(next.next.length, 5);
    assert.ok(next.next.every((t) => /T01:30:00Z$/.test(t)), JSON.stringify(next));
    await shot("policies");
  });

  await step("a one-off backup's progress reaches 100 % in the task view", async () => {
    await view("resources");
    await page.locator("tr", { hasText: "web.qcow2" }).getByRole("button", { name: "Back up now" }).click();
    await page.locator("main [data-view=tasks]").waitFor();
    await taskEnds("succeeded");
    await page.locator("section[aria-label^='task'] .pct", { hasText: "100 %" }).waitFor();
    await shot("task-backup");
  });

  await step("restore it into a qcow2 from the UI; qemu-img compare finds it equal", async () => {
    await view("backups");
    await page.locator("tbody tr", { hasText: "web" }).first().getByRole("button", { name: "Restore" }).click();
    const out = join(work, "restored.qcow2");
    const f = page.locator("form[aria-label^=restore]");
    await f.getByLabel("Target path").fill(out);
    await f.getByLabel("Format").selectOption("qcow2");
    await shot("backups-restore");
    await f.getByRole("button", { name: "Start restore" }).click();
    await page.locator("main [data-view=tasks]").waitFor();
    await taskEnds("succeeded");
    const info = JSON.parse(execFileSync("qemu-img", ["info", "--output=json", out], { encoding: "utf8" }));
    assert.equal(info.format, "qcow2");
    execFileSync("qemu-img", ["compare", "-f", "qcow2", "-F", "qcow2", src, out]);
  });

  await step("instant access from a backup's row over NBD-TLS: the shown command (Copy) reads it byte-exact; Stop closes its port", async () => {
    await view("backups");
    await page.locator("tbody tr", { hasText: "web" }).first().getByRole("button", { name: "Instant access" }).click();
    const panel = page.locator("section[aria-label^='instant access']");
    const code = panel.locator("code[data-uri]");
    await code.waitFor();
    const uri = await code.getAttribute("data-uri");
    assert.match(uri, /^nbds:\/\/127\.0\.0\.1:\d+\/[0-9a-f]{32}$/);
    const listed = await (await fetch(`${url}/api/v1/instant`, { headers: { Authorization: `Bearer ${admin}` } })).json();
    const e = listed.find((x) => x.uri === uri);
    assert.ok(e, `${uri} is not in GET /instant`);
    assert.equal(await panel.locator("code[data-fingerprint]").textContent(), e.tls.fingerprint);
    assert.equal(await panel.locator("pre[data-command]").textContent(), e.command);
    await browser.grantPermissions(["clipboard-read", "clipboard-write"], { origin: url });
    await panel.getByRole("button", { name: "Copy" }).click();
    await page.locator(".flash", { hasText: "Command copied" }).waitFor();
    const copied = await page.evaluate(() => navigator.clipboard.readText());
    assert.equal(copied, e.command);
    await shot("backups-instant");
    // The copied command, run as it is in a fresh dir, copies the disk out over TLS.
    const client = mkdtempSync(join(work, "client-"));
    execFileSync("sh", ["-c", copied], { cwd: client, stdio: "ignore" });
    execFileSync("qemu-img", ["compare", "-f", "qcow2", "-F", "qcow2", src, join(client, "copy.qcow2")]);
    rmSync(client, { recursive: true, force: true });
    await view("instant");
    const row = page.locator("tbody tr", { hasText: uri });
    await row.locator(".badge", { hasText: "running" }).waitFor();
    const how = page.locator(`details[data-export="${e.id}"]`);
    await how.locator("summary").click();
    assert.equal(await how.locator("pre[data-command]").textContent(), e.command);
    assert.equal(await how.locator("code[data-fingerprint]").textContent(), e.tls.fingerprint);
    await shot("instant");
    await row.getByRole("button", { name: "Stop" }).click();
    await page.locator(".flash", { hasText: "Stopped instant access" }).waitFor();
    await page.locator("main [data-view=instant] .empty").waitFor();
    const left = await (await fetch(`${url}/api/v1/instant`, { headers: { Authorization: `Bearer ${admin}` } })).json();
    assert.deepEqual(left, []);
    const [host, port] = uri.replace(/^nbds?:\/\//, "").split("/")[0].split(":");
    const open = await new Promise((ok) => {
      const s = connect({ host, port: Number(port) });
      s.once("connect", () => (s.destroy(), ok(true)));
      s.once("error", () => ok(false));
    });
    assert.equal(open, false, `${uri} still accepts connections after Stop`);
  });

  await step("cancel a running backup (nbdkit with the delay filter)", async () => {
    await view("resources");
    await page.locator("tr", { hasText: "slow.sock" }).getByRole("button", { name: "Back up now" }).click();
    await page.locator("main [data-view=tasks]").waitFor();
    const row = page.locator("tbody tr", { hasText: "slow" }).filter({ hasText: "running" });
    await row.getByRole("button", { name: "Cancel" }).click();
    await taskEnds("cancelled");
    const bks = await (await fetch(`${url}/api/v1/backups?resource=slow`, { headers: { Authorization: `Bearer ${admin}` } })).json();
    assert.deepEqual(bks, [], "a cancelled backup leaves no backup");
    await shot("tasks");
  });

  await step("dashboard, vaults, tokens and audit views render for the admin", async () => {
    await view("dashboard");
    await page.locator("[data-rpo=web]", { hasText: "ok" }).waitFor();
    await page.locator("[data-rpo=slow]", { hasText: "no policy" }).waitFor();
    await shot("dashboard");
    await view("backups");
    await shot("backups");
    // Keyboard: Tab to the first action button of the list; polling keeps refreshing the
    // view (two more polling ticks seen) without taking the focus away.
    await page.locator("tbody button").first().focus();
    await page.keyboard.press("Tab");
    const seen = Number(await page.locator("main").getAttribute("data-polls"));
    await page.waitForFunction((n) => Number(document.querySelector("main").dataset.polls) >= n + 2, seen);
    assert.equal(await page.evaluate(() => document.activeElement?.textContent), "Instant access");
    await view("vaults");
    await page.locator("main td", { hasText: "v" }).first().waitFor();
    await shot("vaults");
    await view("tokens");
    await page.locator("main td", { hasText: "watcher" }).waitFor();
    await shot("tokens");
    await view("audit");
    await page.locator("main td", { hasText: "/api/v1/restores" }).first().waitFor();
    await shot("audit");
  });

  await step("lock a backup until a date; an earlier date is refused with the 409 message and changes nothing", async () => {
    await view("backups");
    const row = page.locator("tbody tr", { hasText: "web" }).first();
    await row.getByRole("button", { name: "Lock…" }).click();
    let f = page.locator("form[aria-label^=lock]");
    await f.getByLabel("Lock until").fill("2030-01-01");
    await f.getByRole("button", { name: "Lock" }).click();
    await page.locator(".flash", { hasText: "is locked until 2030-01-01" }).waitFor();
    await row.getByRole("button", { name: "Lock…" }).click();
    f = page.locator("form[aria-label^=lock]");
    await f.locator("[data-lock]", { hasText: "Locked until 2030-01-01" }).waitFor();
    await f.getByLabel("Lock until").fill("2029-01-01");
    await f.getByRole("button", { name: "Lock" }).click();
    await f.locator("[role=alert]", { hasText: "Refused:" }).waitFor();
    await shot("backups-lock-refused");
    const bks = await (await fetch(`${url}/api/v1/backups?resource=web`, { headers: { Authorization: `Bearer ${admin}` } })).json();
    const locks = [];
    for (const b of bks) {
      const d = await (await fetch(`${url}/api/v1/backups/${b.id}`, { headers: { Authorization: `Bearer ${admin}` } })).json();
      if (d.locked_until) locks.push(d.locked_until);
    }
    assert.equal(locks.length, 1);
    assert.ok(locks[0].startsWith("2030-01-01"), `the lock is still 2030-01-01: ${locks[0]}`);
    await f.getByRole("button", { name: "Close" }).click();
  });

  await step("a recorded drill shows on the dashboard; the alerts view renders", async () => {
    // A real drill through the appliance (CLI in remote mode), bounded to a few seconds:
    // the test image boots nothing, so the drill is recorded as failed.
    try {
      execFileSync(BIN, ["--quiet", "drill", "latest", "--disk", "web", "--server", url, "--token", admin, "--timeout", "3", "--accel", "tcg", "--memory", "64"], {
        stdio: "ignore",
      });
      assert.fail("a drill of a blank disk passed");
    } catch (e) {
      assert.notEqual(e.status, 0, String(e));
    }
    await view("dashboard");
    await page.locator("main tr", { hasText: "web" }).locator(".badge.failed", { hasText: "drill failed" }).waitFor();
    await shot("dashboard-drill");
    // The drills view: the last drill per resource, its screenshot served by the API.
    await view("drills");
    await page.locator("[data-drill=web]", { hasText: "failed" }).waitFor();
    await page.locator("main tr", { hasText: "web" }).getByRole("button", { name: "Screenshot" }).click();
    const img = page.locator("img[data-screenshot=web]");
    await img.waitFor();
    await page.waitForFunction(() => document.querySelector("img[data-screenshot=web]")?.naturalWidth > 0);
    const res = await (await fetch(`${url}/api/v1/resources/web`, { headers: { Authorization: `Bearer ${auditor}` } })).json();
    const png = Buffer.from(await (await fetch(`${url}/api/v1/backups/${res.last_drill.backup}/drill/screenshot`, { headers: { Authorization: `Bearer ${auditor}` } })).arrayBuffer());
    assert.equal(png.subarray(1, 4).toString(), "PNG", "the screenshot route serves a PNG");
    await shot("drills");
    // A drill policy made in the view exists in the API as kind "drill".
    const f = page.locator("form[aria-label='drill policy']");
    await f.getByLabel("Name").fill("weekly-drill");
    await f.locator("[name=resources]").fill("web");
    await f.getByRole("button", { name: "Save drill policy" }).click();
    await page.locator(".flash", { hasText: "Drill policy weekly-drill created" }).waitFor();
    await page.locator("main td", { hasText: "weekly-drill" }).waitFor();
    const dp = await (await fetch(`${url}/api/v1/policies/weekly-drill`, { headers: { Authorization: `Bearer ${admin}` } })).json();
    assert.equal(dp.kind, "drill", JSON.stringify(dp));
    assert.deepEqual(dp.resources, ["web"]);
    await view("alerts");
    await page.locator("main [data-view=alerts] table, main [data-view=alerts] .empty").first().waitFor();
    const hook = page.locator("main tr", { has: page.locator("[data-webhook='127.0.0.1']") });
    await hook.locator(".badge", { hasText: "signed" }).waitFor();
    await hook.locator("td", { hasText: "vault_full" }).waitFor();
    // The failed drill's alert went to the outbox; its delivery (to a closed port) shows
    // up by polling, pending its retry, with its attempt and the connection error.
    const delivery = page.locator("main tr", { has: page.locator("[data-delivery-kind=drill_failed]") });
    await delivery.locator("td:nth-child(7)", { hasText: /\S/ }).waitFor({ timeout: DEADLINE });
    await delivery.locator(".badge", { hasText: "pending" }).waitFor();
    await delivery.locator("td", { hasText: "http://127.0.0.1:9" }).waitFor();
    assert.equal((await delivery.locator("td").nth(4).textContent()).trim(), "1", "one attempt so far");
    const text = await page.locator("main").textContent();
    assert.ok(!text.includes(HOOK_SECRET) && !text.includes("PATH-TOKEN"), "the alerts view shows no secret and no URL path");
    const raw = await (await fetch(`${url}/api/v1/webhooks`, { headers: { Authorization: `Bearer ${auditor}` } })).text();
    assert.ok(!raw.includes(HOOK_SECRET) && !raw.includes("PATH-TOKEN"), raw);
    await shot("alerts");
  });

  await step("an auditor sees read-only views; a direct API call from the page gets 403", async () => {
    await page.getByRole("button", { name: "Log out" }).click();
    await login(auditor);
    await page.locator("#who", { hasText: "watcher (auditor)" }).waitFor();
    assert.equal(await page.locator("nav a[data-view=tokens]").count(), 0);
    for (const v of ["dashboard", "backups", "tasks", "instant", "drills", "resources", "policies", "vaults", "audit", "alerts"]) {
      await view(v);
      // The view has drawn its data (a table or its "nothing yet" line) before we look.
      await page.locator(`main [data-view="${v}"] table, main [data-view="${v}"] .empty`).first().waitFor();
      const buttons = await page.locator("main button").allTextContents();
      const allowed = ["Log", "Preview retention", "Screenshot"];
      assert.deepEqual(buttons.filter((b) => !allowed.includes(b)), [], `auditor sees buttons on ${v}: ${buttons}`);
      assert.equal(await page.locator("main form[aria-label=resource], main form[aria-label=policy], main form[aria-label=vault]").count(), 0);
    }
    await shot("auditor-backups");
    const before = (await (await fetch(`${url}/api/v1/backups`, { headers: { Authorization: `Bearer ${admin}` } })).json()).length;
    const status = await page.evaluate(async () => {
      const r = await fetch("/api/v1/backups", {
        method: "POST",
        headers: { Authorization: `Bearer ${sessionStorage.getItem("blockvault.token")}`, "Content-Type": "application/json" },
        body: JSON.stringify({ resource: "web" }),
      });
      return r.status;
    });
    assert.equal(status, 403);
    const tasks = await (await fetch(`${url}/api/v1/tasks`, { headers: { Authorization: `Bearer ${admin}` } })).json();
    assert.equal(tasks.filter((t) => t.kind === "backup").length, 2, "the refused call queued nothing");
    const after = (await (await fetch(`${url}/api/v1/backups`, { headers: { Authorization: `Bearer ${admin}` } })).json()).length;
    assert.equal(after, before);
  });

  await step("the bundle is small and served from the binary with no CDN", async () => {
    const html = await (await fetch(url + "/")).text();
    assert.ok(!/https?:\/\//.test(html), "no remote URL in index.html");
    let total = 0;
    for (const f of readdirSync(join(here, "../dist"))) total += statSync(join(here, "../dist", f)).size;
    console.log(`     bundle: ${total} bytes in console/dist`);
  });

  const n = Number(process.env.BLOCKVAULT_CONSOLE_BACKUPS || 1000);
  await step(`dashboard load time with ${n} backups in the catalog`, async () => {
    // One real backup's manifest copied under n ids, then `vault rescan` reads them into
    // a second data dir's catalog (they share their chunks, as incrementals would).
    const d2 = join(work, "data2");
    execFileSync(BIN, ["--data", d2, "--quiet", "vault", "create", "v"]);
    const vdir = join(data, "vaults", "v", "backups");
    const [dir] = readdirSync(vdir).filter((d) => d.startsWith("web"));
    const [file] = readdirSync(join(vdir, dir));
    const m = JSON.parse(readFileSync(join(vdir, dir, file), "utf8"));
    execFileSync("cp", ["-r", join(data, "vaults", "v", "packs"), join(d2, "vaults", "v")]);
    const vt = readFileSync(join(data, "vaults", "v", "vault.toml"));
    writeFileSync(join(d2, "vaults", "v", "vault.toml"), vt);
    mkdirSync(join(d2, "vaults", "v", "backups", dir), { recursive: true });
    const t0 = Date.parse(m.created);
    for (let i = 0; i < n; i++) {
      const c = new Date(t0 - i * 3600_000).toISOString().replace(/\.\d+Z$/, "Z");
      const id = `${c.replace(/[-:]/g, "").slice(0, 15)}-${String(i).padStart(8, "0")}`;
      writeFileSync(join(vdir.replace(data, d2), dir, `${id}.json`), JSON.stringify({ ...m, id, name: `bk_${i}`, created: c }));
    }
    execFileSync(BIN, ["--data", d2, "--quiet", "vault", "rescan", "v"]);
    const t2 = execFileSync(BIN, ["--data", d2, "--quiet", "token", "create", "--role", "auditor", "--name", "w"], { encoding: "utf8" }).trim().split("\n").pop().trim();
    const a2 = execFileSync(BIN, ["--data", d2, "--quiet", "token", "create", "--role", "admin", "--name", "a"], { encoding: "utf8" }).trim().split("\n").pop().trim();
    const s2 = await serve(d2);
    const made = await fetch(`${s2.url}/api/v1/resources`, {
      method: "POST",
      headers: { Authorization: `Bearer ${a2}`, "Content-Type": "application/json" },
      body: JSON.stringify({ name: "web", kind: "disk", sources: [src], vault: "v" }),
    });
    assert.equal(made.status, 201, await made.text());
    const p2 = await page.context().newPage();
    const t = Date.now();
    await p2.goto(s2.url + "/");
    await p2.getByLabel("API token").fill(t2);
    const started = Date.now();
    await p2.getByRole("button", { name: "Log in" }).click();
    await p2.locator("[data-rpo=web]").waitFor();
    const ms = Date.now() - started;
    const list = await (await fetch(`${s2.url}/api/v1/backups`, { headers: { Authorization: `Bearer ${t2}` } })).json();
    assert.equal(list.length, n);
    console.log(`     dashboard with ${n} backups: ${ms} ms from "Log in" to the resource table (page load ${started - t} ms)`);
    await p2.screenshot({ path: join(SHOTS, "dashboard-1000.png"), fullPage: true });
    s2.child.kill("SIGTERM");
  });
} finally {
  await browser.close();
  for (const c of children) c.kill("SIGTERM");
}
const failed = results.filter((r) => r[0] !== "ok");
console.log(`${results.length - failed.length} passed, ${failed.length} failed; screenshots in ${SHOTS}`);
rmSync(work, { recursive: true, force: true });
process.exit(failed.length ? 1 : 0);
