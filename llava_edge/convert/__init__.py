"""Converters of LLaVA checkpoint formats in the wild into ordinary checkpoint dirs that
`llava-edge export` takes (see docs/checkpoints.md)."""

from llava_edge.convert.checkpoint import convert_checkpoint

__all__ = ["convert_checkpoint"]
