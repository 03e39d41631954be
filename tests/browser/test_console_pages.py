"""Every console page in Chromium: served with its security headers, nothing fetched from
anywhere but the server, no console error, no serious accessibility violation (axe, offline),
a screenshot of each; an injected inline script is refused by the CSP; the API docs work offline."""

from __future__ import annotations

import fnmatch
import json
import tomllib
from pathlib import Path
from typing import Any

import httpx
from console_browser import MODEL, Watch, open_page, screenshot, tiny_adapter
from servers import Server

from genome_service.api.console import CONTENT_SECURITY_POLICY

ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "genome_service" / "console" / "static"


def test_the_console_is_static_files_shipped_in_the_package_and_under_60_kb() -> None:
    shipped = [p for p in STATIC.rglob("*") if p.is_file()]
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["genome_service.console"]
    # Each file is named by the package data, so the wheel carries it.
    assert [p for p in shipped if not any(fnmatch.fnmatch(str(p.relative_to(STATIC.parent)), g) for g in patterns)] == []
    assert sum(p.stat().st_size for p in shipped) < 60 * 1024


def test_the_root_sends_browsers_to_the_console_and_every_console_response_carries_the_headers(console_server: Server) -> None:
    with httpx.Client(base_url=console_server.url) as client:
        root = client.get("/")
        assert root.is_redirect and root.headers["location"] == "/console/"
        for path, status, kind in (("/console/", 200, "text/html"), ("/console/js/app.js", 200, "javascript"),
                                   ("/console/console.css", 200, "text/css"), ("/console/js/nothing.js", 404, "")):
            response = client.get(path)
            assert response.status_code == status and kind in response.headers["content-type"]
            assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
            assert response.headers["x-content-type-options"] == "nosniff"


def seed(server: Server, tmp_path: Path, tiny_model: Path) -> dict[str, str]:
    """A persona on the tiny model with knowledge, a layer in its genome, and a finished session."""
    with server.client() as client:
        persona = client.post("/personas/", json={"name": "Tour Guide", "system_prompt": "You guide.", "base_model": MODEL}).json()
        client.post(f"/personas/{persona['id']}/knowledge", json={"title": "Harbour", "text": "The harbour opens at dawn."})
        layer = client.post("/layers/", files=[("files", (n, d)) for n, d in tiny_adapter(tiny_model, seed=3).items()],
                            data={"metadata": json.dumps({"name": "guide voice", "base_model": MODEL, "trait_type": "tone_and_voice"})}).json()
        client.post(f"/genomes/{persona['genome_id']}/layers", json={"layer_id": layer["id"], "weight": 0.5})
        session = client.post("/academy/sessions/", json={"persona_id": persona["id"], "goal": "Guide well.", "budget_steps": 5}).json()
    return {"persona": persona["id"], "genome": persona["genome_id"], "layer": layer["id"], "session": session["id"]}


def no_serious_violations(page: Any) -> None:
    from axe_playwright_python.sync_playwright import Axe  # axe-core ships inside: no network

    violations = Axe().run(page).response["violations"]
    serious = [(v["id"], v["impact"], [n["target"] for n in v["nodes"]]) for v in violations if v["impact"] in ("serious", "critical")]
    assert serious == []


def test_every_page_loads_offline_passes_axe_and_is_photographed(page: Any, watch: Watch, console_server: Server,
                                                               tmp_path: Path, tiny_model: Path) -> None:
    ids = seed(console_server, tmp_path, tiny_model)
    pages = [("#/personas", "Personas", "personas"), (f"#/personas/{ids['persona']}/chat", "Chat with Tour Guide", "chat"),
             (f"#/genomes/{ids['genome']}", "Genome Tour Guide", "genome"), ("#/layers", "Layers", "layers"),
             (f"#/layers/{ids['layer']}", "Layer guide voice", "layer"),
             (f"#/personas/{ids['persona']}/knowledge", "Knowledge", "knowledge"), ("#/academy", "Academy", "academy"),
             (f"#/academy/{ids['session']}", "Session: Guide well.", "session"), ("#/ops", "Ops", "ops")]
    for route, heading, name in pages:
        open_page(page, route, heading)
        if name == "session":
            page.locator(".state[data-status=completed]").wait_for()
        page.wait_for_load_state("networkidle")
        no_serious_violations(page)
        screenshot(page, name)
    assert watch.console_responses >= 1


def test_an_inline_script_injected_into_a_page_is_refused(page: Any, watch: Watch) -> None:
    open_page(page, "#/personas", "Personas")
    violated = page.evaluate("""() => new Promise((resolve) => {
        document.addEventListener("securitypolicyviolation", (e) => resolve(e.effectiveDirective), { once: true });
        const script = document.createElement("script");
        script.textContent = "window.injected = true";
        document.body.append(script);
    })""")
    assert violated == "script-src-elem" and page.evaluate("window.injected") is None
    # Chromium reports the refusal on the console too: that one error is the expected one.
    assert len(watch.errors) == 1 and "Content Security Policy" in watch.errors[0]
    watch.expect_error("Content Security Policy")


def test_the_api_docs_render_from_files_the_server_ships(page: Any) -> None:
    page.goto("/schema/swagger")
    page.locator(".opblock").first.wait_for()
    assert page.locator(".opblock").count() > 20


def test_the_ops_page_renders_any_json_view_as_tables(page: Any, console_server: Server) -> None:
    # The engine's figures view comes with the batching work; the page renders whatever it holds.
    with httpx.Client(base_url=console_server.url) as client:
        has_stats = "/inference/stats" in client.get("/schema/openapi.json").json()["paths"]
    open_page(page, "#/ops", "Ops")
    if has_stats:
        page.get_by_role("table", name="Inference engine", exact=True).wait_for()
    else:
        assert page.get_by_text("Inference engine: not available on this server.").is_visible()
    page.evaluate("""async () => {
        const { figures } = await import("/console/js/ops.js");
        document.querySelector("main").append(...figures("Sample engine", {
            backend: "torch", max_batch: 8, queue_depth: 2, mean_step_batch_size: 3.5,
            personas: [{ persona: "Astra", active_rows: 2 }, { persona: "Vega", active_rows: 1, waiting: 4 }],
        }).flat());
    }""")
    scalars = page.get_by_role("table", name="Sample engine", exact=True)
    assert scalars.get_by_role("row").all_inner_texts()[1:] == [
        "backend\ttorch", "max_batch\t8", "queue_depth\t2", "mean_step_batch_size\t3.5"]
    rows = page.get_by_role("table", name="Sample engine: personas").get_by_role("row").all_inner_texts()
    assert rows == ["persona\tactive_rows\twaiting", "Astra\t2\t", "Vega\t1\t4"]


def test_a_persona_is_created_with_a_genome_and_archived_from_the_page(page: Any, console_server: Server) -> None:
    open_page(page, "#/personas", "Personas")
    page.get_by_label("Name", exact=True).fill("Lyra")
    page.get_by_label("System prompt").fill("You are Lyra.")
    page.get_by_label("Base model (gets an empty genome)").fill(MODEL)
    page.get_by_role("button", name="Create persona").click()
    page.get_by_role("link", name="Lyra", exact=True).wait_for()
    with console_server.client() as client:
        [lyra] = [p for p in client.get("/personas/").json()["items"] if p["name"] == "Lyra"]
        assert client.get(f"/genomes/{lyra['genome_id']}").json()["base_model"] == MODEL
    page.get_by_role("button", name="Archive Lyra").click()
    page.get_by_role("link", name="Lyra", exact=True).wait_for(state="detached")  # the list shows live personas
    with console_server.client() as client:
        assert client.get(f"/personas/{lyra['id']}").status_code == 410


def test_knowledge_is_added_as_text_and_files_and_retrieved_with_scores(page: Any, console_server: Server, tmp_path: Path) -> None:
    with console_server.client() as client:
        persona = client.post("/personas/", json={"name": "Scholar"}).json()
    open_page(page, f"#/personas/{persona['id']}/knowledge", "Knowledge")
    page.get_by_label("Title").fill("tides")
    page.get_by_label("Text", exact=True).fill("Spring tides happen when the sun and the moon line up.")
    page.get_by_role("button", name="Add text").click()
    page.get_by_role("cell", name="tides", exact=True).wait_for()
    (tmp_path / "lighthouses.md").write_text("# Lighthouses\n\nA lighthouse lamp turns once every ten seconds.\n")
    page.get_by_label("Text or markdown files").set_input_files(str(tmp_path / "lighthouses.md"))
    page.get_by_role("button", name="Upload files").click()
    page.get_by_role("cell", name="lighthouses.md", exact=True).wait_for()

    page.get_by_label("Query").fill("how often does the lamp turn")
    page.get_by_label("k", exact=True).fill("2")
    page.get_by_role("button", name="Retrieve").click()
    results = page.get_by_role("table", name="Top 2 chunks for “how often does the lamp turn”")
    results.wait_for()
    with console_server.client() as client:
        chunks = client.get(f"/personas/{persona['id']}/knowledge/search", params={"q": "how often does the lamp turn", "k": 2}).json()
    assert results.locator("tbody tr td:last-child").all_text_contents() == [f"cosine {c['score']:.3f}" for c in chunks]
    assert results.locator("tbody tr td:first-child").first.text_content() == "lighthouses.md"
