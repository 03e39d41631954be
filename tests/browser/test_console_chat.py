"""Persona chat in the browser: tokens appear as they stream, the text kept is what the API
recorded, the sources come with their scores, and Stop (Esc) cancels the generation on the server."""

from __future__ import annotations

import time
from typing import Any

import httpx
from console_browser import MODEL, open_page
from servers import Server

FACT = "The moon of Quillon is named Vesperine. Vesperine glows violet at dusk."

# Records the assistant text's length at each change of the transcript, as the page renders it,
# and whether the log would announce it (it must not, token by token).
OBSERVE = """() => {
    window.lengths = [];
    window.live = new Set();
    const log = document.querySelector("[role=log]");
    new MutationObserver(() => {
        const answers = log.querySelectorAll(".message.assistant");
        const answer = answers[answers.length - 1];
        if (!answer || answer.dataset.state) return;
        window.lengths.push(answer.querySelector(".text").textContent.length);
        window.live.add(`${log.getAttribute("aria-live")} ${log.getAttribute("aria-busy")}`);
    }).observe(log, { childList: true, subtree: true, characterData: true });
}"""

# Presses Esc the moment the second token is on the page.
STOP_AT_SECOND_TOKEN = """() => {
    const log = document.querySelector("[role=log]");
    new MutationObserver((records) => {
        for (const r of records) {
            if (r.attributeName === "data-tokens" && r.target.dataset.tokens === "2") {
                document.dispatchEvent(new KeyboardEvent("keydown", { key: "Escape", bubbles: true }));
            }
        }
    }).observe(log, { attributes: true, subtree: true, attributeFilter: ["data-tokens"] });
}"""


def persona(client: httpx.Client, name: str) -> dict[str, Any]:
    created = client.post("/personas/", json={"name": name, "system_prompt": "You are a careful astronomer.", "base_model": MODEL})
    assert created.status_code == 201, created.text
    return created.json()


def settings(page: Any, **values: str) -> None:
    page.get_by_text("Generation settings").click()
    for label, value in values.items():
        page.get_by_label(label, exact=True).fill(value)


def cancelled(client: httpx.Client) -> float:
    for line in client.get("/metrics").text.splitlines():
        # The inference daemon's engine figures, labelled with their model.
        if line.startswith(f'genome_inference_requests_total{{model="{MODEL}",reason="cancelled"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_tokens_stream_in_the_page_and_the_answer_kept_is_the_one_recorded_with_its_sources(page: Any, console_server: Server) -> None:
    with console_server.client() as client:
        astra = persona(client, "Astra")
        for title, text in (("moons", FACT), ("bread", "Sourdough rises slowly because wild yeast ferments it.")):
            assert client.post(f"/personas/{astra['id']}/knowledge", json={"title": title, "text": text}).status_code == 201
    open_page(page, f"#/personas/{astra['id']}/chat", "Chat with Astra")
    settings(page, **{"Max tokens": "1000", "Temperature": "0.8", "Seed (optional)": "3", "Knowledge chunks (k)": "1"})
    page.evaluate(OBSERVE)
    message = page.get_by_label("Message")
    message.focus()
    page.keyboard.type("What is the moon of Quillon called?")
    page.keyboard.press("Shift+Enter")  # a new line, not a send
    page.keyboard.type("Answer at length.")
    page.keyboard.press("Enter")
    answer = page.locator(".message.assistant[data-state=done]")
    answer.wait_for()

    shown = answer.locator(".text").text_content()
    lengths = page.evaluate("window.lengths")
    assert len({n for n in lengths if 0 < n < len(shown)}) >= 2, lengths
    assert page.evaluate("[...window.live]") == ["off true"]
    assert page.get_by_role("log").get_attribute("aria-live") == "polite"  # the finished answer is announced
    with console_server.client() as client:
        [conversation] = client.get(f"/personas/{astra['id']}/conversations").json()["items"]
        messages = client.get(f"/conversations/{conversation['id']}").json()["messages"]
    assert messages[0]["content"] == "What is the moon of Quillon called?\nAnswer at length."
    assert messages[1]["content"] == shown
    [citation] = messages[1]["generation"]["citations"]
    source = answer.locator(".sources li")
    assert source.locator(".source-title").text_content() == "moons"
    assert source.locator(".score").text_content() == f"cosine {citation['score']:.3f}"
    assert messages[1]["generation"]["stack_hash"] is None  # an empty genome: the base model alone
    assert answer.locator(".stack").text_content().startswith(f"Stack: model {MODEL}; no layers.")

    # The history opens the recorded conversation again.
    page.reload()
    page.get_by_role("button", name="(2 messages)").click()
    page.locator(".message.assistant .sources").wait_for()
    assert page.locator(".message .text").all_text_contents() == [m["content"] for m in messages]


def test_esc_after_the_second_token_stops_the_stream_and_cancels_the_generation_on_the_server(page: Any, console_server: Server) -> None:
    with console_server.client() as client:
        vega = persona(client, "Vega")
        before = cancelled(client)
    open_page(page, f"#/personas/{vega['id']}/chat", "Chat with Vega")
    # A thousand tokens on this seed: the generation is far from its end when it is stopped.
    settings(page, **{"Max tokens": "1000", "Temperature": "1", "Seed (optional)": "1", "Knowledge chunks (k)": "0"})
    page.evaluate(STOP_AT_SECOND_TOKEN)
    page.get_by_label("Message").fill("Tell me a long story about Vesperine.")
    page.get_by_role("button", name="Send").click()
    stopped = page.locator(".message.assistant[data-state=stopped]")
    stopped.wait_for()

    with console_server.client() as client:
        deadline = time.monotonic() + 30
        while cancelled(client) < before + 1:
            assert time.monotonic() < deadline, "the server did not record the generation as cancelled"
        assert client.get(f"/personas/{vega['id']}/conversations").json()["items"] == []
    # The generation is over on the server, and the page shows no token after the second.
    assert stopped.get_attribute("data-tokens") == "2"
    assert page.get_by_role("button", name="Stop").is_disabled()
    assert "not saved" in stopped.text_content()
