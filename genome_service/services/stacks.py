"""From a persona (or a list of layer ids and weights) to the LoRA stack a backend runs.

Reads the read models (persona -> genome -> ordered layer refs, layer -> adapter blobs),
validates each adapter against the running model before first use, and keeps decoded
adapters and assembled stacks in the caches of `inference.lora.cache`.
"""

from __future__ import annotations

from collections.abc import Sequence

from genome_service.domain.common import DomainError, require_weight
from genome_service.projections.queries import Row, get_row
from genome_service.projections.tables import LAYERS, PERSONAS
from genome_service.services.bootstrap import Services
from genome_service.services.genomes import Genomes
from genome_service.services.layers import adapter_manifest
from inference.daemon.protocol import StackEntry
from inference.lora.adapter import AdapterRejected, parse_adapter, to_canonical
from inference.lora.cache import AdapterCache, LoadedAdapter, StackCache
from inference.lora.stack import LoraStack
from inference.models import ModelSpec

LayerWeights = list[tuple[str, float]]


class StackResolver:
    """Resolves layer stacks for the model `spec`, through caches sized by the settings.

    `by_reference`: stacks are adapter references (content hash, weight) for the inference
    daemon, which reads, validates and caches the adapters itself.
    """

    def __init__(self, services: Services, spec: ModelSpec, *, by_reference: bool = False) -> None:
        self._services = services
        self._genomes = Genomes(services)
        self.spec = spec
        self.by_reference = by_reference
        settings = services.settings
        self.stacks = StackCache(settings.stack_cache_size, AdapterCache(settings.adapter_cache_bytes))

    def persona(self, persona_id: str) -> tuple[str, LayerWeights]:
        """The persona's system prompt and its genome's ordered (layer id, weight) list."""
        # One read transaction: the prompt and the stack as of the same commit.
        with self._services.database.read() as connection:
            persona = get_row(connection, PERSONAS, "persona_id", persona_id)
            if persona is None or persona["archived"]:
                raise DomainError("persona_not_found", f"persona {persona_id!r} does not exist")
            genome = self._genomes.of_persona(persona_id)
        layers = genome.layers if genome is not None else []
        return persona["system_prompt"], [(layer.layer_id, float(layer.weight)) for layer in layers]

    def stack(self, layers: Sequence[tuple[str, float]]) -> LoraStack | list[StackEntry] | None:
        """The assembled stack, or its references (None for no layers: the plain base model)."""
        for _, weight in layers:
            require_weight(weight)
        if not layers:
            return None
        if self.by_reference:
            return [StackEntry(self._layer(layer_id)["adapter_sha256"], weight) for layer_id, weight in layers]
        return self.stacks.get(layers, self.load_adapter)

    def _layer(self, layer_id: str) -> Row:
        with self._services.database.read() as connection:
            layer = get_row(connection, LAYERS, "layer_id", layer_id)
        if layer is None:
            raise DomainError("layer_not_found", f"layer {layer_id!r} does not exist")
        if layer["erased"]:
            raise DomainError("layer_erased", f"layer {layer_id!r} was erased with persona {layer['personal_of']}: "
                                              "its weights are gone (detach it)")
        if layer["base_model"] != self.spec.name:
            raise DomainError(
                "base_model_mismatch",
                f"layer {layer_id!r} was trained for {layer['base_model']!r}; the engine runs {self.spec.name!r}",
            )
        return layer

    def load_adapter(self, layer_id: str) -> LoadedAdapter:
        """Read one layer's adapter from the blob store and validate it against the model."""
        layer = self._layer(layer_id)
        blobs = self._services.blobs
        manifest = adapter_manifest(self._services, layer["adapter_sha256"])
        files = {name: blobs.read(sha256) for name, sha256 in manifest.files.items()}
        # Checked again before use: the limits may have tightened since upload, and a blob
        # on disk can rot.
        try:
            info = parse_adapter(files, self.spec, max_rank=self._services.settings.max_lora_rank)
        except AdapterRejected as exc:
            raise AdapterRejected(exc.reason, f"layer {layer_id!r}: {exc}") from None
        return LoadedAdapter(to_canonical(files, info), info.scale)
