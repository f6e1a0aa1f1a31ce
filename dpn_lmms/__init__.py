"""lmms-eval integration (the optional extra `pip install -e '.[lmms]'`): a `dpn` model for lmms-eval 0.7.

    lmms-eval eval --model dpn --model_args pretrained=DIR,compressor=dpn,budget=0.6 --tasks mme

lmms-eval reads `ModelManifest`s from the `lmms_eval.models` entry-point group when it builds its model
registry; pyproject.toml points that group at `manifests` below. This module imports nothing but the
manifest class, so a broken install of the model's dependencies cannot break lmms-eval's registry for
its other models: the model class (`dpn_lmms.model.DPNLmms`) is imported only when `--model dpn` runs.
"""

from __future__ import annotations

MODEL_ID = "dpn"
MODEL_CLASS = "dpn_lmms.model.DPNLmms"


def manifests():
    """The entry point's payload: lmms-eval's model registry registers `dpn` from it."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS)]


__all__ = ["MODEL_CLASS", "MODEL_ID", "manifests"]
