// The alerts view: the webhook targets of the service's config (host, events, signed —
// never the secret, the URL's path or query) and the alerts the appliance raised
// (newest first); read-only for every role.

import { api, age } from "./api";
import { h, replace, table } from "./dom";
import type { View } from "./views";

export const alerts: View = {
  async mount(root) {
    const targets = h("div");
    const list = h("div");
    replace(
      root,
      h("h1", {}, "Alerts"),
      h("h2", {}, "Webhook targets"),
      h("p", { class: "muted" }, "Configured in the service's config file ([alerts]); secrets are never shown here."),
      targets,
      h("h2", {}, "Raised alerts"),
      list,
    );
    const refresh = async () => {
      const [ws, rs] = await Promise.all([api<any[]>("GET", "/webhooks"), api<any[]>("GET", "/alerts")]);
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
      rs.sort((a, b) => b.seq - a.seq);
      replace(
        list,
        table(
          ["When", "Kind", "Subject", "Message"],
          rs.slice(0, 300).map((r) => [h("span", { title: r.at }, age(r.at)), h("span", { class: "badge failed" }, r.kind), r.subject, r.message]),
          "No alerts raised.",
        ),
      );
    };
    await refresh();
    return refresh;
  },
};
