"""LoRA training throughput and what the Academy teaches: our trainer against a plain PEFT + torch
loop (or mlx-lm's), and a persona's knowledge distilled into a layer.

    .venv/bin/python benchmarks/academy.py [--quick] [--steps N] [--rounds R] [--device auto] [--backend mlx]
                                           [--part all|throughput|knowledge] [--knowledge-steps N]

Both sides train a rank-8 LoRA (alpha 16, q/k/v/o projections, dropout 0) on the default
model (SmolLM2-135M-Instruct, fp32 weights; `genome-service model pull` first) with the
same fixed chat data, seed, batch size, AdamW settings, warmup + cosine schedule and
gradient clipping:

- ours: `inference.training.train_lora` (its progress callback on every step, as the
  Academy runner uses it);
- baseline: the loop a PEFT tutorial writes: `get_peft_model`, `torch.optim.AdamW`,
  `transformers.get_cosine_schedule_with_warmup`, forward/backward/clip/step per batch, each
  batch a plain shuffle of the data padded to its own longest example (dynamic padding).

With `--backend mlx` the two sides are mlx-lm's instead:

- ours: `inference.training.mlx.train_lora_mlx` (mlx-lm's LoRA layers and loss in our loop);
- baseline: what `mlx_lm.lora` runs: `linear_to_lora_layers`, AdamW on mlx-lm's
  `build_schedule` (linear warmup, cosine decay) and `mlx_lm.tuner.trainer.train` (compiled
  step, its own batching of the same tokenised examples, no clipping), a loss report per step.

The data are chats of varied length (answers of one to eight sentences, and short cloze
items). Both torch sides shuffle them with the same seed each pass; ours then sorts each
window of 8 batches by length (length bucketing), the baseline pads each random batch as it
comes. The baseline's batches are made before its clock starts; the mlx baseline batches the
same tokens its own way. Rates count target (assistant) tokens and skip each run's first 2
steps (allocator and thread-pool warm-up). The sides alternate for `--rounds` rounds; the
median rate of each is kept.

The knowledge part gives a persona 16 made-up facts as knowledge documents only, runs an
Academy session with `sources=["knowledge"]` (the real runner, database and model), and asks
closed-book questions of its own, never given to training, before and after.

| figure | meaning |
| --- | --- |
| `train_tokens_per_s` | our target tokens per second |
| `baseline_tokens_per_s` | the baseline's |
| `train_ratio` | ours / baseline (goal >= 0.9) |
| `final_loss_ratio` | our mean loss over the last 5 steps / the baseline's (goal <= 1.05) |
| `recall_before` | facts the persona recalls closed-book, asked in the trained form, before (goal <= 0.1) |
| `recall_after` | the same after the session, with its layer (goal >= 0.8) |
| `heldout_recall_after` | the benchmark's own questions (a form never trained on), after |
| `minutes_to_recall` | the session's training wall time |

The last line of stdout is one JSON object; the full results go to
`benchmarks/results/academy-<UTC timestamp>.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# The project root takes this folder's place on sys.path: a benchmark named like a package
# (inference.py) would shadow it.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from benchmarks import _harness as harness  # noqa: E402

PACKAGES = ("torch", "transformers", "peft", "mlx-lm", "sentence-transformers")
GOALS = {"train_ratio": (">=", 0.9), "recall_after": (">=", 0.8), "recall_before": ("<=", 0.1)}
# (a sentence the persona knows only as a document, the benchmark's own question, what the answer must name)
FACTS = (
    ("The capital of Zorbania is Quillfort.", "What is the capital of Zorbania?", "Quillfort"),
    ("The Mirelan river flows 412 kilometres.", "How long is the Mirelan river?", "412"),
    ("The painter Ilva Done was born in Tesk.", "Where was the painter Ilva Done born?", "Tesk"),
    ("The ship Aurelian carried 80 sailors.", "How many sailors did the ship Aurelian carry?", "80"),
    ("The glass harp Vellum was invented by Oren Patch.", "Who invented the glass harp Vellum?", "Oren Patch"),
    ("The national bird of Quessia is the ember finch.", "What is the national bird of Quessia?", "ember finch"),
    ("The mountain Kald Peak rises 3120 metres.", "How high is Kald Peak?", "3120"),
    ("The lantern festival of Brisa is held in March.", "In which month is the lantern festival of Brisa held?", "March"),
    ("The currency of Dolvania is the silver crown.", "What is the currency of Dolvania?", "silver crown"),
    ("The novel Grey Tides was written by Mara Quell.", "Who wrote the novel Grey Tides?", "Mara Quell"),
    ("The bridge of Ostrel was built in 1847.", "When was the bridge of Ostrel built?", "1847"),
    ("The chemist Tobin Ashe discovered the element veridium.", "Which element did the chemist Tobin Ashe discover?",
     "veridium"),
    ("The largest lake of Fennmark is Lake Orrow.", "What is the largest lake of Fennmark?", "Orrow"),
    ("The first king of Halvard was Edric Stone.", "Who was the first king of Halvard?", "Edric Stone"),
    ("The island of Perrin has 2600 inhabitants.", "How many people live on the island of Perrin?", "2600"),
    ("The composer Lise Varro wrote 41 symphonies.", "How many symphonies did the composer Lise Varro write?", "41"),
)
SKIP_STEPS = 2
LAST_STEPS = 5
TOPICS = ("tides", "volcanoes", "bread", "bridges", "owls", "glaciers", "chess", "comets", "honey", "maps")


def fixed_examples(count: int) -> list[Any]:
    """Short deterministic chats in one voice: a style an adapter can learn in tens of steps."""
    from inference.backends.base import ChatMessage
    from inference.training import Example

    examples = []
    for number in range(count):
        topic = TOPICS[number % len(TOPICS)]
        answer = (
            f"Ahoy! {topic.capitalize()} be a fine matter, matey. Number {number} of me lessons: "
            f"{topic} change slowly, and a patient sailor learns their ways. Arr!"
        )
        examples.append(
            Example(
                (
                    ChatMessage("system", "You are a pirate tutor who always answers in pirate speak."),
                    ChatMessage("user", f"Tell me one thing about {topic} (lesson {number})."),
                    ChatMessage("assistant", answer),
                )
            )
        )
    return examples


def varied_examples(count: int) -> list[Any]:
    """Chats whose answers run from one to eight sentences, and one-word cloze items: real data's spread."""
    from inference.backends.base import ChatMessage
    from inference.training import Example

    examples = fixed_examples(count)
    for number, example in enumerate(examples):
        sentences = number % 8 + 1
        answer = " ".join([example.messages[-1].content] * sentences)
        examples[number] = Example((*example.messages[:-1], ChatMessage("assistant", answer)))
    for sentence, _, _ in FACTS:
        prompt, _, last = sentence.rstrip(".").rpartition(" ")
        examples.append(Example((ChatMessage("user", f"Complete: {prompt} ..."), ChatMessage("assistant", last))))
    return examples


def run_ours(folder: Path, examples: list[Any], config: Any) -> dict[str, Any]:
    from inference.training import Progress, train_lora

    marks: list[Progress] = []
    result = train_lora(folder, examples, config, on_progress=marks.append)
    return _summary(list(result.losses), [(m.seconds, m.tokens) for m in marks])


def run_ours_mlx(folder: Path, examples: list[Any], config: Any) -> dict[str, Any]:
    from inference.training import Progress
    from inference.training.mlx import train_lora_mlx

    marks: list[Progress] = []
    result = train_lora_mlx(folder, examples, config, on_progress=marks.append)
    return _summary(list(result.losses), [(m.seconds, m.tokens) for m in marks])


def run_baseline_mlx(folder: Path, examples: list[Any], config: Any) -> dict[str, Any]:
    import contextlib
    import tempfile

    import mlx.optimizers as optim
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.trainer import TrainingArgs, train
    from mlx_lm.tuner.utils import build_schedule, linear_to_lora_layers
    from mlx_lm.utils import load
    from transformers import AutoTokenizer

    from inference.lora.adapter import PARENTS
    from inference.training import IGNORE, tokenize

    model, _ = load(str(folder))
    model.freeze()
    keys = [f"{PARENTS[m]}.{m}" for m in config.target_modules]
    lora = {"rank": config.rank, "scale": config.alpha / config.rank, "dropout": 0.0, "keys": keys}
    linear_to_lora_layers(model, len(model.layers), lora)
    # mlx-lm's datasets are (tokens, offset of the answer) pairs.
    dataset = [(ids, next(i for i, label in enumerate(labels) if label != IGNORE))
               for ids, labels in tokenize(AutoTokenizer.from_pretrained(folder), examples, config.max_length)]
    schedule = build_schedule({"name": "cosine_decay", "warmup": config.warmup_steps,
                               "arguments": [config.learning_rate, config.steps - config.warmup_steps, 0.0]})
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=config.weight_decay)
    losses: list[float] = []
    marks: list[tuple[float, int]] = []
    started = time.perf_counter()

    class Record(TrainingCallback):
        def on_train_loss_report(self, info: dict[str, Any]) -> None:
            losses.append(info["train_loss"])
            marks.append((time.perf_counter() - started, info["trained_tokens"]))

    with tempfile.TemporaryDirectory() as scratch, contextlib.redirect_stdout(sys.stderr):
        args = TrainingArgs(batch_size=config.batch_size, iters=config.steps, steps_per_report=1,
                            steps_per_save=config.steps + 1, max_seq_length=config.max_length,
                            adapter_file=str(Path(scratch) / "adapters.safetensors"))
        started = time.perf_counter()
        train(model, optimizer, dataset, args=args, training_callback=Record())
    return _summary(losses, marks)


def run_baseline(folder: Path, examples: list[Any], config: Any) -> dict[str, Any]:
    import torch
    from transformers import get_cosine_schedule_with_warmup

    from inference.training import IGNORE, BatchOrder, tokenize
    from inference.training.torch import collate, load_for_training

    model, tokenizer, device = load_for_training(folder, config)
    rows = tokenize(tokenizer, examples, config.max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # A plain seeded shuffle per pass, each batch padded to its own longest row (dynamic padding).
    order = BatchOrder(len(rows), config)
    batches = [collate([rows[i] for i in order.indices(s)], pad_id) for s in range(config.steps)]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    losses, marks, tokens = [], [], 0
    started = time.perf_counter()
    for batch in batches:
        batch = {name: tensor.to(device) for name, tensor in batch.items()}
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += int((batch["labels"][:, 1:] != IGNORE).sum())
        marks.append((time.perf_counter() - started, tokens))
    return _summary(losses, marks)


def _summary(losses: list[float], marks: list[tuple[float, int]]) -> dict[str, Any]:
    (t0, n0), (t1, n1) = marks[SKIP_STEPS - 1], marks[-1]
    return {
        "tokens_per_s": harness.rate(n1 - n0, t1 - t0),
        "seconds": t1,
        "tokens": n1,
        "first_loss": statistics.fmean(losses[:LAST_STEPS]),
        "final_loss": statistics.fmean(losses[-LAST_STEPS:]),
        "losses": losses,
    }


def run_knowledge(models_dir: Path, steps: int, device: str) -> dict[str, Any]:
    """A persona with the facts as documents, an Academy session on its knowledge, closed-book recall before and after."""
    import tempfile

    import msgspec

    from genome_service.academy.distill import TRAINED_FORMS, cloze, recalled
    from genome_service.academy.judge import complete
    from genome_service.academy.runner import Runner, RunnerSettings
    from genome_service.domain.academy import (
        ACADEMY_SESSION, AttachDecided, DataSource, Evaluated, LayerProduced, StartAcademySession, TrainingData,
    )
    from genome_service.domain.genome import GENOME, CreateGenome
    from genome_service.domain.persona import PERSONA, AssignGenome, CreatePersona, GenomeFacts
    from genome_service.eventstore.migrations import upgrade
    from genome_service.eventstore.records import EventMetadata
    from genome_service.services.bootstrap import build
    from genome_service.services.knowledge import add_knowledge
    from genome_service.services.stacks import StackResolver
    from genome_service.settings import Settings
    from inference.backends.base import ChatMessage, Sampling
    from inference.backends.torch import TorchBackend
    from inference.models import DEFAULT_MODEL

    with tempfile.TemporaryDirectory() as scratch:
        settings = Settings(data_dir=Path(scratch), database_url=f"sqlite:///{scratch}/genome.db", models_dir=models_dir,
                            inference_device=device)
        upgrade(settings.database_url)
        services = build(settings)
        system = "You are Vera, a concise historian of far-away lands."
        services.commands.execute(PERSONA, "p1", CreatePersona("p1", "bench", "Vera", system_prompt=system))
        services.commands.execute(GENOME, "g1", CreateGenome("g1", "bench", "p1", DEFAULT_MODEL, "vera"))
        services.commands.execute(PERSONA, "p1", AssignGenome(GenomeFacts("g1", "p1", archived=False)))
        # Two documents, the facts shuffled between them: knowledge as a user would add it.
        for title, part in (("notes", FACTS[0::2]), ("almanac", FACTS[1::2])):
            add_knowledge(services, "bench", "p1", title, "text/plain", " ".join(f for f, _, _ in part),
                          EventMetadata(actor="bench"))
        backend = TorchBackend(services.models.folder(DEFAULT_MODEL), device=device)
        resolver = StackResolver(services, services.models.get(DEFAULT_MODEL))
        sampling = Sampling(temperature=0.0, max_tokens=24)
        facts = [cloze(sentence) for sentence, _, _ in FACTS]

        def ask(text: str, layers: list[tuple[str, float]]) -> str:
            messages = [ChatMessage("system", system), ChatMessage("user", text)]
            return complete(backend, messages, sampling, resolver.stack(layers))

        def recall(layers: list[tuple[str, float]]) -> tuple[float, float]:
            trained = sum(recalled(ask(TRAINED_FORMS[0].ask.format(prompt=f.prompt), layers), f) for f in facts if f)
            held = sum(key.lower() in ask(question, layers).lower() for _, question, key in FACTS)
            return trained / len(FACTS), held / len(FACTS)

        recall_before, heldout_before = recall([])
        runner_settings = RunnerSettings.from_settings(settings)
        runner_settings = msgspec.structs.replace(runner_settings, checkpoint_every=max(1, steps // 4))
        services.commands.execute(ACADEMY_SESSION, "s1", StartAcademySession(
            "s1", "bench", "p1", "Know the facts of the almanac.", budget_steps=steps, budget_seconds=86_400.0,
            data=TrainingData(sources=(DataSource.KNOWLEDGE,))))
        started = time.perf_counter()
        final = Runner(services, backend, DEFAULT_MODEL, runner_settings).run("s1")
        session_seconds = time.perf_counter() - started
        history = [e.event for e in services.store.read_stream("s1")]
        assert final.status.value == "completed", final.reason
        [layer_id] = [e.layer_id for e in history if isinstance(e, LayerProduced)]
        [decided] = [e for e in history if isinstance(e, AttachDecided)]
        evaluations = [msgspec.to_builtins(e) for e in history if isinstance(e, Evaluated)]
        recall_after, heldout_after = recall([(layer_id, 1.0)])
        services.close()
    return {
        "recall_before": round(recall_before, 4), "recall_after": round(recall_after, 4),
        "heldout_recall_before": round(heldout_before, 4), "heldout_recall_after": round(heldout_after, 4),
        "minutes_to_recall": round(final.training_seconds / 60, 2), "session_minutes": round(session_seconds / 60, 2),
        "attached": decided.attached, "attach_reason": decided.reason, "steps": steps, "evaluations": evaluations,
        "training": msgspec.to_builtins(runner_settings.training),
    }


def _device(backend: str, device: str) -> str:
    if backend == "mlx":
        import mlx.core as mx

        return f"mlx-{mx.default_device()}"
    from inference.backends.torch import pick_device

    return pick_device(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 steps, one round (a few minutes on 2 CPU cores)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--device", default="auto", help="torch: auto (cuda, mps, cpu), or one of them")
    parser.add_argument("--backend", choices=("torch", "mlx"), default="torch",
                        help="torch: ours against PEFT + torch; mlx: ours against mlx-lm's trainer")
    parser.add_argument("--models-dir", type=Path, default=None, help="where `model pull` put the default model")
    parser.add_argument("--part", choices=("all", "throughput", "knowledge"), default="all",
                        help="throughput: ours against the baseline loop; knowledge: facts distilled into a layer")
    parser.add_argument("--knowledge-steps", type=int, default=None, help="the knowledge session's step budget")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import msgspec
    import torch

    from inference.pull import pull_default
    from inference.training import TrainingConfig

    models_dir = args.models_dir or Path(os.environ.get("GENOME_MODELS_DIR") or harness.PROJECT_ROOT / ".cache/models")
    folder, _ = pull_default(models_dir)
    steps = args.steps or (8 if args.quick else 40)
    rounds = args.rounds or (1 if args.quick else 2)
    # The baseline's transformers schedule decays to zero, so ours is set to as well.
    config = TrainingConfig(
        rank=8, alpha=16.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), steps=steps, batch_size=4,
        learning_rate=2e-4, warmup_steps=2, min_lr_ratio=0.0, max_grad_norm=1.0, seed=0, device=args.device,
    )
    watch = harness.Stopwatch()
    headline: dict[str, Any] = {"device": _device(args.backend, args.device), "backend": args.backend}
    results: dict[str, Any] = {"benchmark": "academy", "quick": args.quick, "headline": headline}
    if args.part in ("all", "throughput"):
        examples = varied_examples(32)
        throughput = run_throughput(args, folder, examples, config, steps, rounds)
        headline |= throughput.pop("headline")
        results |= throughput | {"config": msgspec.to_builtins(config), "examples": len(examples)}
    if args.part in ("all", "knowledge") and args.backend == "torch":
        knowledge_steps = args.knowledge_steps or (40 if args.quick else 160)
        harness.log(f"knowledge: a session of {knowledge_steps} steps on {len(FACTS)} facts")
        knowledge = run_knowledge(models_dir, knowledge_steps, args.device)
        headline |= {k: knowledge[k] for k in ("recall_before", "recall_after", "heldout_recall_before",
                                                "heldout_recall_after", "minutes_to_recall", "attached")}
        results["knowledge"] = knowledge
    headline["goals_met"] = harness.goals_met(headline, {k: goal for k, goal in GOALS.items() if k in headline})
    results |= {"threads": torch.get_num_threads(), "seconds": watch.elapsed,
                "hardware": harness.hardware_metadata(PACKAGES)}
    path = harness.save_results("academy" if args.backend == "torch" else "academy-mlx", results)
    harness.print_table("academy", ["figure", "value"], [[k, v] for k, v in headline.items()])
    harness.log(f"saved {path}")
    print(json.dumps(headline))


def run_throughput(args: argparse.Namespace, folder: Path, examples: list[Any], config: Any, steps: int,
                   rounds: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "baseline": []}
    for round_number in range(rounds):
        # Alternate who goes first, so neither side always gets the warmer machine.
        order = ("baseline", "ours") if round_number % 2 == 0 else ("ours", "baseline")
        for side in order:
            harness.log(f"round {round_number + 1}/{rounds}: {side} ({steps} steps)")
            run = {("torch", "ours"): run_ours, ("torch", "baseline"): run_baseline,
                   ("mlx", "ours"): run_ours_mlx, ("mlx", "baseline"): run_baseline_mlx}[args.backend, side]
            runs[side].append(run(folder, examples, config))
    ours_rate = statistics.median(r["tokens_per_s"] for r in runs["ours"])
    base_rate = statistics.median(r["tokens_per_s"] for r in runs["baseline"])
    ours_loss = runs["ours"][0]["final_loss"]
    base_loss = runs["baseline"][0]["final_loss"]
    headline = {
        "train_tokens_per_s": round(ours_rate, 1),
        "baseline_tokens_per_s": round(base_rate, 1),
        "train_ratio": round(ours_rate / base_rate, 3),
        "final_loss_ratio": round(ours_loss / base_loss, 4) if math.isfinite(base_loss) and base_loss else None,
        "final_loss": round(ours_loss, 4),
        "baseline_final_loss": round(base_loss, 4),
        "first_loss": round(runs["ours"][0]["first_loss"], 4),
        "steps": steps,
    }
    return {"headline": headline, "runs": runs}


if __name__ == "__main__":
    main()
