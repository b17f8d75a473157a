"""pyproject.toml's onnxruntime floor holds: model dirs exported and quantized with the newest
packages answer the same on the oldest onnxruntime the runtime takes, as on a robot whose
onnxruntime (JetPack 6's onnxruntime-gpu) is older than the workstation's. `make setup` puts that
wheel in .venv-floor; the answers run in a subprocess with it first on the path."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import quiet
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FLOOR = ROOT / ".venv-floor"

# Prints the version and, per model dir and graph form, the tokens of an answer about an image
# and of a chat's two turns (the second continues a cache that holds tokens), each load twice:
# the second reads the session cache the first wrote.
ANSWERS = """
import json, sys
import onnxruntime
from llava_edge.runtime import Pipeline

image, *dirs = sys.argv[1:]
out = {"onnxruntime": onnxruntime.__version__}
for model_dir in dirs:
    for form in ("fused", "standard"):
        for load in ("miss", "hit"):
            with Pipeline.load(model_dir, graph_form=form, threads=1) as pipe:
                ids = [pipe.answer(image, "What is it?", max_new_tokens=5).token_ids]
                chat = pipe.chat()
                for question, picture in (("Describe it.", image), ("And then?", None)):
                    turn = chat.stream(question, image=picture, max_new_tokens=4)
                    list(turn)
                    ids.append(turn.answer.token_ids)
                out[f"{model_dir} {form} {load}"] = ids
print(json.dumps(out))
"""


def floor_version() -> str:
    """The runtime's onnxruntime floor, from pyproject.toml's dependencies."""
    text = (ROOT / "pyproject.toml").read_text()
    dependencies = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    return re.search(r'"onnxruntime>=([\d.]+)"', dependencies).group(1)


def answers(python_path: str | None, image: Path, dirs: list[Path], cache: Path) -> dict:
    env = {**os.environ, "LLAVA_EDGE_CACHE": str(cache), "LLAVA_EDGE_SESSION_CACHE": "1"}
    env.pop("PYTHONPATH", None)
    if python_path:
        env["PYTHONPATH"] = python_path
    done = subprocess.run(
        [sys.executable, "-c", ANSWERS, str(image), *map(str, dirs)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


def pictures(folder: Path, count: int) -> Path:
    """`count` noise pictures, 0.png on, in a new `folder`: calibration images for quantize."""
    folder.mkdir()
    for i in range(count):
        pixels = np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return folder


def test_the_floor_onnxruntime_answers_as_the_newest(
    context_model_dir: Path, tmp_path: Path
) -> None:
    """onnxruntime 1.18 and 1.19 continued a chat's cache wrongly on the fused decoder, 1.18
    gave int4 NaN, 1.28 to 1.31 misread the session cache's int4 weights: each would differ."""
    from llava_edge.calib.quantize import quantize_model

    assert (FLOOR / "onnxruntime").is_dir(), f"{FLOOR} has no onnxruntime: run `make setup`"
    images = pictures(tmp_path / "images", 3)
    int4 = tmp_path / "int4"
    quantize_model(context_model_dir, int4, "int4", images=images, samples=3, log=quiet)
    dirs = [context_model_dir, int4]
    newest = answers(None, images / "0.png", dirs, tmp_path / "newest")
    floor = answers(str(FLOOR), images / "0.png", dirs, tmp_path / "floor")
    assert floor.pop("onnxruntime").startswith(floor_version() + "."), "update FLOOR_ONNXRUNTIME"
    newest.pop("onnxruntime")
    assert floor == newest


# Per graph form asked for: the form that ran and an answer's tokens, or the refusal.
FORMS = """
import json, sys
from llava_edge.errors import LlavaEdgeError
from llava_edge.runtime import Pipeline

out = {}
for form in ("auto", "standard", "fused"):
    try:
        with Pipeline.load(sys.argv[1], graph_form=form, threads=1) as pipe:
            answer = pipe.answer(None, "What is it?", max_new_tokens=6, ignore_eos=True)
            out[form] = [pipe.backend.form, answer.token_ids]
    except LlavaEdgeError as e:
        out[form] = str(e)
print(json.dumps(out))
"""


def test_the_floor_runs_the_standard_graphs_of_a_fused_decoder_it_cannot(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A dir quantized with an int8 KV cache, whose fused decoder needs onnxruntime 1.28: on the
    floor the default form answers with its standard graphs, as the newest does with them, and
    says so on stderr once; the fused form asked for is refused in one line."""
    from llava_edge.calib.quantize import quantize_model

    images = pictures(tmp_path / "images", 2)
    model = tmp_path / "int8_cache"
    quantize_model(
        tiny_model_dir, model, "int4", images=images, samples=2, kv_cache="int8", log=quiet
    )
    runs = {}
    for name, python_path in (("newest", None), ("floor", str(FLOOR))):
        env = {**os.environ, "LLAVA_EDGE_SESSION_CACHE": "0"}
        env.pop("PYTHONPATH", None)
        env.update({"PYTHONPATH": python_path} if python_path else {})
        runs[name] = subprocess.run(
            [sys.executable, "-c", FORMS, str(model)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert runs[name].returncode == 0, runs[name].stderr[-2000:]
    newest, floor = (json.loads(runs[n].stdout.splitlines()[-1]) for n in ("newest", "floor"))
    assert newest["auto"][0] == newest["fused"][0] == "fused"
    assert floor["auto"] == floor["standard"] == newest["standard"]
    assert floor["auto"][0] == "standard"
    assert "needs onnxruntime 1.28 or later, not 1.20" in floor["fused"]
    (said,) = runs["floor"].stderr.strip().splitlines()
    assert said.startswith("llava-edge runs this model dir's standard graphs, not its fused ones")
    assert not runs["newest"].stderr.strip()
