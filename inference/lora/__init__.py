"""LoRA adapters: upload formats (mlx-lm and PEFT), validation, canonical form."""

from inference.lora.adapter import (
    AdapterInfo,
    AdapterRejected,
    mlx_files,
    parse_adapter,
    peft_files,
    to_canonical,
    write_mlx,
    write_peft,
)

__all__ = [
    "AdapterInfo",
    "AdapterRejected",
    "mlx_files",
    "parse_adapter",
    "peft_files",
    "to_canonical",
    "write_mlx",
    "write_peft",
]
