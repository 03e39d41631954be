"""The Academy in the browser: a session started from the page draws one loss point per progress
event, keeps them across a reload without duplicates, and is cancelled from the page; a short
session runs to its end and links to the layer it produced."""

from __future__ import annotations

from typing import Any

from console_browser import MODEL, open_page
from servers import Server

POINTS = "() => [...document.querySelectorAll('gs-loss-chart circle.point')].map((c) => Number(c.dataset.step))"


def progress_steps(server: Server, session_id: str) -> list[int]:
    with server.client() as client:
        events = client.get(f"/academy/sessions/{session_id}/events").json()
    return [e["data"]["step"] for e in events if e["type"] == "TrainingProgressed"]


def start(page: Any, persona: str, goal: str, steps: int) -> str:
    open_page(page, "#/academy", "Academy")
    page.get_by_label("Persona (with a genome)").select_option(label=persona)
    page.get_by_label("Goal").fill(goal)
    page.get_by_label("Step budget").fill(str(steps))
    page.get_by_role("button", name="Start").click()
    page.get_by_role("heading", level=1, name=f"Session: {goal}").wait_for()
    return page.url.rsplit("/", 1)[1]


def test_the_loss_curve_grows_per_event_survives_a_reload_and_cancel_ends_the_session(page: Any, console_server: Server) -> None:
    with console_server.client() as client:
        assert client.post("/personas/", json={"name": "Pupil", "base_model": MODEL}).status_code == 201
    session_id = start(page, "Pupil", "Speak calmly.", 100_000)
    try:
        # The first points come after the server's first plan (the embedder loads), the model's
        # first challenges and the first held-out evaluation: more than the page's usual 20 s.
        page.locator("gs-loss-chart circle.point").nth(1).wait_for(timeout=90_000)
        drawn = page.evaluate(POINTS)
        assert len(drawn) >= 2 and drawn == progress_steps(console_server, session_id)[: len(drawn)]

        page.reload()
        page.locator("gs-loss-chart circle.point").nth(len(drawn) - 1).wait_for()
        redrawn = page.evaluate(POINTS)
        assert len(set(redrawn)) == len(redrawn) and redrawn == progress_steps(console_server, session_id)[: len(redrawn)]

        page.get_by_role("button", name="Cancel session").click()
        page.locator("gs-session[data-stream=ended] .state[data-status=cancelled]").wait_for()
    finally:
        # A session of 100 000 steps left running would train through every later test.
        with console_server.client() as client:
            client.post(f"/academy/sessions/{session_id}/cancel")
    with console_server.client() as client:
        session = client.get(f"/academy/sessions/{session_id}").json()
    assert session["status"] == "cancelled" and session["layer_ids"] == []
    # Over: the chart holds every progress event of the session, each once.
    assert page.evaluate(POINTS) == progress_steps(console_server, session_id)
    assert page.get_by_text("Loss values").is_visible()  # the chart's text alternative


def test_a_short_session_runs_to_its_end_and_links_to_the_layer_it_produced(page: Any, console_server: Server) -> None:
    with console_server.client() as client:
        assert client.post("/personas/", json={"name": "Graduate", "base_model": MODEL}).status_code == 201
    session_id = start(page, "Graduate", "Answer briefly.", 10)

    page.locator("gs-session[data-stream=ended] .state[data-status=completed]").wait_for()
    assert page.evaluate(POINTS) == progress_steps(console_server, session_id) == [5, 10]
    with console_server.client() as client:
        [layer_id] = client.get(f"/academy/sessions/{session_id}").json()["layer_ids"]
        layer = client.get(f"/layers/{layer_id}").json()
    # The plan's task, and each challenge with the judge's score, as the session recorded them.
    assert page.get_by_role("table", name="Tasks").locator("tbody tr").count() == 1
    scores = page.get_by_role("table", name="Challenges and the judge's scores").locator("tbody tr td:nth-child(4)")
    with console_server.client() as client:
        events = client.get(f"/academy/sessions/{session_id}/events").json()
    assert scores.all_text_contents() == [f"{e['data']['score']:.1f}" for e in events if e["type"] == "ResponseScored"]
    link = page.get_by_role("link", name=f"Produced layer {layer_id[:8]}")
    assert link.get_attribute("href") == f"#/layers/{layer_id}"
    link.click()
    page.get_by_role("heading", level=1, name=f"Layer {layer['name']}").wait_for()
