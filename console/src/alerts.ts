// The alerts view: alerts the appliance raised (newest first), read-only for every role.
// Webhook targets are not listed: the API has no route for them yet (their URLs and
// secrets live in the service's config file, and secrets are never shown).

import { api, age } from "./api";
import { h, replace, table } from "./dom";
import type { View } from "./views";

export const alerts: View = {
  async mount(root) {
    const list = h("div");
    replace(
      root,
      h("h1", {}, "Alerts"),
      h("p", { class: "muted" }, "Webhook targets are configured in the service's config file ([alerts]); their secrets are never shown here."),
      list,
    );
    const refresh = async () => {
      const rs = await api<any[]>("GET", "/alerts");
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
