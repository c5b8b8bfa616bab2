// Recovery drills: drill policies (kind "drill") and each resource's last drill with the
// screenshot the drill took of the guest's screen.

import { age, api, apiBlobUrl } from "./api";
import { field, h, replace, table, val } from "./dom";
import type { Ctx, View } from "./views";

function policyForm(ctx: Ctx, after: () => Promise<void>): HTMLElement {
  const f = h(
    "form",
    { class: "card", "aria-label": "drill policy" },
    h("h2", {}, "Create or change a drill policy"),
    h("p", { class: "muted" }, "Boots the latest backup of each resource (every server resource when none is named) in a throwaway VM on schedule."),
    field("Name", h("input", { name: "name", required: true })),
    field("Schedule (cron)", h("input", { name: "schedule", required: true, value: "0 5 * * 0" })),
    field("Resources (comma separated, optional)", h("input", { name: "resources", size: 40 })),
    field("Check (agent, console:REGEX, port:N; optional)", h("input", { name: "check", size: 30 })),
    field("Timeout (seconds, optional)", h("input", { name: "timeout_seconds", inputmode: "numeric" })),
    h("button", { type: "submit" }, "Save drill policy"),
  );
  f.onsubmit = async (ev) => {
    ev.preventDefault();
    const name = val(f, "name");
    const body: any = { schedule: val(f, "schedule") };
    const res = val(f, "resources").split(",").map((s) => s.trim()).filter(Boolean);
    if (res.length) body.resources = res;
    if (val(f, "check")) body.check = val(f, "check");
    if (val(f, "timeout_seconds")) body.timeout_seconds = Number(val(f, "timeout_seconds"));
    try {
      const exists = (await api<any[]>("GET", "/policies")).some((p) => p.name === name);
      if (exists) await api("PATCH", `/policies/${encodeURIComponent(name)}`, body);
      else await api("POST", "/policies", { name, kind: "drill", ...body });
      ctx.flash(`Drill policy ${name} ${exists ? "changed" : "created"}.`);
    } catch (e: any) {
      ctx.flash(e.message, true);
    }
    await after();
  };
  return f;
}

export const drills: View = {
  async mount(root, ctx) {
    const pols = h("div");
    const last = h("div");
    const shot = h("div");
    const refresh = async () => {
      const [ps, rs] = await Promise.all([api<any[]>("GET", "/policies"), api<any[]>("GET", "/resources")]);
      replace(
        pols,
        table(
          ["Name", "Schedule", "Resources", "Check", "Enabled", ""],
          ps
            .filter((p) => p.kind === "drill")
            .map((p) => [
              p.name,
              h("code", {}, p.schedule),
              (p.resources || []).join(", ") || "every server",
              p.check ?? "default",
              p.enabled === false ? "no" : "yes",
              ctx.can("operator")
                ? h(
                    "button",
                    {
                      onclick: async () => {
                        try {
                          await api("POST", `/policies/${encodeURIComponent(p.name)}/run`);
                          ctx.flash(`Drill policy ${p.name} started.`);
                        } catch (e: any) {
                          ctx.flash(e.message, true);
                        }
                      },
                    },
                    "Run now",
                  )
                : null,
            ]),
          "No drill policies yet.",
        ),
      );
      replace(
        last,
        table(
          ["Resource", "Last drill", "Result", "Check", "Under", "Took", ""],
          rs.map((r) => {
            const d = r.last_drill;
            if (!d) return [r.name, "never drilled", "", "", "", "", ""];
            return [
              r.name,
              h("span", { title: d.at }, age(d.at)),
              h("span", { class: `badge ${d.ok ? "ok" : "failed"}`, title: d.reason ?? "", "data-drill": r.name }, d.ok ? "booted" : `failed${d.reason ? `: ${d.reason}` : ""}`),
              d.check,
              d.accel,
              `${Math.round(d.seconds)} s`,
              d.screenshot
                ? h(
                    "button",
                    {
                      onclick: async () => {
                        try {
                          const u = await apiBlobUrl(`/backups/${encodeURIComponent(d.backup)}/drill/screenshot`);
                          replace(shot, h("figure", { class: "card" }, h("img", { src: u, alt: `screen of ${r.name}'s last drill`, "data-screenshot": r.name }), h("figcaption", {}, `${r.name}: backup ${d.backup}, ${d.at}`)));
                        } catch (e: any) {
                          replace(shot, h("p", { class: "error", role: "alert" }, e.message));
                        }
                      },
                    },
                    "Screenshot",
                  )
                : "no screenshot",
            ];
          }),
          "No resources yet.",
        ),
      );
    };
    replace(
      root,
      h("h1", {}, "Drills"),
      ctx.can("admin") ? policyForm(ctx, refresh) : null,
      h("h2", {}, "Drill policies"),
      pols,
      h("h2", {}, "Last drill per resource"),
      last,
      shot,
    );
    await refresh();
    return refresh;
  },
};
