// The console's router: the part after # names a page; each page is a custom element.
import "./key-prompt.js";
import "./personas.js";
import "./chat.js";
import "./genome.js";
import "./layers.js";
import "./knowledge.js";
import "./academy.js";
import "./ops.js";

const ROUTES = [
  [/^#\/personas\/([\w-]+)\/chat$/, "gs-chat", "persona"],
  [/^#\/personas\/([\w-]+)\/genome$/, "gs-genome", "persona"],
  [/^#\/personas\/([\w-]+)\/knowledge$/, "gs-knowledge", "persona"],
  [/^#\/genomes\/([\w-]+)$/, "gs-genome", "genome"],
  [/^#\/knowledge$/, "gs-knowledge"],
  [/^#\/layers\/([\w-]+)$/, "gs-layer", "layer"],
  [/^#\/layers$/, "gs-layers"],
  [/^#\/academy\/([\w-]+)$/, "gs-session", "session"],
  [/^#\/academy$/, "gs-academy"],
  [/^#\/ops$/, "gs-ops"],
  [/^#\/personas$/, "gs-personas"],
];

function show() {
  const hash = location.hash || "#/personas";
  const [pattern, tag, attribute] = ROUTES.find(([re]) => re.test(hash)) || ROUTES[ROUTES.length - 1];
  const page = document.createElement(tag);
  if (attribute) page.setAttribute(attribute, hash.match(pattern)[1]);
  const main = document.getElementById("main");
  main.replaceChildren(page);
  for (const link of document.querySelectorAll("nav a")) {
    const current = hash.startsWith(link.getAttribute("href"));
    if (current) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

window.addEventListener("hashchange", show);
show();
