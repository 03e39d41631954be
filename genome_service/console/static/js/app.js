// The console's router: the part after # names a page; each page is a custom element.
import "./key-prompt.js";
import "./personas.js";
import "./chat.js";
import "./genome.js";
import "./layers.js";
import "./knowledge.js";
import "./academy.js";
import "./ops.js";

// [pattern, page element, attribute taking the id, the menu entry it belongs to]
const ROUTES = [
  [/^#\/personas\/([\w-]+)\/chat$/, "gs-chat", "persona", "#/personas"],
  [/^#\/personas\/([\w-]+)\/genome$/, "gs-genome", "persona", "#/personas"],
  [/^#\/personas\/([\w-]+)\/knowledge$/, "gs-knowledge", "persona", "#/knowledge"],
  [/^#\/genomes\/([\w-]+)$/, "gs-genome", "genome", "#/personas"],
  [/^#\/knowledge$/, "gs-knowledge", null, "#/knowledge"],
  [/^#\/layers\/([\w-]+)$/, "gs-layer", "layer", "#/layers"],
  [/^#\/layers$/, "gs-layers", null, "#/layers"],
  [/^#\/academy\/([\w-]+)$/, "gs-session", "session", "#/academy"],
  [/^#\/academy$/, "gs-academy", null, "#/academy"],
  [/^#\/ops$/, "gs-ops", null, "#/ops"],
  [/^#\/personas$/, "gs-personas", null, "#/personas"],
];

function show(navigation) {
  const hash = location.hash || "#/personas";
  const [pattern, tag, attribute, section] = ROUTES.find(([re]) => re.test(hash)) || ROUTES[ROUTES.length - 1];
  const page = document.createElement(tag);
  if (attribute) page.setAttribute(attribute, hash.match(pattern)[1]);
  const main = document.getElementById("main");
  main.replaceChildren(page);
  // After following a link, keyboard and screen-reader users continue from the new page's top.
  if (navigation) main.focus();
  for (const link of document.querySelectorAll("nav a")) {
    if (link.getAttribute("href") === section) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

window.addEventListener("hashchange", show);
show();
