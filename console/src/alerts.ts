// The alerts view: the webhook targets of the service's config (host, events, signed —
// never the secret, the URL's path or query), the recent webhook deliveries from the
// outbox (state, attempts, next try, last error) and the alerts the appliance raised
// (newest first); read-only for every role, refreshed by the app's polling.

import { api, age } from "./api";
import { h, replace, table } from "./dom";
import type { View } from "./views";

export const alerts: View = {
  async mount(root) {
    const targets = h("div");
    const deliveries = h("div");
    const list = h("div");
    replace(
      root,
      h("h1", {}, "Alerts"),
      h("h2", {}, "Webhook targets"),
      h("p", { class: "muted" }, "Configured in the service's config file ([alerts]); secrets are never shown here."),
      targets,
      h("h2", {}, "Recent deliveries"),
      h("p", { class: "muted" }, "Kept in the catalog: a delivery waiting for its retry survives a restart with the same delivery id."),
      deliveries,
      h("h2", {}, "Raised alerts"),
      list,
    );
    const refresh = async () => {
      const [ws, rs, ds] = await Promise.all([
        api<any[]>("GET", "/webhooks"),
        api<any[]>("GET", "/alerts"),
        api<any[]>("GET", "/alerts/deliveries?limit=100"),
      ]);
      replace(
        targets,
        table(
          ["Host", "Scheme", "Events", "Signed", "Timeout"],
          ws.map((w) => [
            h("span", { "data-webhook": w.host ?? "" }, w.host ?? "?"),
            w.scheme,
            Array.isArray(w.events) ? w.events.join(", ") : w.events,
            w.signed ? h("span", { class: "badge ok" }, "signed") : h("span", { class: "badge late" }, "unsigned"),
            `${w.timeout_seconds} s`,
          ]),
          "No webhook targets configured.",
        ),
      );
      const stateClass: Record<string, string> = { delivered: "ok", pending: "late", failed: "failed", refused: "failed" };
      replace(
        deliveries,
        table(
          ["Queued", "Kind", "Target", "State", "Attempts", "Next try", "Last error"],
          ds.map((d) => [
            h("span", { title: d.created }, age(d.created)),
            d.kind,
            d.target,
            h("span", { class: `badge ${stateClass[d.state] ?? "none"}`, "data-delivery": d.id, "data-delivery-kind": d.kind }, d.state),
            String(d.attempts),
            d.next_try ? h("span", { title: d.next_try }, new Date(d.next_try).toLocaleTimeString()) : "—",
            d.last_error ?? "",
          ]),
          "No deliveries yet.",
        ),
      );
      rs.sort((a, b) => b.seq - a.seq);
      replace(
        list,
        table(
          ["When", "Kind", "Subject", "Message"],
          rs.slice(0, 300).map((r) => [h("span", { title: r.at }, age(r.at)), h("span", { class: `badge ${["backup_fresh", "backup_succeeded"].includes(r.kind) ? "ok" : "failed"}` }, r.kind), r.subject, r.message]),
          "No alerts raised.",
        ),
      );
    };
    await refresh();
    return refresh;
  },
};
