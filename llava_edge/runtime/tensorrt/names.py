"""Which engine tensor is which: the IO names the backend binds, read from the manifest."""

from __future__ import annotations

from dataclasses import dataclass

from llava_edge.errors import LlavaEdgeError
from llava_edge.manifest import Manifest

# The decoder's fixed IO names: the export contract (see llava_edge.export), as the onnxruntime
# backend uses them.
INPUTS_EMBEDS = "inputs_embeds"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"


@dataclass(frozen=True)
class IONames:
    pixel_values: str  # vision encoder input
    vision_features: str  # vision encoder output
    projector_input: str  # fed from the vision encoder's output buffer, on the device
    image_embeds: str  # projector output
    layers: tuple[
        tuple[str, str, str, str], ...
    ]  # (past key, past value, present key, present value)
    inputs_embeds: str = INPUTS_EMBEDS
    attention_mask: str = ATTENTION_MASK
    position_ids: str = POSITION_IDS
    logits: str = LOGITS

    @property
    def past(self) -> set[str]:
        return {name for layer in self.layers for name in layer[:2]}


def io_names(manifest: Manifest) -> IONames:
    """The names, checked against the graphs' specs so binding by name cannot miss a tensor."""
    vision, projector, decoder = (
        manifest.graphs[g] for g in ("vision_encoder", "projector", "decoder")
    )
    for name, graph in (("vision_encoder", vision), ("projector", projector)):
        if len(graph.inputs) != 1 or len(graph.outputs) != 1:
            raise LlavaEdgeError(
                f"the manifest's {name} has {len(graph.inputs)} inputs and {len(graph.outputs)} "
                "outputs; the TensorRT backend runs graphs of one of each (re-export the model)"
            )
    layers = tuple(manifest.kv_names(i) for i in range(manifest.text.num_layers))
    names = IONames(
        pixel_values=next(iter(vision.inputs)),
        vision_features=next(iter(vision.outputs)),
        projector_input=next(iter(projector.inputs)),
        image_embeds=next(iter(projector.outputs)),
        layers=layers,
    )
    inputs = {INPUTS_EMBEDS, ATTENTION_MASK, POSITION_IDS} | names.past
    outputs = {LOGITS} | {name for layer in layers for name in layer[2:]}
    if set(decoder.inputs) != inputs or set(decoder.outputs) != outputs:
        raise LlavaEdgeError(
            "the manifest's decoder IO differs from the export contract (inputs "
            f"{sorted(set(decoder.inputs) ^ inputs)} or outputs {sorted(set(decoder.outputs) ^ outputs)} "
            "do not match); re-export the model with this llava-edge"
        )
    return names
