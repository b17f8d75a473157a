"""The `init`, `export` and `run` commands as a user meets them: bad input gets one line on stderr,
a non-zero exit, no traceback and nothing written; `run --json` reports the ids transformers
would use and produce."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from llava_edge.cli import main

CLI = str(Path(sys.executable).parent / "llava-edge")


def _tree(root: Path) -> dict[str, int]:
    """Every path under `root` with its size (dirs 0): what 'nothing written' compares."""
    return {
        str(p.relative_to(root)): (p.stat().st_size if p.is_file() else 0)
        for p in sorted(root.rglob("*"))
    }


def _one_error_line(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"llava-edge {command}: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def plain_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face checkpoint that is not LLaVA: a tiny LlamaForCausalLM."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    out = tmp_path_factory.mktemp("llama") / "llama"
    LlamaForCausalLM(config).save_pretrained(out)
    return out


# ---- export: bad input --------------------------------------------------------------------------


def _export_cases(tmp: Path, checkpoint: Path, plain_llama: Path) -> dict:
    """name -> (checkpoint arg, output arg, extra args, text the error must hold)."""
    (tmp / "a_file").write_text("not a dir\n")
    (tmp / "full").mkdir()
    (tmp / "full" / "keep.txt").write_text("precious\n")
    (tmp / "empty_dir").mkdir()
    (tmp / "model_dir").mkdir()  # what export writes, given where its checkpoint belongs
    (tmp / "model_dir" / "manifest.json").write_text("{}\n")
    (tmp / "sub").mkdir()
    truncated = tmp / "truncated"
    shutil.copytree(checkpoint, truncated)
    with open(truncated / "model.safetensors", "r+b") as weights:
        weights.truncate(5000)
    no_eos = tmp / "no_eos"  # no EOS anywhere: no answer could end
    shutil.copytree(checkpoint, no_eos)
    (no_eos / "generation_config.json").unlink(missing_ok=True)
    _edit_json(no_eos / "config.json", lambda c: c["text_config"].update(eos_token_id=None))
    _edit_json(no_eos / "tokenizer_config.json", lambda c: c.update(eos_token=None))
    # a tokenizer saved from training with add_eos_token: it ends every text, a prompt too
    eos_appended = tmp / "eos_appended"
    shutil.copytree(checkpoint, eos_appended)
    _edit_json(eos_appended / "tokenizer_config.json", lambda c: c.update(add_eos_token=True))
    _edit_json(
        eos_appended / "tokenizer.json",
        lambda t: t.update(
            post_processor={
                "type": "TemplateProcessing",
                "single": [
                    {"SpecialToken": {"id": "<s>", "type_id": 0}},
                    {"Sequence": {"id": "A", "type_id": 0}},
                    {"SpecialToken": {"id": "</s>", "type_id": 0}},
                ],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
                "special_tokens": {
                    token: {"id": token, "ids": [i], "tokens": [token]}
                    for i, token in ((1, "<s>"), (2, "</s>"))
                },
            }
        ),
    )
    image_token = tmp / "image_token"  # the image token spelled '<img>'
    shutil.copytree(checkpoint, image_token)
    (image_token / "llava_edge.json").unlink(missing_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json"):
        path = image_token / name
        if path.exists():
            path.write_text(path.read_text().replace("<image>", "<img>"))
    no_patch = tmp / "no_patch"  # an older llava-hf processor_config.json
    shutil.copytree(checkpoint, no_patch)
    _edit_json(no_patch / "processor_config.json", lambda c: c.pop("patch_size"))
    # an older llava-hf upload: the image processor's preprocessor_config.json alone
    no_processor_config = tmp / "no_processor_config"
    shutil.copytree(checkpoint, no_processor_config)
    settings = json.loads((no_processor_config / "processor_config.json").read_text())
    (no_processor_config / "processor_config.json").unlink()
    image_processor = settings.get("image_processor", settings)
    (no_processor_config / "preprocessor_config.json").write_text(json.dumps(image_processor))
    quantized = tmp / "quantized"  # as a hub's 4-bit upload: needs bitsandbytes, then no graph
    shutil.copytree(checkpoint, quantized)
    bnb = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    _edit_json(quantized / "config.json", lambda c: c.update(quantization_config=bnb))
    no_tokenizer = tmp / "no_tokenizer"  # saved with the model's save_pretrained alone
    shutil.copytree(checkpoint, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    no_processor = tmp / "no_processor"  # the tokenizer saved, not the processor
    shutil.copytree(checkpoint, no_processor)
    (no_processor / "processor_config.json").unlink()
    out = str(tmp / "out")
    return {
        "missing-checkpoint": (str(tmp / "nope" / "checkpoint"), out, [], "does not exist"),
        # "sub/missing" has the shape of a hub id, but sub/ is a local dir: a mistyped path.
        "missing-relative-checkpoint": ("sub/missing", out, [], "does not exist"),
        "checkpoint-is-a-file": (str(tmp / "a_file"), out, [], "is a file"),
        "no-config": (str(tmp / "empty_dir"), out, [], "no config.json"),
        "a-model-dir": (
            str(tmp / "model_dir"),
            out,
            [],
            "is a model dir `llava-edge export` wrote",
        ),
        "not-llava": (str(plain_llama), out, [], "'llama' checkpoint, not LLaVA"),
        "output-under-a-file": (
            str(checkpoint),
            str(tmp / "a_file" / "model"),
            [],
            "is a file, not a directory",
        ),
        "output-is-a-file": (str(checkpoint), str(tmp / "a_file"), [], "is not a directory"),
        "output-not-empty": (str(checkpoint), str(tmp / "full"), [], "pass --force"),
        "bad-max-context": (str(checkpoint), out, ["--max-context", "100000"], "--max-context"),
        "max-context-below-one-image": (
            str(checkpoint),
            out,
            ["--max-context", "5"],
            "tokens of question and answer",
        ),
        "no-eos": (str(no_eos), out, [], "no end-of-sequence token"),
        "eos-appended": (str(eos_appended), out, [], "ends every text it encodes with '</s>'"),
        "image-token-spelled-otherwise": (str(image_token), out, [], "image token is '<img>'"),
        "bad-opset": (str(checkpoint), out, ["--opset", "30"], "--opset"),
        # the decoder needs opset 10 (dynamic Slice), quantize's per-channel Q/DQ 13
        "opset-below-quantize": (str(checkpoint), out, ["--opset", "9"], "outside 13-20"),
        "truncated-weights": (str(truncated), out, [], "truncated or corrupt"),
        "processor-without-patch-size": (str(no_patch), out, [], 'add "patch_size": '),
        "no-processor-config": (
            str(no_processor_config),
            out,
            [],
            "to processor_config.json (a new file where there is none)",
        ),
        "quantized-weights": (str(quantized), out, [], "holds bitsandbytes weights"),
        "no-tokenizer": (str(no_tokenizer), out, [], "has no tokenizer (tokenizer.json,"),
        "no-processor": (
            str(no_processor),
            out,
            [],
            "has no image processor (processor_config.json or preprocessor_config.json)",
        ),
    }


CASES = [
    "missing-checkpoint",
    "missing-relative-checkpoint",
    "checkpoint-is-a-file",
    "no-config",
    "a-model-dir",
    "not-llava",
    "output-under-a-file",
    "output-is-a-file",
    "output-not-empty",
    "bad-max-context",
    "max-context-below-one-image",
    "no-eos",
    "eos-appended",
    "image-token-spelled-otherwise",
    "bad-opset",
    "opset-below-quantize",
    "truncated-weights",
    "processor-without-patch-size",
    "no-processor-config",
    "quantized-weights",
    "no-tokenizer",
    "no-processor",
]


@pytest.mark.parametrize("case", CASES)
def test_export_bad_input(
    case: str,
    tiny_checkpoint: Path,
    plain_llama: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture,
) -> None:
    monkeypatch.chdir(tmp_path)
    checkpoint, out, extra, message = _export_cases(tmp_path, tiny_checkpoint, plain_llama)[case]
    before = _tree(tmp_path)
    code = main(["export", checkpoint, out, *extra])
    captured = capfd.readouterr()
    assert code == 1
    assert message in _one_error_line(captured.err, "export")
    assert _tree(tmp_path) == before


def test_export_not_a_llava_checkpoint_through_the_installed_command(
    plain_llama: Path, tmp_path: Path
) -> None:
    """The real entry point: exit status 1, one line, no traceback, no output dir."""
    result = subprocess.run(
        [CLI, "export", str(plain_llama), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert "not LLaVA" in _one_error_line(result.stderr, "export")
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []


# Run as root, the command first drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from its bounding
# set (prctl PR_CAPBSET_DROP = 24) and then execs: the new program keeps neither, so even root
# obeys file permissions. A separate shim rather than preexec_fn, which is unsafe in a process
# that has threads (onnxruntime's).
DROP_DAC_THEN_EXEC = (
    "import ctypes, os, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "for cap in (1, 2):\n"
    "    if libc.prctl(24, cap, 0, 0, 0):\n"
    "        raise OSError(ctypes.get_errno(), 'prctl(PR_CAPBSET_DROP)')\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)


def _unprivileged(argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return argv
    return [sys.executable, "-c", DROP_DAC_THEN_EXEC, *argv]


def test_export_output_dir_not_writable(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A read-only parent dir. Tests may run as root, whom permissions do not stop, so the
    command runs without root's permission override (see DROP_DAC_THEN_EXEC)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        probe = subprocess.run(
            _unprivileged([sys.executable, "-c", f"open({str(locked / 'probe')!r}, 'w')"]),
            capture_output=True,
            text=True,
        )
        assert "PermissionError" in probe.stderr, "the locked dir is writable: nothing to test"
        result = subprocess.run(
            _unprivileged([CLI, "export", str(tiny_checkpoint), str(locked / "model")]),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 1
        line = _one_error_line(result.stderr, "export")
        assert f"{locked} is not writable" in line
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


# ---- init and run: bad input --------------------------------------------------------------------


def test_init_bad_input(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("precious\n")
    before = _tree(tmp_path)
    cases = [
        ([str(tmp_path / "full")], "pass --force"),
        ([str(tmp_path / "a_file" / "ckpt")], "is a file, not a directory"),
        ([str(tmp_path / "a_file")], "is not a directory"),
        ([str(tmp_path / "new"), "--layers", "0"], "--layers"),
    ]
    for args, message in cases:
        assert main(["init", *args]) == 1
        assert message in _one_error_line(capfd.readouterr().err, "init")
    assert _tree(tmp_path) == before


def test_init_force_replaces_a_checkpoint_whole(tmp_path: Path, capfd) -> None:
    out = tmp_path / "checkpoint"
    out.mkdir()
    (out / "stale.safetensors").write_text("left from an older checkpoint")
    assert main(["init", str(out), "--force"]) == 0
    assert not (out / "stale.safetensors").exists()
    assert (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]  # no temp dir left


def test_run_bad_model_dir(tmp_path: Path, tiny_checkpoint: Path, capfd) -> None:
    for model_dir, message in (
        (tmp_path / "missing", "does not exist"),
        (tiny_checkpoint, "not a llava-edge model dir"),
    ):
        assert main(["run", str(model_dir), "--prompt", "hi"]) == 1
        assert message in _one_error_line(capfd.readouterr().err, "run")


# ---- run --json -----------------------------------------------------------------------------------


def test_run_json_equals_transformers(
    tiny_checkpoint: Path, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llava_edge.export.verify import sample_image

    image_path = tmp_path / "picture.png"
    sample_image(180).save(image_path)
    question = "Which shapes are there?"
    new_tokens = 24
    code = main(
        [
            "run",
            str(tiny_model_dir),
            "--image",
            str(image_path),
            "--prompt",
            question,
            "--max-new-tokens",
            str(new_tokens),
            "--json",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1
    result = json.loads(out)

    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=Image.open(image_path), text=prompt, return_tensors="pt")
    with torch.no_grad():
        generated = model.eval().generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    expected_ids = generated[0, inputs["input_ids"].shape[1] :].tolist()

    prompt_ids = inputs["input_ids"][0].tolist()
    assert result["prompt_token_ids"] == prompt_ids
    image_id = model.config.image_token_id
    assert prompt_ids.count(image_id) == model.config.image_seq_length  # image tokens included
    assert result["token_ids"] == expected_ids
    assert result["text"] == processor.decode(expected_ids, skip_special_tokens=True)


@pytest.mark.parametrize("command", ["export", "train"])
def test_pickled_weights_are_refused(
    command: str, tiny_checkpoint: Path, tmp_path: Path, capsys
) -> None:
    """Weights load from safetensors only: a pickle (pytorch_model.bin) could run code. The
    refusal says so and how to get safetensors, where transformers' named only the
    model.safetensors it did not find."""
    checkpoint = pickled_checkpoint(tiny_checkpoint, tmp_path / "pickled")
    out = tmp_path / "out"
    if command == "export":
        assert main(["export", str(checkpoint), str(out), "--no-verify"]) == 1
    else:
        data = tmp_path / "data.json"  # a text-only sample: no images to make
        talk = [{"from": "human", "value": "Hello?"}, {"from": "gpt", "value": "Hello."}]
        data.write_text(json.dumps([{"id": "0", "conversations": talk}]))
        argv = ["train", "--stage", "2", "--model", str(checkpoint), "--data", str(data)]
        assert main([*argv, "--out", str(out)]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "pickled PyTorch files (pytorch_model*.bin)" in line
    assert "use_safetensors=False, save_pretrained" in line
    assert not out.exists()


def pickled_checkpoint(tiny_checkpoint: Path, out: Path) -> Path:
    """The tiny checkpoint with its weights in pytorch_model.bin, not model.safetensors."""
    import torch
    from safetensors.torch import load_file

    shutil.copytree(tiny_checkpoint, out)
    torch.save(load_file(out / "model.safetensors"), out / "pytorch_model.bin")
    (out / "model.safetensors").unlink()
    return out


def test_pickled_weights_are_refused_before_the_data_or_the_adapters_are_judged(
    tiny_checkpoint: Path, tmp_path: Path, capsys
) -> None:
    """The refusal comes first: train's, before its data is read (a sample whose picture is
    missing, which took minutes at LLaVA-665k's size); merge-lora's, before the base is compared
    with the one the adapters were trained from, which read no weights in it and called it
    another model."""
    import torch

    from llava_edge.modeling import load_model
    from llava_edge.training.checkpoint import base_fingerprint
    from llava_edge.training.lora import add_lora
    from llava_edge.training.train import RUN_FILE

    checkpoint = pickled_checkpoint(tiny_checkpoint, tmp_path / "pickled")
    data = tmp_path / "data.json"
    talk = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]
    data.write_text(json.dumps([{"id": "0", "image": "gone.png", "conversations": talk}]))
    adapters = tmp_path / "adapters"
    add_lora(load_model(tiny_checkpoint, dtype=torch.float32), 2, 4, 0.0).save_pretrained(adapters)
    (adapters / RUN_FILE).write_text(json.dumps({"base_sha256": base_fingerprint(tiny_checkpoint)}))
    out = tmp_path / "out"
    train = ["train", "--stage", "2", "--model", str(checkpoint), "--data", str(data)]
    for argv in (
        [*train, "--images", str(tmp_path), "--out", str(out)],
        ["merge-lora", str(adapters), str(out), "--base", str(checkpoint)],
    ):
        assert main(argv) == 1
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert "pickled PyTorch files (pytorch_model*.bin)" in line, line
        assert not out.exists()


def partial_checkpoint(tiny_checkpoint: Path, out: Path) -> Path:
    """The tiny checkpoint with one tensor of its language model missing from its weights."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_checkpoint, out)
    weights = load_file(out / "model.safetensors")
    (dropped,) = [name for name in weights if name.endswith("layers.1.mlp.down_proj.weight")]
    del weights[dropped]
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_weights_missing_a_tensor_are_refused(
    tiny_checkpoint: Path, tmp_path: Path, capsys
) -> None:
    """A tensor the model needs that the weights lack would be filled with random numbers by
    transformers, and verification (against that same loaded model) could not tell."""
    checkpoint = partial_checkpoint(tiny_checkpoint, tmp_path / "partial")
    assert main(["export", str(checkpoint), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err  # after the loader's progress bar
    line = err.strip().splitlines()[-1]
    assert "Traceback" not in err and line.startswith("llava-edge export: error: ")
    assert "lack 1 tensor" in line and "layers.1.mlp.down_proj.weight" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["train", "bench"])
def test_every_loader_refuses_weights_missing_a_tensor(
    command: str, tiny_checkpoint: Path, tiny_model_dir: Path, tmp_path: Path, capsys
) -> None:
    """Training and bench's transformers baseline load through the same loader as export:
    neither runs on the random numbers transformers fills a missing tensor with."""
    from llava_edge.training.synth import synthesize

    checkpoint = str(partial_checkpoint(tiny_checkpoint, tmp_path / "partial"))
    out = str(tmp_path / "out")
    if command == "train":
        data = synthesize(tmp_path / "data", train=2, test=0)
        argv = ["train", "--stage", "2", "--model", checkpoint, "--data", str(data["train"]),
                "--images", str(data["images"]), "--out", out, "--max-steps", "1"]  # fmt: skip
    else:
        argv = ["bench", str(tiny_model_dir), "--baseline", checkpoint, "--runs", "1"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert "Traceback" not in err and line.startswith(f"llava-edge {command}: error: ")
    assert "lack 1 tensor" in line and "layers.1.mlp.down_proj.weight" in line
    assert not Path(out).exists()


def test_bench_baseline_decodes_greedy_whatever_generation_config_says(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """bench --baseline times generate()'s greedy decoding, as the runtime's, not the beam
    search or penalties a checkpoint's generation_config.json asks for (with beams, generate()
    refused the timing streamer)."""
    from llava_edge.export.baseline import TransformersRunner
    from llava_edge.runtime.bench import Workload

    checkpoint = tmp_path / "beams"
    shutil.copytree(tiny_checkpoint, checkpoint)
    _edit_json(
        checkpoint / "generation_config.json",
        lambda config: config.update(num_beams=2, no_repeat_ngram_size=2),
    )
    workload = Workload(question_tokens=2, new_tokens=3, runs=1, threads=1)
    runner = TransformersRunner(checkpoint, workload, "USER: <image>\nHi ASSISTANT:")
    timings = runner.run_once()
    runner.close()
    assert timings["decode_tokens_per_s"] > 0 and timings["prompt_tokens"] > 3


def test_bench_baseline_prints_no_warning_of_its_own_settings(tiny_checkpoint: Path) -> None:
    """bench --baseline prints its table: generate() is given no pair of settings transformers
    warns of (min_length beside min_new_tokens printed a warning on every run)."""
    import logging

    from llava_edge.export.baseline import TransformersRunner
    from llava_edge.runtime.bench import Workload

    class Lines(logging.Handler):  # transformers' own handler keeps the session's stderr
        def __init__(self) -> None:
            super().__init__(logging.WARNING)
            self.lines: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.lines.append(record.getMessage())

    lines = Lines()
    library = logging.getLogger("transformers")
    library.addHandler(lines)
    try:
        workload = Workload(question_tokens=2, new_tokens=3, runs=1, threads=1)
        runner = TransformersRunner(tiny_checkpoint, workload, "USER: <image>\nHi ASSISTANT:")
        runner.run_once()
        runner.close()
    finally:
        library.removeHandler(lines)
    assert not [line for line in lines.lines if "seem to have been set" in line]


def _edit_json(path: Path, edit: Callable[[dict], object]) -> None:
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def test_a_hub_id_the_hub_cannot_be_reached_for_is_one_line_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    """No network, and the checkpoint not in the hub's local cache: the hub client retries each
    file for about half a minute before transformers says it "couldn't connect"; export says in
    one line, at once, that the hub is out of reach and how to export without it."""
    import time

    import huggingface_hub.constants

    monkeypatch.chdir(tmp_path)
    # a port nothing listens on: the connection is refused, as with no network
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    start = time.perf_counter()
    code = main(["export", "nobody-here/no-such-llava", str(tmp_path / "out")])
    elapsed = time.perf_counter() - start
    assert code == 1
    line = _one_error_line(capfd.readouterr().err, "export")
    assert "cannot reach the Hugging Face hub" in line and "nobody-here/no-such-llava" in line
    assert "--local-dir" in line  # what to do: download it where there is a network
    assert elapsed < 5
    assert list(tmp_path.iterdir()) == []


def test_a_processor_of_the_checkpoints_own_code_takes_trust_remote_code(
    tiny_checkpoint: Path, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    """A processor the checkpoint's own Python code defines (processor_config.json's auto_map)
    is refused in one line that names the option which allows it, and loads with it."""
    checkpoint = tmp_path / "own_code"
    shutil.copytree(tiny_checkpoint, checkpoint)
    (checkpoint / "processing_own.py").write_text(
        "from transformers import LlavaProcessor\n\n\nclass OwnProcessor(LlavaProcessor):\n"
        "    pass\n"
    )
    _edit_json(
        checkpoint / "processor_config.json",
        lambda c: c.update(
            processor_class="OwnProcessor",
            auto_map={"AutoProcessor": "processing_own.OwnProcessor"},
        ),
    )
    out = tmp_path / "model"
    assert main(["export", str(checkpoint), str(out), "--no-verify", "--no-fused"]) == 1
    line = _one_error_line(capfd.readouterr().err, "export")
    assert "its own Python code" in line and "pass --trust-remote-code" in line
    assert not out.exists()
    argv = ["export", str(checkpoint), str(out), "--no-verify", "--no-fused", "--trust-remote-code"]
    assert main(argv) == 0
    assert (out / "manifest.json").is_file()


@pytest.fixture(scope="module")
def sharded_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint saved in five weight shards with their index."""
    from transformers import LlavaForConditionalGeneration

    out = tmp_path_factory.mktemp("sharded") / "checkpoint"
    shutil.copytree(tiny_checkpoint, out)
    (out / "model.safetensors").unlink()
    model = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint)
    model.save_pretrained(out, max_shard_size="200KB")
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 2
    return out


@pytest.mark.parametrize("damage", ["missing-shard", "truncated-shard", "broken-index"])
def test_a_sharded_checkpoint_missing_a_part_names_the_file(
    sharded_checkpoint: Path, tmp_path: Path, damage: str, capfd: pytest.CaptureFixture
) -> None:
    """A shard lost or cut short in a copy, or an index that is no JSON: the line names the
    file, so that one file is copied again rather than every shard of a 7B checkpoint."""
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(sharded_checkpoint, checkpoint)
    shard = sorted(checkpoint.glob("model-*-of-*.safetensors"))[1]
    index = checkpoint / "model.safetensors.index.json"
    if damage == "missing-shard":
        shard.unlink()
        named, said = shard.name, "is missing"
    elif damage == "truncated-shard":
        with open(shard, "r+b") as weights:
            weights.truncate(3000)
        named, said = shard.name, "truncated or corrupt"
    else:
        index.write_text('{"weight_map": ')
        named, said = index.name, "is not valid JSON"
    out = tmp_path / "model"
    assert main(["export", str(checkpoint), str(out), "--no-verify"]) == 1
    line = _one_error_line(capfd.readouterr().err, "export")
    assert named in line and said in line and "copy" in line
    assert not out.exists()
