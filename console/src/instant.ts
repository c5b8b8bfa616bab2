// Instant access: a backup's disk served over NBD by the appliance (`/api/v1/instant`),
// started from a backup's row, listed with its URI (nbds:// when [instant] serves TLS),
// the certificate's fingerprint, a ready-to-paste qemu-img command (Copy button) and a
// Stop button.

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

/** Put `text` on the clipboard (the Clipboard API, else a selected textarea). */
async function copyText(text: string): Promise<void> {
  if (navigator.clipboard && window.isSecureContext) {
    await navigator.clipboard.writeText(text);
    return;
  }
  const t = h("textarea", { readonly: true, style: "position:fixed;left:-9999px" }) as HTMLTextAreaElement;
  t.value = text;
  document.body.appendChild(t);
  t.select();
  const ok = document.execCommand("copy");
  t.remove();
  if (!ok) throw new Error("the browser refused to copy: select the command and copy it by hand");
}

/** How a client reaches export `e`: URI, certificate fingerprint (and the certificate
 * to trust), and the qemu-img command line with a Copy button. */
export function connectInfo(e: any, ctx: Ctx): HTMLElement {
  const tls = e.tls;
  const cert = tls ? h("a", { href: `data:application/x-pem-file;charset=utf-8,${encodeURIComponent(tls.certificate)}`, download: "ca-cert.pem" }, "ca-cert.pem") : null;
  return h(
    "div",
    { class: "connect", "data-export": e.id },
    h("p", {}, "URI ", h("code", { "data-uri": e.uri }, e.uri)),
    tls
      ? h(
          "p",
          {},
          "NBD-TLS, certificate SHA-256 ",
          h("code", { "data-fingerprint": tls.fingerprint }, tls.fingerprint),
          " (",
          cert,
          tls.self_signed ? ", self-signed: the command below trusts exactly it" : ", signed by your CA",
          ")",
          tls.client_certificate_required ? h("span", { class: "muted" }, ". A client certificate is required: put client-cert.pem and client-key.pem into blockvault-pki/") : null,
        )
      : h("p", { class: "muted" }, "Plain NBD on this host's loopback address (no TLS)."),
    e.command ? h("p", {}, "Copy the disk out (or use the same options for qemu-system's -drive):") : h("p", { class: "muted" }, "Only operators see how to connect: the export name opens the backup."),
    e.command &&
    h(
      "div",
      { class: "command" },
      h("pre", { "data-command": "" }, e.command),
      h(
        "button",
        {
          type: "button",
          onclick: async () => {
            try {
              await copyText(e.command);
              ctx.flash("Command copied.");
            } catch (err: any) {
              ctx.flash(err.message, true);
            }
          },
        },
        "Copy",
      ),
    ),
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
        connectInfo(e, ctx),
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
        xs.map((e) =>
          h("details", { class: "card", "data-export": e.id }, h("summary", {}, `How to connect to ${e.id} (${e.resource}, ${e.disk})`), connectInfo(e, ctx)),
        ),
      );
    };
    await refresh();
    return refresh;
  },
};
