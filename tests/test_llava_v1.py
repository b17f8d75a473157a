"""LLaVA v1's linear projector end to end: `init --projector linear`, both training stages, a
verified export and an answer from the runtime, all through the CLI.

transformers has no class with a linear projector; the reference here is the original LLaVA's
math itself: the projector is one nn.Linear (features @ W.T + b), checked on the checkpoint's own
saved weights, and export's verification holds the graphs to that model's generate().
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file

from llava_edge.cli import main as cli
from llava_edge.training.synth import synthesize

TRAIN = [
    "--max-steps",
    "2",
    "--batch-size",
    "4",
    "--lr",
    "1e-2",
    "--warmup-ratio",
    "0",
    "--no-gradient-checkpointing",
    "--save-steps",
    "1000",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("v1")
    data = synthesize(root / "data", train=8, test=2, seed=3)
    init = root / "init"
    assert cli(["init", str(init), "--preset", "tiny", "--projector", "linear"]) == 0
    stage1 = root / "stage1"
    argv = ["--images", str(data["images"]), *TRAIN]
    assert (
        cli(
            [
                "train",
                "--stage",
                "1",
                "--model",
                str(init),
                "--data",
                str(data["captions"]),
                "--out",
                str(stage1),
                *argv,
            ]
        )
        == 0
    )
    stage2 = root / "stage2"
    assert (
        cli(
            [
                "train",
                "--stage",
                "2",
                "--model",
                str(stage1),
                "--data",
                str(data["train"]),
                "--out",
                str(stage2),
                *argv,
            ]
        )
        == 0
    )
    return {"init": init, "stage1": stage1, "stage2": stage2, "data": data["images"]}


def _projector(checkpoint: Path) -> dict[str, torch.Tensor]:
    weights = load_file(str(checkpoint / "model.safetensors"))
    return {
        k.split("multi_modal_projector.")[1]: v
        for k, v in weights.items()
        if "multi_modal_projector." in k
    }


def test_init_writes_a_linear_projector(trained) -> None:
    config = json.loads((trained["init"] / "config.json").read_text())
    assert config["mm_projector_type"] == "linear"
    assert set(_projector(trained["init"])) == {"linear_1.weight", "linear_1.bias"}


def test_training_keeps_and_trains_the_linear_projector(trained) -> None:
    before, after = _projector(trained["init"]), _projector(trained["stage1"])
    assert set(after) == {"linear_1.weight", "linear_1.bias"}
    assert not torch.equal(before["linear_1.weight"], after["linear_1.weight"])
    config = json.loads((trained["stage2"] / "config.json").read_text())
    assert config["mm_projector_type"] == "linear"


def test_export_verifies_and_the_runtime_answers(trained, tmp_path, capsys) -> None:
    model = tmp_path / "model"
    assert cli(["export", str(trained["stage2"]), str(model)]) == 0
    printed = capsys.readouterr().out
    assert "verify vs transformers (standard form): PASSED" in printed and "FAILED" not in printed
    manifest = json.loads((model / "manifest.json").read_text())
    assert manifest["source"]["projector"] == "linear"
    # The projector graph is the original's nn.Linear on the trained weights.
    weights = _projector(trained["stage2"])
    features = np.random.default_rng(0).normal(size=(1, 4, weights["linear_1.weight"].shape[1]))
    features = features.astype(np.float32)
    session = ort.InferenceSession(
        str(model / "projector.onnx"), providers=["CPUExecutionProvider"]
    )
    (out,) = session.run(None, {"image_features": features})
    expected = features @ weights["linear_1.weight"].numpy().T + weights["linear_1.bias"].numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    image = str(next(trained["data"].glob("*.png")))
    argv = [
        "run",
        str(model),
        "--image",
        image,
        "--prompt",
        "What shape?",
        "--max-new-tokens",
        "4",
        "--json",
    ]
    assert cli(argv) == 0
    answer = json.loads(capsys.readouterr().out)
    assert len(answer["token_ids"]) >= 1


def test_an_unknown_projector_is_refused(tmp_path, capsys) -> None:
    assert cli(["init", str(tmp_path / "x"), "--projector", "mlp2x_relu"]) == 1
    assert "unknown projector type 'mlp2x_relu'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_image_markers_reach_training_and_export(trained, tmp_path, capsys) -> None:
    """A checkpoint with mm_use_im_start_end trains and exports with <im_start><image><im_end>."""
    import shutil

    marked = Path(shutil.copytree(trained["stage1"], tmp_path / "marked"))
    config = json.loads((marked / "config.json").read_text())
    (marked / "config.json").write_text(json.dumps({**config, "mm_use_im_start_end": True}))
    data = trained["data"].parent / "train.json"
    out = tmp_path / "stage2"
    argv = ["train", "--stage", "2", "--model", str(marked), "--data", str(data), "--out", str(out)]
    assert cli([*argv, "--images", str(trained["data"]), *TRAIN]) == 0
    assert "<im_start><image><im_end>" in (out / "chat_template.jinja").read_text()
    assert json.loads((out / "config.json").read_text())["mm_use_im_start_end"] is True
    assert cli(["export", str(out), str(tmp_path / "model")]) == 0
    printed = capsys.readouterr().out
    assert "verify vs transformers (standard form): PASSED" in printed and "FAILED" not in printed
    manifest = json.loads((tmp_path / "model" / "manifest.json").read_text())
    assert manifest["template"]["image"] == "<im_start><image><im_end>\n"
