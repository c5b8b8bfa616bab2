// Resources, policies, vaults, tokens and the audit log.

import { api, age, bytes } from "./api";
import { field, h, replace, table, val } from "./dom";
import type { Ctx, View } from "./views";

async function act(ctx: Ctx, what: () => Promise<any>, ok: (r: any) => string): Promise<void> {
  try {
    ctx.flash(ok(await what()));
  } catch (e: any) {
    ctx.flash(e.message, true);
  }
}

export const resources: View = {
  async mount(root, ctx) {
    const list = h("div");
    let form: HTMLElement | null = null;
    if (ctx.can("admin")) {
      const vs = await api<any[]>("GET", "/vaults");
      form = h(
        "form",
        { class: "card", "aria-label": "resource" },
        h("h2", {}, "Create or change a resource"),
        field("Name", h("input", { name: "name", required: true })),
        field("Kind", h("select", { name: "kind" }, h("option", { value: "disk" }, "disk"), h("option", { value: "server" }, "server"))),
        field(
          "Sources (one a line: image path, nbd://…, qmp:SOCKET)",
          h("textarea", { name: "sources", rows: 2, cols: 50, required: true }),
        ),
        field("Vault", h("select", { name: "vault" }, vs.map((v) => h("option", { value: v.name }, v.name)))),
        h("button", { type: "submit" }, "Save resource"),
      );
      const f = form;
      f.onsubmit = async (ev) => {
        ev.preventDefault();
        const name = val(f, "name");
        const body = {
          kind: val(f, "kind"),
          sources: val(f, "sources").split("\n").map((s) => s.trim()).filter(Boolean),
          vault: val(f, "vault"),
        };
        const exists = (await api<any[]>("GET", "/resources")).some((r) => r.name === name);
        await act(
          ctx,
          () => (exists ? api("PATCH", `/resources/${encodeURIComponent(name)}`, body) : api("POST", "/resources", { name, ...body })),
          () => `Resource ${name} ${exists ? "changed" : "created"}.`,
        );
        await refresh();
      };
    }
    replace(root, h("h1", {}, "Resources"), form, list);
    const refresh = async () => {
      const rs = await api<any[]>("GET", "/resources");
      replace(
        list,
        table(
          ["Name", "Kind", "Sources", "Vault", ""],
          rs.map((r) => [
            r.name,
            r.kind,
            (r.sources || []).join(", "),
            r.vault,
            h(
              "span",
              { class: "actions" },
              ctx.can("operator")
                ? h(
                    "button",
                    {
                      onclick: () =>
                        act(ctx, () => api("POST", "/backups", { resource: r.name }), (t) => {
                          ctx.go(`#/tasks/${t.task}`);
                          return `Backup of ${r.name} queued as task ${t.task}.`;
                        }),
                    },
                    "Back up now",
                  )
                : null,
              ctx.can("admin") && form
                ? h(
                    "button",
                    {
                      onclick: () => {
                        const f = form as HTMLElement;
                        (f.querySelector('[name="name"]') as HTMLInputElement).value = r.name;
                        (f.querySelector('[name="kind"]') as HTMLSelectElement).value = r.kind;
                        (f.querySelector('[name="sources"]') as HTMLTextAreaElement).value = (r.sources || []).join("\n");
                        (f.querySelector('[name="vault"]') as HTMLSelectElement).value = r.vault;
                        (f.querySelector('[name="sources"]') as HTMLElement).focus();
                      },
                    },
                    "Edit",
                  )
                : null,
              ctx.can("admin")
                ? h(
                    "button",
                    {
                      class: "danger",
                      onclick: async () => {
                        if (!confirm(`Delete resource ${r.name}? (its backups stay)`)) return;
                        await act(ctx, () => api("DELETE", `/resources/${encodeURIComponent(r.name)}`), () => `Deleted ${r.name}.`);
                        await refresh();
                      },
                    },
                    "Delete",
                  )
                : null,
            ),
          ]),
          "No resources yet.",
        ),
      );
    };
    await refresh();
    return refresh;
  },
};

export const policies: View = {
  async mount(root, ctx) {
    const list = h("div");
    const preview = h("div");
    let form: HTMLElement | null = null;
    if (ctx.can("admin")) {
      const next = h("ol", { class: "next-runs", "aria-label": "next 5 runs" });
      const cron = h("input", { name: "schedule", required: true, value: "0 2 * * *" }) as HTMLInputElement;
      const showNext = async () => {
        try {
          const r = await api<{ next: string[] }>("GET", `/schedules/next?cron=${encodeURIComponent(cron.value)}&count=5`);
          replace(next, r.next.map((t) => h("li", {}, new Date(t).toLocaleString())));
        } catch (e: any) {
          replace(next, h("li", { class: "error" }, e.message));
        }
      };
      cron.oninput = () => void showNext();
      form = h(
        "form",
        { class: "card", "aria-label": "policy" },
        h("h2", {}, "Create or change a backup policy"),
        field("Name", h("input", { name: "name", required: true })),
        field("Schedule (cron: min hour day month weekday)", cron),
        h("div", {}, h("span", { class: "muted" }, "Next runs:"), next),
        field("Resources (comma separated)", h("input", { name: "resources", size: 40 })),
        field("Keep last", h("input", { name: "keep_last", inputmode: "numeric", value: "7" })),
        field("Keep days", h("input", { name: "keep_days", inputmode: "numeric" })),
        h("button", { type: "submit" }, "Save policy"),
      );
      const f = form;
      f.onsubmit = async (ev) => {
        ev.preventDefault();
        const name = val(f, "name");
        const retention: any = {};
        for (const k of ["keep_last", "keep_days"]) if (val(f, k)) retention[k] = Number(val(f, k));
        const body = {
          schedule: val(f, "schedule"),
          resources: val(f, "resources").split(",").map((s) => s.trim()).filter(Boolean),
          retention,
        };
        const exists = (await api<any[]>("GET", "/policies")).some((p) => p.name === name);
        await act(
          ctx,
          () => (exists ? api("PATCH", `/policies/${encodeURIComponent(name)}`, body) : api("POST", "/policies", { name, ...body })),
          () => `Policy ${name} ${exists ? "changed" : "created"}.`,
        );
        await refresh();
      };
      void showNext();
    }
    replace(root, h("h1", {}, "Policies"), form, preview, list);
    const refresh = async () => {
      const ps = await api<any[]>("GET", "/policies");
      replace(
        list,
        table(
          ["Name", "Kind", "Schedule", "Resources / vaults", "Retention", "Enabled", ""],
          ps.map((p) => [
            p.name,
            p.kind ?? "backup",
            h("code", {}, p.schedule),
            [...(p.resources || []), ...(p.vaults || [])].join(", "),
            Object.entries(p.retention || {}).map(([k, v]) => `${k}=${v}`).join(" "),
            p.enabled === false ? "no" : "yes",
            h(
              "span",
              { class: "actions" },
              h(
                "button",
                {
                  onclick: async () => {
                    try {
                      const r = await api<any>("POST", `/policies/${encodeURIComponent(p.name)}/preview`);
                      replace(preview, h("section", { class: "card" }, h("h2", {}, `Retention of ${p.name} now`), h("pre", {}, JSON.stringify(r, null, 2))));
                    } catch (e: any) {
                      ctx.flash(e.message, true);
                    }
                  },
                },
                "Preview retention",
              ),
              ctx.can("operator")
                ? h("button", { onclick: () => act(ctx, () => api("POST", `/policies/${encodeURIComponent(p.name)}/run`), () => `Policy ${p.name} started.`) }, "Run now")
                : null,
              ctx.can("admin")
                ? h(
                    "button",
                    {
                      class: "danger",
                      onclick: async () => {
                        if (!confirm(`Delete policy ${p.name}?`)) return;
                        await act(ctx, () => api("DELETE", `/policies/${encodeURIComponent(p.name)}`), () => `Deleted ${p.name}.`);
                        await refresh();
                      },
                    },
                    "Delete",
                  )
                : null,
            ),
          ]),
          "No policies yet.",
        ),
      );
    };
    await refresh();
    return refresh;
  },
};

export const vaults: View = {
  async mount(root, ctx) {
    const list = h("div");
    let form: HTMLElement | null = null;
    if (ctx.can("admin")) {
      form = h(
        "form",
        { class: "card", "aria-label": "vault" },
        h("h2", {}, "Create a vault"),
        field("Name", h("input", { name: "name", required: true })),
        field("Path (optional)", h("input", { name: "path", size: 40 })),
        h("button", { type: "submit" }, "Create vault"),
      );
      const f = form;
      f.onsubmit = async (ev) => {
        ev.preventDefault();
        const body: any = { name: val(f, "name") };
        if (val(f, "path")) body.path = val(f, "path");
        await act(ctx, () => api("POST", "/vaults", body), () => `Vault ${body.name} created.`);
        await refresh();
      };
    }
    replace(root, h("h1", {}, "Vaults"), form, list);
    const refresh = async () => {
      const vs = await api<any[]>("GET", "/vaults");
      replace(
        list,
        table(
          ["Name", "Path", "Chunk", "Backups", "Logical", "Stored", "Dedup", "Capacity", "Figures of", ""],
          vs.map((v) => [
            v.name,
            h("code", {}, v.path),
            bytes(v.chunk_size),
            v.backups,
            bytes(v.logical_bytes),
            bytes(v.stored_bytes),
            v.dedup_ratio ? `${v.dedup_ratio.toFixed(2)}×` : "—",
            v.capacity ? bytes(v.capacity) : "unlimited",
            age(v.usage_computed_at),
            h(
              "span",
              { class: "actions" },
              ctx.can("operator")
                ? h("button", { onclick: () => act(ctx, () => api("POST", `/vaults/${encodeURIComponent(v.name)}/verify`, {}), (t) => `Verify queued as task ${t.task}.`) }, "Verify")
                : null,
              ctx.can("admin")
                ? h("button", { onclick: () => act(ctx, () => api("POST", `/vaults/${encodeURIComponent(v.name)}/gc`, {}), (t) => `GC queued as task ${t.task}.`) }, "GC")
                : null,
            ),
          ]),
          "No vaults yet.",
        ),
      );
    };
    await refresh();
    return refresh;
  },
};

export const tokens: View = {
  async mount(root, ctx) {
    const list = h("div");
    const secret = h("div");
    const form = h(
      "form",
      { class: "card", "aria-label": "token" },
      h("h2", {}, "Create a token"),
      field("Name", h("input", { name: "name", required: true })),
      field("Role", h("select", { name: "role" }, ["auditor", "operator", "admin"].map((r) => h("option", { value: r }, r)))),
      h("button", { type: "submit" }, "Create token"),
    );
    form.onsubmit = async (ev) => {
      ev.preventDefault();
      try {
        const r = await api<any>("POST", "/tokens", { name: val(form, "name"), role: val(form, "role") });
        replace(secret, h("p", { class: "card" }, "Secret (shown once): ", h("code", { class: "secret" }, r.token ?? r.secret ?? JSON.stringify(r))));
      } catch (e: any) {
        ctx.flash(e.message, true);
      }
      await refresh();
    };
    replace(root, h("h1", {}, "Tokens"), form, secret, list);
    const refresh = async () => {
      const ts = await api<any[]>("GET", "/tokens");
      replace(
        list,
        table(
          ["Name", "Role", "Created", ""],
          ts.map((t) => [
            t.name,
            t.role,
            age(t.created),
            h(
              "button",
              {
                class: "danger",
                onclick: async () => {
                  if (!confirm(`Delete token ${t.name}?`)) return;
                  await act(ctx, () => api("DELETE", `/tokens/${encodeURIComponent(t.name)}`), () => `Deleted ${t.name}.`);
                  await refresh();
                },
              },
              "Delete",
            ),
          ]),
        ),
      );
    };
    await refresh();
    return refresh;
  },
};

export const audit: View = {
  async mount(root) {
    const list = h("div");
    replace(root, h("h1", {}, "Audit log"), list);
    const refresh = async () => {
      const rs = await api<any[]>("GET", "/audit");
      replace(
        list,
        table(
          ["When", "Token", "Role", "Method", "Path", "Status"],
          rs.slice(0, 300).map((r) => [h("span", { title: r.at }, age(r.at)), r.token, r.role, r.method, r.path, r.status]),
        ),
      );
    };
    await refresh();
    return refresh;
  },
};
