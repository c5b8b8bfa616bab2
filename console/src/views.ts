// Dashboard, backups and tasks: the views an operator keeps open.

import { api, ApiError, age, bytes, duration, RANK, Role } from "./api";
import { Child, field, h, replace, table, val } from "./dom";
import { instantPanel } from "./instant";

export interface Ctx {
  role: Role;
  can(role: Role): boolean;
  flash(msg: string, bad?: boolean): void;
  go(hash: string): void;
}

export interface View {
  /** Builds the view into `root`; returns a refresh function polled while shown. */
  mount(root: HTMLElement, ctx: Ctx): Promise<(() => Promise<void>) | void>;
}

function progress(t: any): HTMLElement {
  const pct = Math.max(0, Math.min(100, t.progress_percent || 0));
  return h(
    "span",
    { class: "progress" },
    h("progress", { max: 100, value: pct, "aria-label": `task ${t.id} progress` }),
    h("span", { class: "pct", "data-task": t.id }, `${pct.toFixed(0)} %`),
  );
}

function rateEta(t: any): string {
  const rate = t.bytes_per_second ? `${bytes(t.bytes_per_second)}/s` : "—";
  const eta = t.eta_seconds !== null && t.eta_seconds !== undefined ? `ETA ${duration(t.eta_seconds)}` : "";
  return `${rate} ${eta}`.trim();
}

// ---- dashboard ----

/** Seconds between a schedule's next two runs (its RPO period), with the next run. */
async function period(cron: string): Promise<{ period: number | null; next: string | null }> {
  try {
    const r = await api<{ next: string[] }>("GET", `/schedules/next?cron=${encodeURIComponent(cron)}&count=2`);
    const [a, b] = r.next;
    return { period: a && b ? (Date.parse(b) - Date.parse(a)) / 1000 : null, next: a ?? null };
  } catch {
    return { period: null, next: null };
  }
}

/** A resource's last drill: "proven bootable this week" when it passed within 7 days. */
function drillCell(d: any): Child {
  if (!d) return h("span", { class: "muted" }, "never drilled");
  const days = (Date.now() - Date.parse(d.at)) / 86400000;
  if (!d.ok) return h("span", { class: "badge failed", title: d.reason ?? "" }, `drill failed ${age(d.at)}`);
  return h("span", { class: `badge ${days <= 7 ? "ok" : "late"}`, title: `${d.check}, ${d.accel}, ${Math.round(d.seconds)} s` }, days <= 7 ? `proven bootable this week (${age(d.at)})` : `booted ${age(d.at)}`);
}

export const dashboard: View = {
  async mount(root) {
    const rpo = h("section", { "aria-labelledby": "h-rpo" });
    const vaults = h("section", { "aria-labelledby": "h-vaults" });
    const running = h("section", { "aria-labelledby": "h-running" });
    const failures = h("section", { "aria-labelledby": "h-fail" });
    replace(
      root,
      h("h1", {}, "Dashboard"),
      h("div", { class: "grid" }, h("div", {}, h("h2", { id: "h-rpo" }, "Resources"), rpo),
        h("div", {}, h("h2", { id: "h-vaults" }, "Vaults"), vaults)),
      h("div", { class: "grid" }, h("div", {}, h("h2", { id: "h-running" }, "Running tasks"), running),
        h("div", {}, h("h2", { id: "h-fail" }, "Recent failures"), failures)),
    );
    const periods = new Map<string, { period: number | null; next: string | null }>();
    const refresh = async () => {
      const [res, pols, bks, vs, live, failed] = await Promise.all([
        api<any[]>("GET", "/resources"),
        api<any[]>("GET", "/policies"),
        api<any[]>("GET", "/backups"),
        api<any[]>("GET", "/vaults"),
        api<any[]>("GET", "/tasks?state=running"),
        api<any[]>("GET", "/tasks?state=failed"),
      ]);
      const newest = new Map<string, any>();
      for (const b of bks) {
        const cur = newest.get(b.resource);
        if (!cur || b.created > cur.created) newest.set(b.resource, b);
      }
      const lastFail = new Map<string, any>();
      for (const t of failed) if (t.kind === "backup" && !lastFail.has(t.target)) lastFail.set(t.target, t);
      const rows: Child[][] = [];
      for (const r of res) {
        const pol = pols.find((p) => p.enabled !== false && (p.kind ?? "backup") === "backup" && (p.resources || []).includes(r.name));
        if (pol && !periods.has(pol.schedule)) periods.set(pol.schedule, await period(pol.schedule));
        const pp = pol ? periods.get(pol.schedule) : undefined;
        const b = newest.get(r.name);
        const f = lastFail.get(r.name);
        let status = "no policy";
        let cls = "none";
        if (f && (!b || f.created > b.created)) {
          status = "failed";
          cls = "failed";
        } else if (pp?.period) {
          const ageS = b ? (Date.now() - Date.parse(b.created)) / 1000 : Infinity;
          // Late once a whole period (plus half a period of grace) passed without a good backup.
          [status, cls] = ageS <= pp.period * 1.5 ? ["ok", "ok"] : ["late", "late"];
        } else if (b) {
          [status, cls] = ["ok", "ok"];
        }
        rows.push([
          r.name,
          b ? h("span", { title: b.created }, `${b.name} (${age(b.created)})`) : "none",
          pp?.period ? duration(pp.period) : "—",
          h("span", { class: `badge ${cls}`, "data-rpo": r.name }, status),
          pp?.next ? h("span", { title: pp.next }, new Date(pp.next).toLocaleString()) : "—",
          drillCell(r.last_drill),
        ]);
      }
      replace(rpo, table(["Resource", "Last good backup", "Period", "RPO", "Next run", "Last drill"], rows, "No resources yet."));
      replace(
        vaults,
        table(
          ["Vault", "Backups", "Logical", "Stored", "Dedup", "Capacity"],
          vs.map((v) => [
            v.name,
            v.backups,
            bytes(v.logical_bytes),
            bytes(v.stored_bytes),
            v.dedup_ratio ? `${v.dedup_ratio.toFixed(2)}×` : "—",
            v.capacity
              ? h("span", {}, h("meter", { min: 0, max: v.capacity, value: v.stored_bytes }), ` ${bytes(v.capacity)}`)
              : "unlimited",
          ]),
          "No vaults yet.",
        ),
      );
      replace(
        running,
        table(
          ["Task", "Kind", "Target", "Progress", "Rate / ETA"],
          live.map((t) => [t.id, t.kind, t.target, progress(t), rateEta(t)]),
          "Nothing running.",
        ),
      );
      replace(
        failures,
        table(
          ["When", "Kind", "Target", "Error"],
          failed.slice(0, 8).map((t) => [age(t.finished || t.created), t.kind, t.target, t.error || ""]),
          "No failures.",
        ),
      );
    };
    await refresh();
    return refresh;
  },
};

// ---- backups ----

/** Whole-server images a server backup can be restored into: OVA, or a directory of qcow2s. */
const SERVER_IMAGES: [string, string][] = [
  ["image:ova", "OVA (whole server, one file)"],
  ["image:qcow2-set", "qcow2 set (whole server, a directory)"],
];

function restoreForm(b: any, ctx: Ctx, done: () => void): HTMLElement {
  const server = b.resource_kind === "server" || (b.disks || []).length > 1;
  const form = h(
    "form",
    { class: "card", "aria-label": `restore ${b.name}` },
    h("h3", {}, `Restore ${b.name} (${b.resource}) into a new image`),
    field("Target path", h("input", { name: "to", required: true, placeholder: "/var/lib/blockvault/restored.qcow2", size: 50 })),
    field(
      "Format",
      h(
        "select",
        { name: "format" },
        ["qcow2", "raw", "vmdk", "vmdk-stream"].map((f) => h("option", { value: f }, f)),
        // A server backup can also become one whole-server image (`image` in POST /restores).
        server ? SERVER_IMAGES.map(([v, t]) => h("option", { value: v }, t)) : null,
      ),
    ),
    field("Size (bytes, optional)", h("input", { name: "size", inputmode: "numeric", placeholder: String(b.logical_size) })),
    h("button", { type: "submit" }, "Start restore"),
    h("button", { type: "button", onclick: done }, "Close"),
  );
  form.onsubmit = async (ev) => {
    ev.preventDefault();
    const fmt = val(form, "format");
    const body: any = fmt.startsWith("image:") ? { backup: b.id, to: val(form, "to"), image: fmt.slice(6) } : { backup: b.id, to: val(form, "to"), format: fmt };
    const size = val(form, "size");
    if (size) body.size = Number(size);
    try {
      const r = await api("POST", "/restores", body);
      ctx.flash(`Restore queued as task ${r.task}.`);
      done();
      ctx.go(`#/tasks/${r.task}`);
    } catch (e: any) {
      ctx.flash(e.message, true);
    }
  };
  return form;
}

/** "Lock until" (admin): extend-only; a refusal (409) is shown in the form itself. */
function lockForm(b: any, ctx: Ctx, done: () => void): HTMLElement {
  const msg = h("p", { class: "error", role: "alert" });
  // The list does not carry the lock (it lives in the vault's journal): ask the backup.
  const current = h("p", { class: "muted", "data-lock": "" }, "Reading the current lock…");
  const rule = "A lock can only be extended; nobody (not even an admin) can delete the backup before its date.";
  api("GET", `/backups/${b.id}`)
    .then((d) => replace(current, d.locked_until ? `Locked until ${d.locked_until}. ${rule}` : `Not locked. ${rule}`))
    .catch((e) => replace(current, e.message));
  const form = h(
    "form",
    { class: "card", "aria-label": `lock ${b.name}` },
    h("h3", {}, `Lock ${b.name} (${b.resource})`),
    current,
    field("Lock until", h("input", { name: "until", type: "date", required: true })),
    h("button", { type: "submit" }, "Lock"),
    h("button", { type: "button", onclick: done }, "Close"),
    msg,
  );
  form.onsubmit = async (ev) => {
    ev.preventDefault();
    try {
      const r = await api("POST", `/backups/${b.id}/lock`, { until: val(form, "until") });
      ctx.flash(`${b.name} is locked until ${r.locked_until}.`);
      done();
    } catch (e: any) {
      replace(msg, e instanceof ApiError && e.status === 409 ? `Refused: ${e.message.replace(/^409: /, "")}` : e.message);
    }
  };
  return form;
}

/** A backup's lock and last drill as badges. */
function badges(b: any): Child {
  const d = b.verified_boot;
  return h(
    "span",
    { class: "badges" },
    b.protected ? h("span", { class: "badge ok" }, "protected") : "",
    b.locked_until ? h("span", { class: "badge lock", title: b.lock_reason ?? "" }, `locked until ${b.locked_until.slice(0, 10)}`) : "",
    d ? h("span", { class: `badge ${d.ok ? "ok" : "failed"}`, title: `${d.check}, ${d.accel}, ${Math.round(d.seconds)} s` }, d.ok ? `booted ${age(d.at)}` : "drill failed") : "",
  );
}

export const backups: View = {
  async mount(root, ctx) {
    const [res, vs] = await Promise.all([api<any[]>("GET", "/resources"), api<any[]>("GET", "/vaults")]);
    const opts = (xs: string[]) => [h("option", { value: "" }, "all"), ...xs.map((x) => h("option", { value: x }, x))];
    const filters = h(
      "form",
      { class: "filters", "aria-label": "filters" },
      field("Resource", h("select", { name: "resource" }, opts(res.map((r) => r.name)))),
      field("Vault", h("select", { name: "vault" }, opts(vs.map((v) => v.name)))),
      field("Kind", h("select", { name: "kind" }, opts(["full", "incremental"]))),
      field("Since", h("input", { name: "since", type: "date" })),
    );
    const panel = h("div");
    const list = h("div");
    replace(root, h("h1", {}, "Backups"), filters, panel, list);
    const refresh = async () => {
      const q = new URLSearchParams();
      for (const k of ["resource", "vault"]) if (val(filters, k)) q.set(k, val(filters, k));
      let bks = await api<any[]>("GET", `/backups${q.size ? `?${q}` : ""}`);
      const kind = val(filters, "kind");
      const since = val(filters, "since");
      if (kind) bks = bks.filter((b) => b.kind === kind);
      if (since) bks = bks.filter((b) => b.created >= since);
      bks.sort((a, b) => (a.created < b.created ? 1 : -1));
      const shown = bks.slice(0, 300);
      const act = (b: any): Child =>
        ctx.can("operator")
          ? h(
              "span",
              { class: "actions" },
              h("button", { onclick: () => replace(panel, restoreForm(b, ctx, () => replace(panel))) }, "Restore"),
              h("button", { onclick: () => replace(panel, instantPanel(b, ctx, () => replace(panel))) }, "Instant access"),
              h(
                "button",
                {
                  onclick: async () => {
                    await api("POST", `/backups/${b.id}/protect`, { protected: !b.protected }).catch((e) => ctx.flash(e.message, true));
                    await refresh();
                  },
                },
                b.protected ? "Unprotect" : "Protect",
              ),
              h(
                "button",
                {
                  onclick: async () => {
                    if (!confirm(`Boot ${b.name} of ${b.resource} in a throwaway VM (a recovery drill)?`)) return;
                    try {
                      const r = await api("POST", `/backups/${b.id}/drill`, {});
                      ctx.flash(`Drill queued as task ${r.task}.`);
                      ctx.go(`#/tasks/${r.task}`);
                    } catch (e: any) {
                      ctx.flash(e.message, true);
                    }
                  },
                },
                "Drill",
              ),
              ctx.can("admin") ? h("button", { onclick: () => replace(panel, lockForm(b, ctx, () => replace(panel))) }, "Lock…") : null,
              h(
                "button",
                {
                  class: "danger",
                  disabled: b.protected || !!b.locked_until,
                  onclick: async () => {
                    if (!confirm(`Delete backup ${b.name} of ${b.resource}?`)) return;
                    try {
                      await api("DELETE", `/backups/${b.id}`);
                      ctx.flash(`Deleted ${b.name}.`);
                    } catch (e: any) {
                      ctx.flash(e.message, true);
                    }
                    await refresh();
                  },
                },
                "Delete",
              ),
            )
          : null;
      replace(
        list,
        h("p", { class: "muted" }, `${bks.length} backups${bks.length > shown.length ? `, newest ${shown.length} shown` : ""}`),
        table(
          ["Name", "Resource", "Vault", "Created", "Kind", "Strategy", "Consistency", "Logical", "Read", "New", "", ""],
          shown.map((b) => [
            b.name,
            b.resource,
            b.vault,
            h("span", { title: b.created }, age(b.created)),
            b.kind,
            b.strategy,
            b.capture?.consistency ?? "—",
            bytes(b.logical_size),
            bytes(b.bytes_read),
            bytes(b.bytes_new),
            badges(b),
            act(b),
          ]),
          "No backups match.",
        ),
      );
    };
    filters.onchange = () => void refresh();
    await refresh();
    return refresh;
  },
};

// ---- tasks ----

export const tasks: View = {
  async mount(root, ctx) {
    const detail = h("div");
    const list = h("div");
    const stateSel = h("select", { name: "state" }, ["", "queued", "running", "succeeded", "failed", "cancelled"].map((s) => h("option", { value: s }, s || "all")));
    replace(root, h("h1", {}, "Tasks"), field("State", stateSel), detail, list);
    const selected = location.hash.split("/")[2] || null;
    const showDetail = async (id: string) => {
      const t = await api("GET", `/tasks/${encodeURIComponent(id)}`);
      replace(
        detail,
        h(
          "section",
          { class: "card", "aria-label": `task ${t.id}` },
          h("h2", {}, `Task ${t.id}: ${t.kind} ${t.target}`),
          h("p", {}, h("span", { class: `badge ${t.state}`, "data-state": t.state }, t.state), " ", progress(t), " ", rateEta(t)),
          t.error ? h("p", { class: "error" }, t.error) : null,
          h("pre", { class: "log", tabindex: 0 }, (t.log || []).join("\n") || "(no log yet)"),
          t.result ? h("pre", {}, JSON.stringify(t.result, null, 2)) : null,
        ),
      );
    };
    const refresh = async () => {
      const s = (stateSel as HTMLSelectElement).value;
      const ts = await api<any[]>("GET", `/tasks${s ? `?state=${s}` : ""}`);
      replace(
        list,
        table(
          ["Id", "Kind", "Target", "State", "Progress", "Rate / ETA", "By", "Created", ""],
          ts.slice(0, 200).map((t) => [
            t.id,
            t.kind,
            t.target,
            h("span", { class: `badge ${t.state}` }, t.state),
            progress(t),
            t.state === "running" ? rateEta(t) : "",
            t.by,
            age(t.created),
            h(
              "span",
              { class: "actions" },
              h("button", { onclick: () => ctx.go(`#/tasks/${t.id}`) }, "Log"),
              ctx.can("operator") && (t.state === "running" || t.state === "queued")
                ? h(
                    "button",
                    {
                      class: "danger",
                      onclick: async () => {
                        try {
                          await api("POST", `/tasks/${t.id}/cancel`);
                          ctx.flash(`Cancel asked for task ${t.id}.`);
                        } catch (e: any) {
                          ctx.flash(e.message, true);
                        }
                        await refresh();
                      },
                    },
                    "Cancel",
                  )
                : null,
            ),
          ]),
          "No tasks.",
        ),
      );
      if (selected) await showDetail(selected);
    };
    stateSel.onchange = () => void refresh();
    await refresh();
    return refresh;
  },
};

export { RANK };
