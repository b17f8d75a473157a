"""What export writes to disk: ONNX external data for big graphs, and nothing that looks valid
when an export fails (a previous good model dir survives a failed `--force`)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from llava_edge import files
from llava_edge.cli import main
from llava_edge.export import exporter
from llava_edge.manifest import MANIFEST_NAME, Manifest
from llava_edge.runtime import Pipeline
from llava_edge.runtime.image import preprocess


def quiet(*_args, **_kwargs) -> None:
    """A `log` for export calls whose report these tests don't read."""


QUESTION = "What is in the picture?"


def _picture():
    from llava_edge.export.verify import sample_image

    return sample_image(200)


# ---- external data ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def external_model_dir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model exported as if every graph were over 2 GB (verification on)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(files, "MAX_PROTOBUF", 0)
        out = tmp_path_factory.mktemp("external") / "model"
        report = exporter.export_checkpoint(tiny_checkpoint, out, log=quiet)
    assert report["passed"]
    return out


def test_external_data_is_one_data_file_per_graph(external_model_dir: Path) -> None:
    manifest = Manifest.load(external_model_dir)
    for spec in manifest.graphs.values():
        data = spec.file + ".data"
        graph = onnx.load(str(external_model_dir / spec.file), load_external_data=False)
        external = [
            t for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
        ]
        assert external, f"{spec.file} keeps all its weights inline"
        locations = {e.value for t in external for e in t.external_data if e.key == "location"}
        assert locations == {data}
        assert (external_model_dir / data).stat().st_size > (
            external_model_dir / spec.file
        ).stat().st_size
    # Nothing but what the manifest lists (one .data per graph, no file per tensor).
    assert sorted(p.name for p in external_model_dir.iterdir()) == sorted(
        [*manifest.files, MANIFEST_NAME]
    )
    assert {f"{g.file}.data" for g in manifest.graphs.values()} <= set(manifest.files)
    manifest.check_files(external_model_dir, hashes=True)


def test_external_data_outputs_equal_inline_export(
    external_model_dir: Path, tiny_model_dir: Path
) -> None:
    """Same weights, same graphs: loaded from .data files they give the same numbers."""
    assert not list(tiny_model_dir.glob("*.data"))  # the reference keeps weights inline
    image = _picture()
    results = []
    for model_dir in (external_model_dir, tiny_model_dir):
        with Pipeline.load(model_dir) as pipe:
            features = pipe.backend.encode_image(preprocess(image, pipe.manifest.image)[None])
            ids = np.asarray([pipe.codec.encode("USER: hello there ASSISTANT:")])
            cache = pipe.backend.new_cache(1)
            logits = pipe.backend.decode(
                pipe.table[ids], np.ones_like(ids), np.arange(ids.shape[1])[None], cache
            )
            answer = pipe.answer(image, QUESTION, max_new_tokens=16, ignore_eos=True)
        results.append((features, logits, answer.token_ids))
    (f1, l1, t1), (f2, l2, t2) = results
    np.testing.assert_allclose(f1, f2, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(l1, l2, rtol=1e-6, atol=1e-6)
    assert t1 == t2


# ---- failed exports -----------------------------------------------------------------------------


@pytest.fixture
def good_model_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A previous good export the next (failing) one tries to replace with --force."""
    out = tmp_path / "model"
    shutil.copytree(tiny_model_dir, out)
    return out


def _snapshot(model_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(model_dir.iterdir())}


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def _last_error_line(err: str) -> str:
    """Progress bars (carriage returns) come first; the error is the last line, no traceback."""
    assert "Traceback" not in err
    return err.strip().splitlines()[-1].split("\r")[-1]


def _corrupt_embeddings(monkeypatch: pytest.MonkeyPatch) -> None:
    """A real export fault: the embedding table written one row off."""
    write = exporter._write_text_files

    def faulty(loaded, manifest, out):
        write(loaded, manifest, out)
        table = np.load(out / manifest.embeddings)
        np.save(out / manifest.embeddings, np.roll(table, 1, axis=0))

    monkeypatch.setattr(exporter, "_write_text_files", faulty)


@pytest.fixture(scope="module")
def loaded_tiny(tiny_checkpoint: Path) -> exporter.LoadedCheckpoint:
    return exporter.load_checkpoint(tiny_checkpoint)


@pytest.mark.parametrize(
    "tamper, message",
    [
        ("pixels", "pixel values differ by"),
        ("prompt", "prompt token ids differ from the checkpoint's chat template"),
        ("chat", "a three-turn chat's token ids differ from the checkpoint's chat template"),
        ("features", "image features differ by"),
    ],
)
def test_verification_holds_each_thing_it_compares(
    loaded_tiny: exporter.LoadedCheckpoint,
    tiny_model_dir: Path,
    tmp_path: Path,
    tamper: str,
    message: str,
) -> None:
    """README: export compares prompt ids of a question and of a three-turn chat, pixel values,
    image features, prefill logits and greedy tokens with transformers; each one wrong alone
    fails it (the logits and tokens: test_failed_verification_keeps_previous_model_dir)."""
    from llava_edge.export.verify import VerificationError, verify_model_dir

    out = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    manifest = Manifest.load(out)
    for graph in manifest.graphs.values():  # the standard form alone: half the time
        graph.fused = None
    if tamper == "pixels":
        manifest.image.mean = [m + 0.05 for m in manifest.image.mean]
    elif tamper == "prompt":  # the question's prompt only: a chat's later turns keep theirs
        manifest.template.first_user = manifest.template.user + "Q: "
    elif tamper == "chat":  # a later turn's prompt only
        template = manifest.template
        template.first_user = template.user if template.first_user is None else template.first_user
        template.user = "Q: " + template.user
    elif tamper == "features":  # the projector's output scaled: a graph off by 1e-3
        graph = onnx.load(str(out / manifest.graphs["projector"].file))
        weights = next(w for w in graph.graph.initializer if len(w.dims) == 2)
        array = onnx.numpy_helper.to_array(weights) * 1.001
        weights.CopyFrom(onnx.numpy_helper.from_array(array, weights.name))
        onnx.save(graph, str(out / manifest.graphs["projector"].file))
        manifest.record_files(out)
    manifest.save(out)
    with pytest.raises(VerificationError, match=re.escape(message)):
        verify_model_dir(loaded_tiny, out, log=quiet)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_failed_verification_keeps_previous_model_dir(
    tiny_checkpoint: Path,
    good_model_dir: Path,
    dtype: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    _corrupt_embeddings(monkeypatch)
    before = _snapshot(good_model_dir)
    code = main(["export", str(tiny_checkpoint), str(good_model_dir), "--dtype", dtype, "--force"])
    captured = capsys.readouterr()
    assert code == 1
    assert "verify vs transformers (standard form): FAILED" in captured.out
    assert "verify vs transformers (fused form): FAILED" in captured.out
    line = _last_error_line(captured.err)
    assert line.startswith("llava-edge export: error: verification failed")
    assert ("greedy tokens diverge" if dtype == "fp32" else "cosine") in line
    assert _snapshot(good_model_dir) == before
    assert _leftovers(good_model_dir.parent, good_model_dir.name) == []
    Manifest.load(good_model_dir).check_files(good_model_dir, hashes=True)


def test_failed_verification_writes_no_model_dir(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    _corrupt_embeddings(monkeypatch)
    out = tmp_path / "new"
    assert main(["export", str(tiny_checkpoint), str(out)]) == 1
    assert "verification failed" in capsys.readouterr().err
    assert not out.exists()
    assert _leftovers(tmp_path, "new") == []


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_interrupted_export_keeps_previous_model_dir(
    tiny_checkpoint: Path,
    good_model_dir: Path,
    error: type[BaseException],
    monkeypatch: pytest.MonkeyPatch,
    capsys,
) -> None:
    """Ctrl-C (or a crash) while the decoder is being traced, after two graphs were written."""
    trace = exporter._torch_export

    def stop_at_decoder(module, args, path, graph, opset):
        if graph.file == "decoder.onnx":
            raise error("stopped mid-export")
        trace(module, args, path, graph, opset)

    monkeypatch.setattr(exporter, "_torch_export", stop_at_decoder)
    before = _snapshot(good_model_dir)
    argv = ["export", str(tiny_checkpoint), str(good_model_dir), "--force"]
    if error is KeyboardInterrupt:
        assert main(argv) == 130
        assert _last_error_line(capsys.readouterr().err) == "llava-edge export: interrupted"
    else:
        with pytest.raises(RuntimeError):
            main(argv)
    assert _snapshot(good_model_dir) == before
    assert _leftovers(good_model_dir.parent, good_model_dir.name) == []


def test_force_never_deletes_the_checkpoint(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    """--force replaces the output dir: refused when that dir is or holds the checkpoint."""
    checkpoint = tmp_path / "work" / "checkpoint"
    shutil.copytree(tiny_checkpoint, checkpoint)
    before = _snapshot(checkpoint)
    for out in (checkpoint, checkpoint.parent):
        assert main(["export", str(checkpoint), str(out), "--force"]) == 1
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert "holds the checkpoint" in line
    assert _snapshot(checkpoint) == before


def test_a_disk_full_under_numpys_writer_is_one_line_and_keeps_the_old_dir(
    tiny_checkpoint: Path, good_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """numpy reports a full disk as a short write, an OSError with no errno ("36864 requested
    and 28640 written"), as it did writing embed_tokens.npy on a full tmpfs: one line naming
    the full disk, no traceback, the previous model dir untouched."""
    save = np.save

    def short_write(path, array, *args, **kwargs):
        if str(path).endswith(".npy"):
            raise OSError("36864 requested and 28640 written")
        save(path, array, *args, **kwargs)

    monkeypatch.setattr(np, "save", short_write)
    before = _snapshot(good_model_dir)
    argv = ["export", str(tiny_checkpoint), str(good_model_dir), "--force", "--no-verify"]
    assert main(argv) == 1
    line = _last_error_line(capsys.readouterr().err)
    assert line.startswith("llava-edge export: error: no space left on the device writing ")
    assert _snapshot(good_model_dir) == before
    assert _leftovers(good_model_dir.parent, good_model_dir.name) == []


def test_failed_verification_names_the_first_token_that_differs(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where greedy tokens diverge, the error names the step and both tokens (id and text), as
    the printed report shows them: what to look at first when a graph is wrong."""
    import re

    from llava_edge.export.verify import VerificationError

    _corrupt_embeddings(monkeypatch)
    printed: list[str] = []
    with pytest.raises(VerificationError) as failure:
        exporter.export_checkpoint(
            tiny_checkpoint, tmp_path / "model", fused=False, log=printed.append
        )
    message = str(failure.value)
    found = re.search(
        r"greedy tokens diverge after (\d+) of 32 \(token (\d+): ours (\d+) ", message
    )
    assert found, message
    matched, step, ours = (int(g) for g in found.groups())
    assert step == matched + 1
    assert f"{matched}/32 identical" in "\n".join(printed)
    theirs = re.search(r", transformers (\d+) ", message)
    assert theirs and int(theirs.group(1)) != ours
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("fused", [True, False])
def test_the_log_shows_each_long_step_and_says_which_forms_were_written(
    tiny_checkpoint: Path, tmp_path: Path, fused: bool, capsys: pytest.CaptureFixture
) -> None:
    """Writing the fused forms and verifying each form take minutes on a 7B model: each shows a
    progress bar; the last line says which graph forms the dir holds (and why no fused ones)."""
    argv = ["export", str(tiny_checkpoint), str(tmp_path / "model")]
    assert main(argv if fused else [*argv, "--no-fused"]) == 0
    captured = capsys.readouterr()
    bars = captured.err.replace("\r", "\n")
    assert ("export fused forms" in bars) == fused
    assert "verify standard form" in bars
    assert ("verify fused form" in bars) == fused
    last = captured.out.strip().splitlines()[-1]
    if fused:
        assert "standard graphs and fused vision_encoder and decoder forms" in last
    else:
        assert "standard graphs only (--no-fused)" in last


def test_an_fp16_export_lets_its_fp16_weights_go_before_the_fp32_reference_loads(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fp16 verification compares against the checkpoint in fp32, loaded again; the fp16 model
    is written by then, and held on, a 7B export would need both in memory (40 GB, not 27)."""
    import weakref

    load = exporter.load_checkpoint
    models: list[weakref.ref] = []
    alive_at_reload: list[bool] = []

    def tracked(*args, **kwargs):
        if models:
            alive_at_reload.append(models[0]() is not None)
        loaded = load(*args, **kwargs)
        models.append(weakref.ref(loaded.model))
        return loaded

    monkeypatch.setattr(exporter, "load_checkpoint", tracked)
    report = exporter.export_checkpoint(
        tiny_checkpoint, tmp_path / "model", dtype="fp16", fused=False, log=quiet
    )
    assert report["passed"]
    assert alive_at_reload == [False]


def test_a_checkpoint_without_tokenizer_config_keeps_the_bos_its_tokenizer_writes(
    tiny_checkpoint: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Without tokenizer_config.json no token is named BOS, yet tokenizer.json's post-processor
    still writes one before every prompt, as transformers' processor encodes them: the runtime
    must too (export's check compares the two, and refused the export)."""
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, checkpoint)
    (checkpoint / "tokenizer_config.json").unlink()
    report = exporter.export_checkpoint(checkpoint, tmp_path / "model", log=lambda *a: None)
    assert report["passed"] and report["prompt_ids_equal"]
    tokens = Manifest.load(tmp_path / "model").tokens
    assert (
        tokens.add_bos and tokens.bos_token_id == Manifest.load(tiny_model_dir).tokens.bos_token_id
    )


def test_every_graph_is_written_at_the_opset_asked_for(
    tiny_checkpoint: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """`export --opset` reaches the fused forms too (the fused decoder, built node by node, was
    written at 17 whatever was asked), and the manifest records each graph's real opset; the
    fused decoder answers as it does at the default opset."""
    out = tmp_path / "opset13"
    assert main(["export", str(tiny_checkpoint), str(out), "--opset", "13", "--no-verify"]) == 0
    manifest = Manifest.load(out)
    graphs = [*manifest.graphs.values()]
    graphs += [g.fused for g in manifest.graphs.values() if g.fused is not None]
    assert {g.file for g in graphs} >= {"decoder_fused.onnx", "vision_encoder_fused.onnx"}
    for graph in graphs:
        model = onnx.load(str(out / graph.file), load_external_data=False)
        written = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
        assert written == [graph.details["opset"]] == [13], graph.file
    answers = []
    for model_dir in (out, tiny_model_dir):
        with Pipeline.load(model_dir) as pipe:
            assert pipe.backend.form == "fused"
            answers.append(pipe.answer(None, "Hi", max_new_tokens=6, ignore_eos=True).token_ids)
    assert answers[0] == answers[1]
