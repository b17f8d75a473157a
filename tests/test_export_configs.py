"""Checkpoint configurations beyond the presets' (tests/test_export_variants.py and
tests/test_checkpoint_configs.py cover the published ones): export holds each to transformers
on the same weights, or refuses it in one line naming the setting.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def test_export_reads_the_processor_with_the_pil_backend(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runtime replays the PIL backend's arithmetic. Where torchvision is installed (as on
    every Jetson with NVIDIA's torch), transformers picks its torchvision backend instead, whose
    resize differs by up to 0.014 in normalised pixels: every export then failed verification.
    torchvision cannot be installed beside the CPU torch here, so the request itself is checked."""
    from transformers import AutoProcessor

    from llava_edge.export.exporter import load_checkpoint

    asked = []
    load = AutoProcessor.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        asked.append(kwargs.get("backend"))
        return load(cls, *args, **kwargs)

    monkeypatch.setattr(AutoProcessor, "from_pretrained", classmethod(spy))
    loaded = load_checkpoint(tiny_checkpoint)
    assert asked == ["pil"]
    assert type(loaded.processor.image_processor).__name__.endswith("Pil")
