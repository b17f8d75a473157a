"""`llava-edge quantize` on calibration data the runtime would refuse: one line naming the
sample, before any graph is quantized, and no output dir."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

import llava_edge.calib.quantize as quantize
from llava_edge.cli import main


def _pictures(folder: Path, count: int) -> None:
    folder.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", (40, 32), (30 * i, 120, 200)).save(folder / f"{i}.png")


@pytest.mark.parametrize(
    ("bad", "where", "message"),
    [
        ("huge", "calibration", "over the limit"),
        ("huge", "held_out", "over the limit"),
        ("corrupt", "calibration", "is corrupt or truncated"),
        ("long_prompt", "calibration", "leaves no room"),
        ("long_prompt", "held_out", "leaves no room"),
    ],
)
def test_unusable_calibration_data_is_named_before_any_work(
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    bad: str,
    where: str,
    message: str,
) -> None:
    folder = tmp_path / "pictures"
    _pictures(folder, 4)
    # Sorted by name: 0.png is calibrated on first; with --report the last one is held out.
    picture = folder / ("0.png" if where == "calibration" else "9.png")
    source = ["--images", str(folder)]
    if bad == "huge":  # 63 Mpx, over the runtime's 50 Mpx (a small file: one colour)
        Image.new("RGB", (9000, 7000), (10, 200, 30)).save(picture)
    elif bad == "corrupt":
        picture.write_bytes((folder / "1.png").read_bytes()[:60])
    else:  # a LLaVA JSON whose one question is longer than the tiny model's context
        Image.new("RGB", (40, 32)).save(picture)
        items = [
            {
                "image": path.name,
                "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}],
            }
            for path in sorted(folder.iterdir())
        ]
        long = items[0 if where == "calibration" else -1]["conversations"][0]
        long["value"] += " word" * 3000
        (tmp_path / "calib.json").write_text(json.dumps(items))
        source = ["--calib", str(tmp_path / "calib.json"), "--images", str(folder)]
        picture = tmp_path / "calib.json"  # the sample is named by the file and its index

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("a graph was quantized before the data was checked")

    monkeypatch.setattr(quantize, "int8_dynamic", no_work)
    # Left out, the bad sample leaves too few for --samples 4 (one more is held out).
    args = ["--precision", "int8", *source, "--samples", "4", "--report"]
    out = tmp_path / "out"
    assert main(["quantize", str(tiny_model_dir), str(out), *args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("llava-edge quantize: error:") and "\n" not in err
    assert str(picture) in err and message in err
    assert re.search(
        "1 bad sample.s. of .* leave [23] to calibrate on, fewer than --samples 4", err
    )
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


class Stop(Exception):
    pass


def _calib_json_with_bad_samples(tmp_path: Path) -> Path:
    """6 samples: the first's picture is gone, the fourth's is not a picture."""
    _pictures(tmp_path / "images", 6)
    (tmp_path / "images" / "0.png").unlink()
    (tmp_path / "images" / "3.png").write_bytes(b"not a picture")
    items = [
        {"image": f"{i}.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"}]}
        for i in range(6)
    ]
    path = tmp_path / "calib.json"
    path.write_text(json.dumps(items))
    return path


def test_bad_calibration_samples_are_left_out_while_enough_remain(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calib = _calib_json_with_bad_samples(tmp_path)
    calibrated: list[list] = []

    def activations(model_dir: Path, samples: list, *args: object, **kwargs: object) -> None:
        calibrated.append(samples)
        raise Stop  # enough: the samples to calibrate on are known

    monkeypatch.setattr(quantize, "Activations", activations)
    said: list[str] = []
    with pytest.raises(Stop):
        quantize.quantize_model(
            tiny_model_dir, tmp_path / "out", "int8", calib=calib, samples=4, log=said.append
        )
    assert [s.image.name for s in calibrated[0]] == ["1.png", "2.png", "4.png", "5.png"]
    assert len(said) == 1
    assert said[0].startswith(
        f"skipped 2 bad sample(s) of {calib}; the first: {calib}: image 0.png of sample 0 is "
        "not under"
    )


def test_too_few_good_calibration_samples_are_refused_naming_the_count(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    calib = _calib_json_with_bad_samples(tmp_path)
    out = tmp_path / "out"
    args = ["--precision", "int8", "--calib", str(calib), "--samples", "5"]
    assert main(["quantize", str(tiny_model_dir), str(out), *args]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(
        f"llava-edge quantize: error: 2 bad sample(s) of {calib} leave 4 to calibrate on, "
        f"fewer than --samples 5 (the first: {calib}: image 0.png of sample 0 is not under"
    )
    assert err.endswith("fix or remove them, or pass --samples 4")
    assert not out.exists()


def test_data_whose_first_samples_have_no_image_says_how_many_to_take(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A file that opens with text-only samples (LLaVA-1.5's mix holds ShareGPT's) has pictures
    further on: the refusal names the first and the --samples that reaches it."""
    _pictures(tmp_path / "images", 1)
    items = [{"conversations": [{"from": "human", "value": f"Tell story {i}."}]} for i in range(5)]
    items.append({"image": "0.png", "conversations": [{"from": "human", "value": "<image>\nHi"}]})
    (tmp_path / "calib.json").write_text(json.dumps(items))
    out = tmp_path / "out"
    args = ["--precision", "int8", "--calib", str(tmp_path / "calib.json"), "--samples", "3"]
    assert main(["quantize", str(tiny_model_dir), str(out), *args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("llava-edge quantize: error:") and "\n" not in err
    assert "none of the first 3 calibration samples has an image" in err
    assert f"the first with one is {tmp_path / 'calib.json'} sample 5: pass --samples 6" in err
    assert not out.exists()
    # as it says, --samples 6 reaches the picture
    args[-1] = "6"
    assert main(["quantize", str(tiny_model_dir), str(out), *args]) == 0


@pytest.mark.parametrize("report", [False, True])
def test_bad_samples_that_leave_good_ones_unusable_are_named_with_what_those_lack(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, report: bool
) -> None:
    """Good samples remain, but cannot serve: all text-only (the one picture is missing), or one
    alone for --report. The refusal says so and names the bad ones; it said they left none."""
    _pictures(tmp_path / "images", 1)
    picture = {"conversations": [{"from": "human", "value": "<image>\nHi"}]}
    texts = [{"conversations": [{"from": "human", "value": f"Tell story {i}."}]} for i in range(3)]
    items = [{**picture, "image": "0.png"}] if report else texts
    items.append({**picture, "image": "gone.png"})
    (tmp_path / "calib.json").write_text(json.dumps(items))
    out = tmp_path / "out"
    args = ["--precision", "int8", "--calib", str(tmp_path / "calib.json")]
    assert main(["quantize", str(tiny_model_dir), str(out), *args, *["--report"] * report]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("llava-edge quantize: error:") and "\n" not in err
    lacking = "--report needs samples beyond" if report else "no calibration sample has an image"
    assert lacking in err and "leave 0" not in err
    assert f"1 bad sample(s) of {tmp_path / 'calib.json'} were left out" in err
    assert "image gone.png of sample" in err
    assert not out.exists()


@pytest.mark.parametrize("given", ["--calib", "--images"])
def test_force_never_deletes_the_calibration_data(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, given: str
) -> None:
    out = tmp_path / "work"
    _pictures(out / "pictures", 3)  # the calibration data lives in the dir to replace
    args = ["--precision", "int8", given, str(out / "pictures"), "--samples", "2", "--force"]
    assert main(["quantize", str(tiny_model_dir), str(out), *args]) == 1
    err = capsys.readouterr().err.strip()
    assert "holds the calibration data" in err and "\n" not in err
    assert len(list((out / "pictures").iterdir())) == 3


@pytest.mark.parametrize(
    "out, message",
    [
        ("work/model", "OUT_DIR must differ from MODEL_DIR"),
        ("work", "holds the source model dir"),
        ("work/model/int8", "is inside the source model dir"),
    ],
)
def test_force_never_deletes_the_source_dir(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, out: str, message: str
) -> None:
    import shutil

    source = Path(shutil.copytree(tiny_model_dir, tmp_path / "work" / "model"))
    before = sorted(p.name for p in source.iterdir())
    _pictures(tmp_path / "pictures", 2)
    args = ["--precision", "int8", "--images", str(tmp_path / "pictures"), "--force"]
    assert main(["quantize", str(source), str(tmp_path / out), *args]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    assert sorted(p.name for p in source.iterdir()) == before


def test_fewer_samples_than_asked_are_said(tiny_model_dir: Path, tmp_path: Path) -> None:
    _pictures(tmp_path / "pictures", 3)
    said: list[str] = []
    result = quantize.quantize_model(
        tiny_model_dir, tmp_path / "out", "int8", images=tmp_path / "pictures", log=said.append
    )
    assert result == {}
    assert any("calibrating on 3 samples, fewer than --samples 32" in line for line in said)
    details = quantize.Manifest.load(tmp_path / "out").graphs["vision_encoder"].details
    assert details["tensorrt"]["calibration_feeds"] == 3


def test_a_standard_form_that_does_not_load_is_never_installed(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """The runtime's CPU load runs the fused forms; the standard ones (GPU providers run them)
    are checked too."""
    real = quantize.int8_dynamic

    def broken_standard_decoder(src: Path, dst: Path, *args: object) -> dict:
        details = real(src, dst, *args)
        if dst.name == "decoder.onnx":
            dst.write_bytes(dst.read_bytes()[: dst.stat().st_size // 2])
        return details

    monkeypatch.setattr(quantize, "int8_dynamic", broken_standard_decoder)
    _pictures(tmp_path / "pictures", 2)
    out = tmp_path / "out"
    args = ["--precision", "int8", "--images", str(tmp_path / "pictures")]
    assert main(["quantize", str(tiny_model_dir), str(out), *args]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "does not load (decoder.onnx:" in error and "nothing was installed" in error
    assert not out.exists()


@pytest.mark.parametrize("weights", ["inline", "external_read_only"])
def test_nothing_is_written_into_the_source_dir(
    tiny_model_dir: Path,
    tiny_checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    weights: str,
) -> None:
    """onnxruntime's quantizers write a shape-inferred copy beside the graph they are handed: not
    in the source dir where it is read-only (a robot's image, a shared mount), nor where the
    graphs hold their weights inside them. (A writable dir of .data weights gets the copy while
    a step runs: the interrupted test below.)"""
    import os

    import onnx

    from llava_edge import files
    from llava_edge.export.exporter import export_checkpoint

    source = tiny_model_dir
    if weights == "external_read_only":  # weights in .data files, as a 7B model's are
        source = tmp_path / "external"
        monkeypatch.setattr(files, "MAX_PROTOBUF", 0)
        export_checkpoint(tiny_checkpoint, source, verify=False, log=lambda *_: None)
        real_access = os.access
        monkeypatch.setattr(  # root may write anywhere: a read-only mount, as far as asked
            os, "access", lambda p, mode: real_access(p, mode) and Path(p) != source
        )
    written: list[Path] = []
    real = onnx.shape_inference.infer_shapes_path

    def recorded(model_path: str, output_path: str = "", *args: object, **kwargs: object) -> None:
        written.append(Path(output_path or model_path).resolve())
        real(model_path, output_path, *args, **kwargs)

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes_path", recorded)
    _pictures(tmp_path / "pictures", 2)
    quantize.quantize_model(
        source,
        tmp_path / "out",
        "int4",
        images=tmp_path / "pictures",
        method="entropy",
        prefill="int8",
        log=lambda *_: None,
    )
    assert written  # the quantizers did write their copies
    assert not [p for p in written if p.parent == source.resolve()]


@pytest.mark.parametrize("free", [100_000, 10**12])
def test_a_full_disk_is_named(
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    free: int,
) -> None:
    """A write to a full disk fails inside onnx as a protobuf DecodeError of a copy it truncated:
    named as what it is where the disk is full, left alone where it is not."""
    import shutil
    from types import SimpleNamespace

    def truncated_copy(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Error parsing message with type 'onnx.ModelProto'")

    monkeypatch.setattr(quantize, "int8_dynamic", truncated_copy)
    monkeypatch.setattr(
        shutil, "disk_usage", lambda path: SimpleNamespace(total=10**12, used=0, free=free)
    )
    _pictures(tmp_path / "pictures", 2)
    out = tmp_path / "out"
    args = ["--precision", "int8", "--images", str(tmp_path / "pictures")]
    if free > 10**9:  # room enough: the error is another's, and not hidden
        with pytest.raises(RuntimeError, match="Error parsing"):
            main(["quantize", str(tiny_model_dir), str(out), *args])
    else:
        assert main(["quantize", str(tiny_model_dir), str(out), *args]) == 1
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("llava-edge quantize: error: the disk holding")
        assert "is full (0.1 MB free" in err and "nothing was installed" in err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_a_dir_exported_below_opset_13_is_refused_for_int8_and_int4(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Older exports allowed opsets 10-12, where the TensorRT forms' per-channel Q/DQ does not
    exist: the written dir used to fail its own load check after all the work."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tiny_model_dir, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["source"]["opset"] = 11
    (old / "manifest.json").write_text(json.dumps(manifest))
    _pictures(tmp_path / "pictures", 2)
    args = ["--images", str(tmp_path / "pictures"), "--samples", "2"]
    for precision in ("int8", "int4"):
        out = tmp_path / precision
        assert main(["quantize", str(old), str(out), "--precision", precision, *args]) == 1
        err = capsys.readouterr().err
        assert "exported at opset 11" in err and "--opset 13" in err and not out.exists()


def test_an_interrupted_quantize_leaves_the_source_dir_as_it_was(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the graphs keep their weights in .data files and the dir is writable, onnxruntime's
    quantizers write their shape-inferred copy beside the graph; Ctrl-C while it is there must
    not leave it in the source dir."""
    import onnx

    from llava_edge import files
    from llava_edge.export.exporter import export_checkpoint

    source = tmp_path / "external"
    monkeypatch.setattr(files, "MAX_PROTOBUF", 0)
    export_checkpoint(tiny_checkpoint, source, verify=False, log=lambda *_: None)
    before = sorted(p.name for p in source.iterdir())
    real = onnx.shape_inference.infer_shapes_path

    def interrupted(model_path: str, output_path: str = "", *args: object, **kw: object) -> None:
        real(model_path, output_path, *args, **kw)
        assert Path(output_path).parent == source  # the copy this test is about
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes_path", interrupted)
    _pictures(tmp_path / "pictures", 2)
    with pytest.raises(KeyboardInterrupt):
        quantize.quantize_model(
            source, tmp_path / "out", "int8", images=tmp_path / "pictures", log=lambda *_: None
        )
    assert sorted(p.name for p in source.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["external", "pictures"]


def test_force_never_deletes_the_images_a_calibration_json_finds(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The JSON's pictures found beside it (images/), not named on the command line, are
    calibration data too: --force must not replace their folder with the quantized dir."""
    _pictures(tmp_path / "data" / "images", 3)
    items = [
        {"image": f"{i}.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"}]}
        for i in range(3)
    ]
    (tmp_path / "data" / "train.json").write_text(json.dumps(items))
    out = tmp_path / "data" / "images"
    args = ["--precision", "int8", "--calib", str(tmp_path / "data" / "train.json"), "--force"]
    assert main(["quantize", str(tiny_model_dir), str(out), *args, "--samples", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert "holds the calibration images" in err and "\n" not in err
    assert sorted(p.name for p in out.iterdir()) == ["0.png", "1.png", "2.png"]


def test_samples_left_out_for_a_held_out_picture_are_said(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second question about the held-out picture is calibrated on by no one: the note says
    so, rather than that the data holds no more."""
    _pictures(tmp_path / "pictures", 3)
    pairs = [(2, "What?"), (0, "What?"), (1, "What?"), (2, "Where?")]
    items = [
        {"image": f"{i}.png", "conversations": [{"from": "human", "value": f"<image>\n{q}"}]}
        for i, q in pairs
    ]
    (tmp_path / "calib.json").write_text(json.dumps(items))

    class Stop(Exception):
        pass

    def stop(*args: object) -> None:
        raise Stop

    monkeypatch.setattr(quantize, "scratch_beside", stop)  # the work starts after the note
    said: list[str] = []
    with pytest.raises(Stop):
        quantize.quantize_model(
            tiny_model_dir,
            tmp_path / "out",
            "int8",
            calib=tmp_path / "calib.json",
            images=tmp_path / "pictures",
            report=True,
            log=said.append,
        )
    assert said == [
        "note: calibrating on 2 samples, fewer than --samples 32 asks: the data holds no more, "
        "1 more held out for --report, 1 left out as they ask about a held-out picture"
    ]


@pytest.mark.parametrize("samples", [True, 2.0, "8"])
def test_samples_must_be_a_whole_number(tiny_model_dir: Path, tmp_path: Path, samples) -> None:
    """True was taken as one sample, and numpy's integers (which robot code holds) were refused
    as 'at least 1, got 8'."""
    from llava_edge.errors import LlavaEdgeError

    with pytest.raises(
        LlavaEdgeError, match=f"--samples must be a whole number of at least 1, got {samples!r}"
    ):
        quantize.quantize_model(
            tiny_model_dir, tmp_path / "out", "int8", images=tmp_path, samples=samples
        )


def test_samples_may_be_a_numpy_integer(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np

    taken: list[object] = []

    def split(precision: str, calib: object, images: object, samples: object, *rest: object):
        taken.append(samples)
        raise KeyboardInterrupt  # enough: the count got through

    monkeypatch.setattr(quantize, "_split", split)
    with pytest.raises(KeyboardInterrupt):
        quantize.quantize_model(
            tiny_model_dir,
            tmp_path / "out",
            "int8",
            images=tmp_path / "pictures",
            samples=np.int64(8),
        )
    assert taken == [8] and type(taken[0]) is int


@pytest.mark.parametrize("pictures", [10, 5])
def test_fp16_reports_on_a_folder_with_a_bad_picture_while_enough_remain(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pictures: int
) -> None:
    """fp16 --report holds out up to 8 samples: one bad picture of 10 leaves 8, one of 5 leaves
    4 of the 5 it would have compared on."""
    from llava_edge.errors import LlavaEdgeError

    folder = tmp_path / "pictures"
    _pictures(folder, pictures)
    (folder / "0.png").write_bytes((folder / "1.png").read_bytes()[:60])

    def stop(*args: object) -> None:
        raise Stop

    monkeypatch.setattr(quantize, "scratch_beside", stop)
    said: list[str] = []
    run = dict(images=folder, report=True, log=said.append)
    if pictures == 5:
        with pytest.raises(LlavaEdgeError) as refused:
            quantize.quantize_model(tiny_model_dir, tmp_path / "out", "fp16", **run)
        assert str(refused.value).startswith(
            f"1 bad sample(s) of {folder} leave 4 to compare on, fewer than the 5 --report holds "
            f"out (the first: image {folder / '0.png'} is corrupt or truncated"
        )
        return
    with pytest.raises(Stop):
        quantize.quantize_model(tiny_model_dir, tmp_path / "out", "fp16", **run)
    assert said == [
        f"skipped 1 bad sample(s) of {folder}; the first: image {folder / '0.png'} is corrupt or "
        "truncated (image file is truncated)"
    ]
