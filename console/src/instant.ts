// Instant access: a backup's disk served over NBD by the appliance (`/api/v1/instant`),
// started from a backup's row, listed with its nbd:// URI, stopped with a button.

import { age, api, bytes } from "./api";
import { h, replace, table } from "./dom";
import type { Ctx, View } from "./views";

function stopButton(e: any, ctx: Ctx, after: () => Promise<void> | void): HTMLElement {
  return h(
    "button",
    {
      class: "danger",
      onclick: async () => {
        try {
          await api("DELETE", `/instant/${encodeURIComponent(e.id)}`);
          ctx.flash(`Stopped instant access ${e.id} (${e.uri}).`);
        } catch (err: any) {
          ctx.flash(err.message, true);
        }
        await after();
      },
    },
    "Stop",
  );
}

/** Start serving backup `b` (its first disk, or `disk`); shows the URI and a Stop button. */
export function instantPanel(b: any, ctx: Ctx, done: () => void): HTMLElement {
  const body = h("div", {}, h("p", { class: "muted" }, "Starting…"));
  const disks: any[] = b.disks || [];
  const sel = disks.length > 1 ? (h("select", { name: "disk", "aria-label": "disk" }, disks.map((d) => h("option", { value: d.name }, d.name))) as HTMLSelectElement) : null;
  const card = h(
    "section",
    { class: "card", "aria-label": `instant access ${b.name}` },
    h("h3", {}, `Instant access to ${b.name} (${b.resource})`),
    h("p", { class: "muted" }, "Served read-only over NBD by the appliance: writes are refused, the backup never changes."),
    sel ? h("p", {}, "Disk ", sel) : null,
    body,
    h("button", { type: "button", onclick: done }, "Close"),
  );
  const start = async () => {
    try {
      const e = await api("POST", "/instant", sel ? { backup: b.id, disk: sel.value } : { backup: b.id });
      replace(
        body,
        h("p", {}, "Connect to ", h("code", { "data-uri": e.uri }, e.uri), " (e.g. ", h("code", {}, `qemu-img convert -O qcow2 ${e.uri} copy.qcow2`), ")"),
        stopButton(e, ctx, () => replace(body, h("p", { class: "muted" }, "Stopped."))),
      );
    } catch (err: any) {
      replace(body, h("p", { class: "error", role: "alert" }, err.message));
    }
  };
  if (sel) {
    replace(body, h("button", { type: "button", onclick: () => void start() }, "Start"));
  } else {
    void start();
  }
  return card;
}

export const instant: View = {
  async mount(root, ctx) {
    const list = h("div");
    replace(root, h("h1", {}, "Instant access"), h("p", { class: "muted" }, "Start one from a backup's row (Backups → Instant access)."), list);
    const refresh = async () => {
      const xs = await api<any[]>("GET", "/instant");
      replace(
        list,
        table(
          ["Id", "URI", "Resource", "Backup", "Disk", "Size", "Started", "By", "State", ""],
          xs.map((e) => [
            e.id,
            h("code", { "data-uri": e.uri }, e.uri),
            e.resource,
            e.backup,
            e.disk,
            bytes(e.size),
            h("span", { title: e.started }, age(e.started)),
            e.by,
            h("span", { class: `badge ${e.state === "running" ? "ok" : "failed"}` }, e.state),
            ctx.can("operator") ? stopButton(e, ctx, refresh) : null,
          ]),
          "No instant access running.",
        ),
      );
    };
    await refresh();
    return refresh;
  },
};
