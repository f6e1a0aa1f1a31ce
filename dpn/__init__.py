"""DPN (Dynamic Pyramid Network) for LLaVA-style multimodal LLMs: single-device model code (torch and
transformers only).

    from dpn import DPNConfig, DPNForConditionalGeneration, DPNProcessor

The public names are imported on first use (PEP 562), so `import dpn` loads neither torch nor
transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> the module that defines it.
_EXPORTS = {
    "DPNConfig": "dpn.configuration_dpn",
    "DPNForConditionalGeneration": "dpn.modeling_dpn",
    "DPNPreTrainedModel": "dpn.modeling_dpn",
    "DPNOutput": "dpn.modeling_dpn",
    "DPNProcessor": "dpn.processing_dpn",
    "COMPRESSORS": "dpn.compressors",
    "load_model": "dpn.inference",
    "load_model_and_processor": "dpn.inference",
    "predict": "dpn.inference",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dpn' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
