"""Loading a model dir as a robot's app meets it: files it may not read give one clear line,
never a traceback."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from llava_edge import manifest as manifest_module
from llava_edge.cli import main


@pytest.fixture
def model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    return copy


def _unreadable(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Reading `name` fails as it does for a file copied with another user's permissions (the
    tests may run as root, for whom chmod takes nothing away)."""

    def refuse(path: os.PathLike) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    real_sha256, real_read_text = manifest_module.sha256, Path.read_text
    monkeypatch.setattr(
        manifest_module,
        "sha256",
        lambda path: refuse(path) if Path(path).name == name else real_sha256(path),
    )
    monkeypatch.setattr(
        Path,
        "read_text",
        lambda self, *a, **k: refuse(self) if self.name == name else real_read_text(self, *a, **k),
    )


@pytest.mark.parametrize("name", ["manifest.json", "decoder.onnx", "tokenizer.json"])
def test_an_unreadable_file_is_one_line(
    model_copy: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, name: str
) -> None:
    _unreadable(monkeypatch, name)
    argv = ["run", str(model_copy), "--prompt", "hi", "--max-new-tokens", "1", "--verify-files"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"llava-edge run: error: cannot read {model_copy / name}: Permission denied"


def test_file_names_that_leave_the_model_dir_are_refused(
    model_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A model dir from elsewhere whose manifest names ../table.npy: quantize would copy it to
    ../table.npy of its new dir, outside the output."""
    import json

    manifest = json.loads((model_copy / "manifest.json").read_text())
    (model_copy / "embed_tokens.npy").rename(tmp_path / "table.npy")
    manifest["embeddings"] = "../table.npy"
    manifest["files"]["../table.npy"] = manifest["files"].pop("embed_tokens.npy")
    (model_copy / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "quantized").mkdir()
    out = tmp_path / "quantized" / "fp16"
    assert main(["quantize", str(model_copy), str(out), "--precision", "fp16"]) == 1
    err = capsys.readouterr().err.strip()
    assert "file name '../table.npy' is not inside the model dir" in err and "\n" not in err
    assert not list((tmp_path / "quantized").iterdir())  # nothing written, inside or beside


def test_a_machine_that_verified_many_dirs_still_remembers_the_latest(
    model_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files are hashed the first time a machine sees them, then remembered among the last
    VERIFIED_KEPT; with the list full, the newest must not be the one forgotten."""
    from llava_edge.manifest import VERIFIED_KEPT, Manifest

    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("LLAVA_EDGE_CACHE", str(cache))
    earlier = [f"{'f' * 56}{i:08x}" for i in range(VERIFIED_KEPT)]  # older, of high hash value
    (cache / "verified.txt").write_text("\n".join(earlier) + "\n")
    manifest = Manifest.load(model_copy)
    manifest.check_files(model_copy)  # hashes, and remembers
    hashed: list[str] = []
    real = manifest_module.sha256
    monkeypatch.setattr(manifest_module, "sha256", lambda p: hashed.append(p) or real(p))
    manifest.check_files(model_copy)
    assert not hashed
    remembered = (cache / "verified.txt").read_text().split()
    assert len(remembered) == VERIFIED_KEPT and earlier[0] not in remembered  # the oldest went


def test_a_damaged_record_of_verified_dirs_is_rewritten_not_a_failed_load(
    model_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record of verified dirs is a cache: one damaged into bytes that are not text (a bad
    sector, a stray write) failed every load on the machine with a UnicodeDecodeError."""
    from llava_edge.manifest import Manifest

    monkeypatch.setenv("LLAVA_EDGE_CACHE", str(tmp_path))
    (tmp_path / "verified.txt").write_bytes(b"\xff\xfe\x00garbage\n")
    manifest = Manifest.load(model_copy)
    manifest.check_files(model_copy)
    hashed: list[str] = []
    real = manifest_module.sha256
    monkeypatch.setattr(manifest_module, "sha256", lambda p: hashed.append(p) or real(p))
    manifest.check_files(model_copy)
    assert not hashed  # remembered in the rewritten record


@pytest.mark.parametrize(
    "failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()]
)
def test_a_failed_remembering_leaves_no_temporary_file_in_the_cache(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure
) -> None:
    """A full disk (skipped: it only means hashing again) or Ctrl-C while the list of verified
    dirs is rewritten leaves the cache as it was, without its temporary copy."""
    from llava_edge.manifest import Manifest

    monkeypatch.setenv("LLAVA_EDGE_CACHE", str(tmp_path))
    (tmp_path / "verified.txt").write_text("earlier\n")

    def fails(*_args: object) -> None:
        raise failure

    monkeypatch.setattr(manifest_module.os, "replace", fails)
    with contextlib.suppress(KeyboardInterrupt):
        Manifest.load(tiny_model_dir).check_files(tiny_model_dir)
    assert os.listdir(tmp_path) == ["verified.txt"]
    assert (tmp_path / "verified.txt").read_text() == "earlier\n"


@pytest.mark.parametrize(
    ("version", "message"),
    [
        (9, "format_version 9 is newer than this llava-edge understands (4); upgrade"),
        ("2", "format_version '2' is not a version number"),
        (0, "format_version 0 is not a version number"),
        (None, "format_version None is not a version number"),
    ],
)
def test_format_versions_it_cannot_read_are_named(
    tiny_model_dir: Path, version: object, message: str
) -> None:
    import json

    from llava_edge.errors import LlavaEdgeError
    from llava_edge.manifest import Manifest

    data = json.loads((tiny_model_dir / "manifest.json").read_text())
    data["format_version"] = version
    with pytest.raises(LlavaEdgeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Manifest.from_dict(data)


@pytest.mark.parametrize(
    ("section", "field", "value", "message"),
    [
        ("text", "num_kv_heads", 0, "text.num_kv_heads is 0, not a size"),
        ("text", "vocab_size", -1, "text.vocab_size is -1, not a size"),
        ("text", "hidden_size", 0, "text.hidden_size is 0, not a size"),
        ("image", "resize", {"shortest_edge": 0}, "image.resize.shortest_edge is 0, not a size"),
        ("image", "resize", {"width": 64}, "image.resize {'width': 64} names neither"),
        ("image", "resample", 9, "image.resample 9 is not a PIL filter"),
        ("image", "std", [0.5, 0.0, 0.5], "image.std [0.5, 0.0, 0.5] need 1 or 3 values each"),
        ("image", "mean", [], "image.mean [] and"),
    ],
)
def test_a_hand_edited_size_or_image_setting_is_named(
    model_copy: Path, capsys: pytest.CaptureFixture, section: str, field: str, value, message: str
) -> None:
    """A manifest edited by hand past what the runtime can take: its check divided by a zero
    num_kv_heads, and the rest passed it to fail in numpy, PIL or onnxruntime with a traceback
    that named no field."""
    import json

    path = model_copy / "manifest.json"
    data = json.loads(path.read_text())
    data[section][field] = value
    path.write_text(json.dumps(data))
    assert main(["run", str(model_copy), "--prompt", "hi", "--max-new-tokens", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and "re-export" in err and "\n" not in err


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("past.{j}", "kv names ('past.{j}', "),
        ("past.{0}", "kv names ('past.{0}', "),
        ("past.{i.key}", "kv names ('past.{i.key}', "),  # a field of the layer number
        ("past.{i[0]}", "kv names ('past.{i[0]}', "),
        ("past_key_values.key", "kv.past_key names 'past_key_values.key' for layer 0, which is"),
    ],
)
def test_a_hand_edited_kv_name_is_named(
    model_copy: Path, capsys: pytest.CaptureFixture, template: str, message: str
) -> None:
    """A KV name template that formats with another field, or names no input of the decoder,
    failed at the first answer with a KeyError or onnxruntime's binding error."""
    import json

    path = model_copy / "manifest.json"
    data = json.loads(path.read_text())
    data["kv"]["past_key"] = template
    path.write_text(json.dumps(data))
    assert main(["run", str(model_copy), "--prompt", "hi", "--max-new-tokens", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and err.endswith("re-export the model") and "\n" not in err


@pytest.mark.parametrize(
    ("section", "field", "value", "message"),
    [
        ("text", "max_context", "2048", "text: max_context: expected int, got '2048'"),
        ("tokens", "eos_token_ids", 2, "tokens: eos_token_ids: expected a list"),
        ("image", "anyres", 3, "image: anyres: expected an object, got int"),
        (None, "template", None, "template: expected an object, got NoneType"),
        (None, "graphs", [], "graphs: expected an object"),
    ],
)
def test_a_field_of_the_wrong_type_is_named_with_what_to_do(
    tiny_model_dir: Path, section: str | None, field: str, value, message: str
) -> None:
    import json

    from llava_edge.errors import LlavaEdgeError
    from llava_edge.manifest import Manifest

    data = json.loads((tiny_model_dir / "manifest.json").read_text())
    (data[section] if section else data)[field] = value
    with pytest.raises(LlavaEdgeError) as raised:
        Manifest.from_dict(data, where="manifest.json")
    assert str(raised.value) == f"manifest.json: {message}; re-export the model"


def test_a_manifest_saved_with_a_byte_order_mark_loads(model_copy: Path) -> None:
    """A manifest edited in a Windows editor that writes UTF-8 with a byte-order mark was "not
    valid JSON", with re-export as the remedy."""
    from llava_edge.manifest import Manifest

    path = model_copy / "manifest.json"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert Manifest.load(model_copy).text.num_layers > 0


def test_without_a_writable_cache_every_load_hashes_the_files(
    model_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the README says of a service whose cache dir cannot be written."""
    from llava_edge.manifest import Manifest

    (tmp_path / "file").write_text("")
    monkeypatch.setenv("LLAVA_EDGE_CACHE", str(tmp_path / "file" / "cache"))  # under a file
    hashed: list[str] = []
    real = manifest_module.sha256
    monkeypatch.setattr(manifest_module, "sha256", lambda p: hashed.append(p) or real(p))
    manifest = Manifest.load(model_copy)
    manifest.check_files(model_copy)
    first = len(hashed)
    manifest.check_files(model_copy)
    assert first == len(manifest.files) and len(hashed) == 2 * first


def _older_template(template: dict) -> dict:
    """A template section as llava-edge wrote it before it recorded how a system prompt given
    at run time is written (`system_format`, and with it `first_user`)."""
    return {k: v for k, v in template.items() if k not in ("system_format", "first_user")}


@pytest.mark.parametrize("name", ["chatml_direct", "vicuna_v1", "llava_1_5"])
def test_an_older_manifest_of_a_known_template_writes_system_prompts_as_it_does(
    tiny_model_dir: Path, name: str
) -> None:
    """chatml_direct's system prompt is its own <|im_start|>system block: taken as plain text, a
    run-time one would replace the block, wrapper and all."""
    import dataclasses
    import json

    from llava_edge.manifest import Manifest
    from llava_edge.runtime.template import TEMPLATES

    data = json.loads((tiny_model_dir / "manifest.json").read_text())
    data["template"] = _older_template(dataclasses.asdict(TEMPLATES[name]))
    assert Manifest.from_dict(data).template == TEMPLATES[name]


def test_an_older_manifest_of_a_checkpoints_own_template_says_to_re_export(
    model_copy: Path, capsys: pytest.CaptureFixture
) -> None:
    """A template read off a checkpoint's Jinja: how it writes a system prompt was not kept, and
    plain text in its place would be a prompt the model was never trained on."""
    import json

    path = model_copy / "manifest.json"
    data = json.loads(path.read_text())
    chatml = {
        "name": "checkpoint",
        "system": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>",
        "user": "\n<|im_start|>user\n",
        "assistant": "<|im_end|>\n<|im_start|>assistant\n",
        "answer_prefix": "",
        "answer_end": "<|im_end|>",
        "image": "<image>\n",
        "system_format": None,  # a checkpoint's template that takes no system prompt
    }
    data["template"] = chatml
    path.write_text(json.dumps(data))
    assert main(["run", str(model_copy), "--prompt", "Hi", "--max-new-tokens", "1"]) == 0
    data["template"] = _older_template(chatml)
    path.write_text(json.dumps(data))
    capsys.readouterr()
    assert main(["run", str(model_copy), "--prompt", "Hi", "--max-new-tokens", "1"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "system_format" in line and "re-export" in line, line


@pytest.mark.parametrize("version", ["1.19.2", "1.18.1"])
def test_an_onnxruntime_too_old_to_answer_right_is_named_at_load(
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    version: str,
) -> None:
    """JetPack 6's onnxruntime-gpu 1.18 and 1.19 load every graph and answer a chat's next turn
    wrongly (int4 with NaN on 1.18); pip's floor does not see that other distribution."""
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "__version__", version)
    assert main(["run", str(tiny_model_dir), "--prompt", "Hi", "--max-new-tokens", "1"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"onnxruntime {version} answers wrongly" in line and "onnxruntime 1.20 or later" in line
    monkeypatch.setattr(onnxruntime, "__version__", "1.20.0")
    assert main(["run", str(tiny_model_dir), "--prompt", "Hi", "--max-new-tokens", "1"]) == 0


def _as_os_path(test: Any) -> Any:
    """A pathlib test (exists, is_dir, is_file) as Python 3.14's: os.path's, hiding any OSError."""
    return lambda self, **_: test(self)


@pytest.mark.parametrize("pathlib", ["raises", "hides"])
@pytest.mark.parametrize("where", ["model dir", "dir above it"])
def test_a_dir_this_user_may_not_look_into_is_one_line(
    model_copy: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    where: str,
    pathlib: str,
) -> None:
    """A model dir copied with another user's permissions (no x bit for this one), or under a
    dir this user may not enter: stat() of what is in it is refused, and was a traceback. From
    Python 3.14 on, pathlib's exists(), is_dir() and is_file() hide that refusal (as os.path's
    do, "hides"), which made it a missing dir or manifest."""
    private = model_copy if where == "model dir" else model_copy.parent
    real = os.stat
    if pathlib == "hides":
        for name, test in (("exists", "exists"), ("is_dir", "isdir"), ("is_file", "isfile")):
            monkeypatch.setattr(Path, name, _as_os_path(getattr(os.path, test)))

    def refuse(path: object, *args: object, **kwargs: object) -> os.stat_result:
        if Path(path) != private and str(path).startswith(str(private)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", refuse)
    assert main(["run", str(model_copy), "--prompt", "hi", "--max-new-tokens", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        f"llava-edge run: error: cannot look into model dir {model_copy}: Permission denied; "
        "let this user read it (chmod -R a+rX)"
    )
