// The console's shell: login, navigation by #hash, polling of the shown view.

import { api, ApiError, RANK, Role, setOnUnauthorized, setToken, token } from "./api";
import { field, h, replace } from "./dom";
import { alerts } from "./alerts";
import { instant } from "./instant";
import { drills } from "./drills";
import { audit, policies, resources, tokens, vaults } from "./manage";
import { backups, Ctx, dashboard, tasks, View } from "./views";

const POLL_MS = 2000;

const VIEWS: { hash: string; title: string; view: View; role: Role }[] = [
  { hash: "dashboard", title: "Dashboard", view: dashboard, role: "auditor" },
  { hash: "backups", title: "Backups", view: backups, role: "auditor" },
  { hash: "tasks", title: "Tasks", view: tasks, role: "auditor" },
  { hash: "instant", title: "Instant access", view: instant, role: "auditor" },
  { hash: "resources", title: "Resources", view: resources, role: "auditor" },
  { hash: "policies", title: "Policies", view: policies, role: "auditor" },
  { hash: "drills", title: "Drills", view: drills, role: "auditor" },
  { hash: "vaults", title: "Vaults", view: vaults, role: "auditor" },
  { hash: "tokens", title: "Tokens", view: tokens, role: "admin" },
  { hash: "audit", title: "Audit log", view: audit, role: "auditor" },
  { hash: "alerts", title: "Alerts", view: alerts, role: "auditor" },
];

const app = document.getElementById("app") as HTMLElement;
let timer: number | undefined;
let generation = 0;

function login(message?: string): void {
  window.clearTimeout(timer);
  generation++;
  setToken(null);
  const input = h("input", { name: "token", type: "password", autocomplete: "off", required: true, size: 40 }) as HTMLInputElement;
  const msg = h("p", { class: "error", role: "alert", id: "login-error" }, message ?? "");
  const form = h(
    "form",
    { class: "login card", "aria-label": "log in" },
    h("h1", {}, "blockvault"),
    field("API token", input),
    h("button", { type: "submit" }, "Log in"),
    msg,
  );
  form.onsubmit = async (ev) => {
    ev.preventDefault();
    setToken(input.value.trim());
    try {
      await start();
    } catch (e: any) {
      const text =
        e instanceof ApiError && e.status === 401
          ? "This token is not known to the appliance: check it, or ask an admin for a new one."
          : `Cannot log in: ${e.message}`;
      login(text);
    }
  };
  replace(app, form);
  input.focus();
}

async function start(): Promise<void> {
  const me = await api<{ name: string; role: Role }>("GET", "/whoami");
  const flashBox = h("div", { class: "flash", role: "status", "aria-live": "polite" });
  const main = h("main", { id: "main", tabindex: -1 });
  const nav = h(
    "nav",
    { "aria-label": "views" },
    VIEWS.filter((v) => RANK[me.role] >= RANK[v.role]).map((v) => h("a", { href: `#/${v.hash}`, "data-view": v.hash }, v.title)),
  );
  const ctx: Ctx = {
    role: me.role,
    can: (r) => RANK[me.role] >= RANK[r],
    flash(m, bad) {
      replace(flashBox, h("span", { class: bad ? "error" : "ok" }, m));
    },
    go(hash) {
      if (location.hash === hash) void show();
      else location.hash = hash;
    },
  };
  replace(
    app,
    h(
      "header",
      {},
      h("strong", {}, "blockvault"),
      nav,
      h("span", { class: "who", id: "who" }, `${me.name} (${me.role})`),
      h("button", { onclick: () => login("Logged out.") }, "Log out"),
    ),
    flashBox,
    main,
  );
  const show = async () => {
    window.clearTimeout(timer);
    const gen = ++generation;
    const name = location.hash.replace(/^#\//, "").split("/")[0] || "dashboard";
    const v = VIEWS.find((x) => x.hash === name && ctx.can(x.role)) ?? VIEWS[0];
    for (const a of nav.querySelectorAll("a")) a.toggleAttribute("aria-current", a.getAttribute("data-view") === v.hash);
    document.title = `${v.title} · blockvault`;
    const root = h("div", { "data-view": v.hash });
    replace(main, root);
    let refresh: (() => Promise<void>) | void = undefined;
    try {
      refresh = await v.view.mount(root, ctx);
    } catch (e: any) {
      replace(root, h("p", { class: "error" }, e.message));
    }
    const tick = async () => {
      if (gen !== generation || !refresh) return;
      // A refresh rebuilds the tables: while the keyboard focus is on a control inside
      // one, wait, so that polling never takes the focus away.
      const focused = document.activeElement;
      const busy = focused instanceof HTMLElement && focused !== main && main.contains(focused) && focused.closest("table");
      try {
        if (!busy) await refresh();
        // Ticks seen, for tests and for the curious: polling goes on.
        main.dataset.polls = String(Number(main.dataset.polls || 0) + 1);
      } catch (e: any) {
        ctx.flash(e.message, true);
      }
      if (gen === generation) timer = window.setTimeout(tick, POLL_MS);
    };
    if (refresh) timer = window.setTimeout(tick, POLL_MS);
  };
  window.onhashchange = () => void show();
  await show();
}

setOnUnauthorized(() => {
  if (token() !== null && document.getElementById("main")) login("The appliance no longer accepts this token: log in again.");
});

if (token()) start().catch(() => login("Your session's token was refused: log in again."));
else login();
