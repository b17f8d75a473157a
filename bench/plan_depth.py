"""`llava-edge plan` for a full-depth model, from two shallow exports of it, printed as JSON.

    .venv/bin/python bench/plan_depth.py ONE_LAYER_DIR TWO_LAYER_DIR --text-layers 32 \\
        --vision-layers 23 [--backend tensorrt] [--max-context 4096]

Exporting LLaVA-1.5-7B whole needs 28 GB of RAM for its fp32 weights. Its real shapes can be
exported one and two layers deep instead (`llava-edge init --preset llava-1.5-7b --layers N`,
then export and quantize as usual): what one more layer adds to each graph, read from the real
graph files, times the layers the full model has, gives the full model's weights at their stored
precision. The vision tower of an N-layer export runs N - 1 layers (LLaVA takes the features of
layer -2), so `--vision-layers` is the layers the full tower runs (23 of CLIP ViT-L's 24). The
rest of the plan (KV cache, activations, overhead, the bound on decode speed) is the same
arithmetic as `llava-edge plan`, for every Jetson in its device table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from llava_edge.manifest import Manifest
from llava_edge.runtime.plan import DEVICES, ModelShapes, plan_for, read_shapes


def scaled(one: ModelShapes, two: ModelShapes, layers: dict[str, int]) -> ModelShapes:
    """`two`'s shapes with each graph's per-layer bytes repeated to `layers[graph]` layers
    (graph -> layers beyond the one-layer export's; graphs not named keep their size)."""
    sizes = {}
    for name, b in two.sizes.items():
        a = one.sizes[name]
        extra = layers.get(name, 0)
        weights = {
            dtype: a.weights.get(dtype, 0)
            + extra * (b.weights.get(dtype, 0) - a.weights.get(dtype, 0))
            for dtype in set(a.weights) | set(b.weights)
        }
        sizes[name] = dataclasses.replace(b, weights=weights) if extra else b
    return dataclasses.replace(two, sizes=sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("one_layer", type=Path)
    parser.add_argument("two_layers", type=Path)
    parser.add_argument("--text-layers", type=int, required=True)
    parser.add_argument("--vision-layers", type=int, required=True)
    parser.add_argument("--backend", default="tensorrt", choices=["onnxruntime", "tensorrt"])
    parser.add_argument("--max-context", type=int)
    args = parser.parse_args()
    one = read_shapes(args.one_layer, Manifest.load(args.one_layer), args.backend)
    two = read_shapes(args.two_layers, Manifest.load(args.two_layers), args.backend)
    shapes = scaled(
        one, two, {"decoder": args.text_layers - 1, "vision_encoder": args.vision_layers}
    )
    text = dataclasses.replace(shapes.manifest.text, num_layers=args.text_layers)
    shapes = dataclasses.replace(shapes, manifest=dataclasses.replace(shapes.manifest, text=text))
    context = args.max_context or text.max_context
    name = f"{args.two_layers} scaled to {args.text_layers} text layers"
    plans = {
        key: plan_for(shapes, device, args.backend, context, 1, name).to_dict()
        for key, device in DEVICES.items()
    }
    print(json.dumps(plans, indent=2))


if __name__ == "__main__":
    from _entry import run  # bench/ is on the path of a script run from it

    run(main)
