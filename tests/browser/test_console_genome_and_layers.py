"""A genome edited in the browser is what the API then returns, with its history; layers are
uploaded (the API's refusal shown in place), listed and found by text or by similarity."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
from console_browser import MODEL, Watch, open_page, tiny_adapter, upload_files
from servers import Server


def register(client: httpx.Client, files: dict[str, bytes], name: str, **metadata: object) -> dict[str, Any]:
    body = {"name": name, "base_model": MODEL, "trait_type": "tone_and_voice"} | metadata
    created = client.post("/layers/", files=[("files", (n, d)) for n, d in files.items()], data={"metadata": json.dumps(body)})
    assert created.status_code == 201, created.text
    return created.json()


def test_a_weight_edit_and_a_move_in_the_page_are_what_the_api_returns(page: Any, console_server: Server, tiny_model: Path) -> None:
    with console_server.client() as client:
        persona = client.post("/personas/", json={"name": "Orion", "base_model": MODEL}).json()
        genome_id = persona["genome_id"]
        alpha, beta, gamma = (register(client, tiny_adapter(tiny_model, seed), name)["id"]
                              for seed, name in ((11, "alpha"), (12, "beta"), (13, "gamma")))
        for layer_id, weight in ((alpha, 0.5), (beta, 1.0)):
            assert client.post(f"/genomes/{genome_id}/layers", json={"layer_id": layer_id, "weight": weight}).status_code == 200
    open_page(page, f"#/genomes/{genome_id}", "Genome Orion")

    page.get_by_label("Weight of alpha").fill("0.25")
    page.get_by_label("Weight of alpha").press("Enter")
    page.get_by_text("version 4,").wait_for()
    page.get_by_role("button", name="Move alpha up").click()
    page.get_by_text("version 5,").wait_for()

    with console_server.client() as client:
        genome = client.get(f"/genomes/{genome_id}").json()
    assert [(ref["layer_id"], ref["weight"], ref["position"]) for ref in genome["layers"]] == [(beta, 1.0, 0), (alpha, 0.25, 1)]
    history = page.locator(".events li").all_text_contents()
    assert "stack set to alpha ×0.25, beta ×1" in history[3]
    page.get_by_role("button", name="Stack at v3").click()
    past = page.get_by_role("table", name="Stack at version 3")
    past.wait_for()
    assert past.locator("tbody tr").all_inner_texts() == ["0\talpha\t0.5", "1\tbeta\t1"]

    # Detach and attach work on the same stack; a fork gets a page of its own.
    page.get_by_role("button", name="Detach beta").click()
    page.get_by_text("version 6,").wait_for()
    page.get_by_label("Layer", exact=True).select_option(label="gamma (tone_and_voice)")
    page.get_by_label("Weight", exact=True).fill("0.75")
    page.get_by_role("button", name="Attach", exact=True).click()
    page.get_by_text("version 7,").wait_for()
    page.get_by_label("Name of the fork").fill("Orion B")
    page.get_by_role("button", name="Fork genome").click()
    page.get_by_role("heading", level=1, name="Genome Orion B").wait_for()
    fork_id = page.url.rsplit("/", 1)[1]
    with console_server.client() as client:
        fork = client.get(f"/genomes/{fork_id}").json()
    assert fork["parent_ids"] == [genome_id]
    assert [(ref["layer_id"], ref["weight"]) for ref in fork["layers"]] == [(alpha, 0.25), (gamma, 0.75)]


def test_a_corrupt_adapter_shows_the_apis_error_and_a_good_one_is_listed_and_found(
    page: Any, watch: Watch, console_server: Server, tiny_model: Path, tmp_path: Path,
) -> None:
    watch.expect_error("the server responded with a status of 422")
    good = tiny_adapter(tiny_model, seed=21)
    corrupt = {**good, "adapter_model.safetensors": good["adapter_model.safetensors"][:100]}
    with console_server.client() as client:
        refused = client.post("/layers/", files=[("files", (n, d)) for n, d in corrupt.items()],
                              data={"metadata": json.dumps({"name": "x", "base_model": MODEL, "trait_type": "tone_and_voice"})})
        assert refused.status_code == 422
        register(client, tiny_adapter(tiny_model, seed=22), "soothing narrator", tags=["calm", "voice"],
                 description="A gentle, soothing, calm speaking voice.")
    open_page(page, "#/layers", "Layers")

    page.get_by_label("Name", exact=True).fill("calm speaker")
    page.get_by_label("Base model", exact=True).last.fill(MODEL)
    page.get_by_label("Tags").last.fill("calm, gentle")
    page.get_by_label("Description").fill("Speaks in a calm and gentle voice.")
    page.get_by_label("Adapter files").set_input_files(upload_files(tmp_path / "bad", corrupt))
    page.get_by_role("button", name="Upload").click()
    alert = page.locator("section form [role=alert]")
    alert.wait_for()
    assert alert.text_content() == refused.json()["detail"]

    page.get_by_label("Adapter files").set_input_files(upload_files(tmp_path / "good", good))
    page.get_by_role("button", name="Upload").click()
    row = page.get_by_role("row").filter(has_text="calm speaker")
    row.wait_for()
    with console_server.client() as client:
        [uploaded] = [layer for layer in client.get("/layers/").json()["items"] if layer["name"] == "calm speaker"]
        similar = client.post("/layers/search", json={"like_layer_id": uploaded["id"], "k": 10}).json()["items"]
    assert uploaded["tags"] == ["calm", "gentle"]

    row.get_by_role("button", name="Similar to calm speaker").click()
    found = page.get_by_role("table", name="Similar to calm speaker")
    found.wait_for()
    narrator = found.get_by_role("row").filter(has_text="soothing narrator")
    [expected] = [f"cosine {r['score']:.3f}" for r in similar if r["layer"]["name"] == "soothing narrator"]
    assert narrator.locator("td").last.text_content() == expected

    page.get_by_label("Describe what you need").fill("a calm, gentle voice")
    page.get_by_role("button", name="Search").click()
    by_text = page.get_by_role("table", name="Layers for “a calm, gentle voice”")
    by_text.wait_for()
    assert by_text.get_by_role("row").filter(has_text="calm speaker").locator("td").last.text_content().startswith("cosine ")
