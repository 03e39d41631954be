// Builds elements from data. Text is always a text node (never parsed as HTML), so model
// output and user input cannot become markup.
export function h(tag, props = {}, ...children) {
  const el = tag.startsWith("svg:")
    ? document.createElementNS("http://www.w3.org/2000/svg", tag.slice(4))
    : document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name in PROPERTIES) el[PROPERTIES[name]] = value;
    else el.setAttribute(name, value === true ? "" : value);
  }
  el.append(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false).map(
    (c) => (c instanceof Node ? c : document.createTextNode(String(c)))));
  return el;
}

const PROPERTIES = { value: "value", checked: "checked", text: "textContent" };

// A labelled form field: the label names the control for keyboard and screen-reader users.
let fields = 0;
export function field(label, control) {
  control.id ||= `field-${++fields}`;
  return h("div", { class: "field" }, h("label", { for: control.id }, label), control);
}

export const select = (props, options) => h("select", props,
  options.map(([value, label]) => h("option", { value, selected: value === props.value }, label)));

// A place for a page's error: announced when it appears, shown next to what failed.
export function alertBox() {
  const box = h("p", { class: "alert", role: "alert", hidden: true });
  box.show = (error) => { box.textContent = error ? String(error.message || error) : ""; box.hidden = !error; };
  return box;
}

export const short = (id) => (id ? id.slice(0, 8) : "");
export const score = (value) => `cosine ${Number(value).toFixed(3)}`;
export const when = (iso) => new Date(iso).toLocaleString();

// A table from rows; cells are nodes or text.
export function table(caption, headings, rows) {
  return h("table", {}, h("caption", {}, caption),
    h("thead", {}, h("tr", {}, headings.map((t) => h("th", { scope: "col" }, t)))),
    h("tbody", {}, rows.map((cells) => h("tr", {}, cells.map((c) => h("td", {}, c))))));
}

// Runs an async action from a form or button, showing its error in place.
export async function attempt(box, action) {
  box.show(null);
  try {
    return await action();
  } catch (error) {
    box.show(error);
    return undefined;
  }
}

// The base of every page: render() is called on connect and whenever the page asks.
export class Page extends HTMLElement {
  connectedCallback() {
    this.alert = alertBox();
    this.refresh();
  }

  async refresh() {
    try {
      this.replaceChildren(...(await this.render()));
    } catch (error) {
      this.replaceChildren(h("h1", {}, this.heading || "Error"), this.alert);
      this.alert.show(error);
    }
  }
}
