// Ops: liveness, readiness and the inference engine's figures, from JSON views.
import { ApiError, getJson } from "./api.js";
import { Page, h, table } from "./dom.js";

const text = (value) => (value !== null && typeof value === "object" ? JSON.stringify(value) : String(value));

const isObject = (value) => value !== null && typeof value === "object" && !Array.isArray(value);

// Any JSON object: its scalar fields as a key/value table, each nested object as its own
// figures, each list of objects as a table.
export function figures(caption, object) {
  const scalars = Object.entries(object).filter(([, v]) => !Array.isArray(v) && !isObject(v));
  const nested = Object.entries(object).filter(([, v]) => isObject(v));
  const lists = Object.entries(object).filter(([, v]) => Array.isArray(v));
  return [
    table(caption, ["Figure", "Value"], scalars.map(([k, v]) => [k, text(v)])),
    nested.map(([name, value]) => figures(`${caption}: ${name}`, value)),
    lists.map(([name, items]) => {
      if (!items.length || typeof items[0] !== "object") return table(`${caption}: ${name}`, ["Value"], items.map((v) => [text(v)]));
      const columns = [...new Set(items.flatMap((item) => Object.keys(item)))];
      return table(`${caption}: ${name}`, columns, items.map((item) => columns.map((c) => text(item[c] ?? ""))));
    }),
  ];
}

// A figure set the server does not have (an older server) is "not available", not an error:
// the OpenAPI document says which exist, so the page does not ask for a missing one.
async function view(caption, path, documented) {
  if (!documented.has(path)) return h("p", { class: "unavailable" }, `${caption}: not available on this server.`);
  try {
    return figures(caption, await getJson(path));
  } catch (error) {
    if (error instanceof ApiError && error.status === 404) return h("p", { class: "unavailable" }, `${caption}: not available on this server.`);
    return h("p", { class: "alert" }, `${caption}: ${error.message}`);
  }
}

class Ops extends Page {
  heading = "Ops";

  async render() {
    const documented = new Set(Object.keys((await getJson("/schema/openapi.json")).paths));
    const sections = await Promise.all([["Health", "/health"], ["Readiness", "/ready"], ["Inference engine", "/inference/stats"]]
      .map(([caption, path]) => view(caption, path, documented)));
    return [h("h1", {}, "Ops"), this.alert, ...sections.flat(Infinity),
      h("button", { type: "button", onclick: () => this.refresh() }, "Refresh"),
      h("p", {}, "Prometheus metrics: ", h("a", { href: "/metrics" }, "/metrics"), ". API documentation: ",
        h("a", { href: "/schema/swagger" }, "Swagger UI"), " (served from files shipped with the service).")];
  }
}
customElements.define("gs-ops", Ops);
