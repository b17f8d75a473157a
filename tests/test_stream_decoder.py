"""Streamed text is whole UTF-8 characters, and the pieces join to the decode of all the ids,
whatever the ids: byte-fallback runs that are not valid UTF-8, special and unknown ids included
(a model may emit any of them), for a Llama-style (byte fallback) and a byte-level tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from llava_edge.manifest import Manifest, TokenSpec
from llava_edge.runtime.answer import AnswerText
from llava_edge.runtime.tokenizer import TextCodec

TEXT = "héllo wörld 🤖 naïve ✓ 漢字 and more words"


@pytest.fixture(scope="module")
def llama_style(tiny_model_dir: Path) -> TextCodec:
    manifest = Manifest.load(tiny_model_dir)
    return TextCodec(
        tiny_model_dir / manifest.tokenizer, manifest.tokens, manifest.num_image_tokens
    )


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory) -> TextCodec:
    """A GPT-2 style tokenizer: bytes as characters, no byte-fallback tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["</s>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(
        [TEXT, "the quick brown fox jumps over the lazy dog"] * 5, trainer
    )
    path = tmp_path_factory.mktemp("byte_level") / "tokenizer.json"
    tokenizer.save(str(path))
    return TextCodec(path, TokenSpec(image_token_id=1, eos_token_ids=[0]), num_image_tokens=4)


def stream(codec: TextCodec, ids: list[int]) -> list[str]:
    decoder = codec.stream()
    return [decoder.push(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize("name", ["llama_style", "byte_level"])
def test_pieces_are_whole_characters_and_join_to_the_decode(name, request):
    codec: TextCodec = request.getfixturevalue(name)
    ids = codec.encode(TEXT, first=False)
    pieces = stream(codec, ids)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == codec.decode(ids) == TEXT


@pytest.mark.parametrize("name", ["llama_style", "byte_level"])
def test_any_ids_stream_to_their_decode(name, request):
    """Random ids past the vocabulary too, as a model with a padded embedding table emits."""
    codec: TextCodec = request.getfixturevalue(name)
    size = codec.tokenizer.get_vocab_size() + 40
    rng = np.random.default_rng(0)
    for _ in range(300):
        ids = rng.integers(0, size, 30).tolist()
        pieces = stream(codec, ids)
        assert "".join(pieces) == codec.decode(ids), ids
        assert not any(p.endswith("\ufffd") for p in pieces[:-1])  # never half a character


def test_a_byte_that_reads_as_a_character_alone_is_held_until_its_run_ends(llama_style):
    codec = llama_style
    plus, lead, word = (codec.tokenizer.token_to_id(t) for t in ("<0x2B>", "<0xE5>", "▁the"))
    # '+' alone is valid, but '+' followed by a lone lead byte is one invalid run: '\ufffd\ufffd'
    pieces = stream(codec, [word, plus, lead, word])
    assert pieces[1:3] == ["", ""]
    assert "".join(pieces) == codec.decode([word, plus, lead, word]) == "the\ufffd\ufffd the"


@pytest.mark.parametrize("name", ["llama_style", "byte_level"])
def test_text_is_held_only_while_it_could_begin_a_stop_string(name, request):
    """A robot reading the stream acts on "the door is open" as it comes, not once as many more
    characters as the longest stop string has arrived (the whole of a short answer)."""
    codec: TextCodec = request.getfixturevalue(name)
    text = AnswerText(codec, ["the lazy dog", "fox!"])
    shown = ""
    for i in codec.encode("the quick brown fox jumps over the lazy dog", first=False):
        shown += text.push(i)
        assert text.text.startswith(shown)
        held = text.text[len(shown) :]
        assert held == "" or any(stop.startswith(held) for stop in text.stop), held
    assert text.stopped and shown == text.text == "the quick brown fox jumps over "
    assert text.finish() == ""


def test_a_pad_id_that_names_an_ordinary_token_is_text(tiny_checkpoint: Path, tmp_path: Path):
    """A generation config's pad_token_id (0 in many, '!' in a byte-level BPE vocabulary) where
    the tokenizer has no pad token of its own names an ordinary token: answers keep its text,
    as transformers' decode does."""
    import json
    import shutil

    from transformers import AutoTokenizer

    from llava_edge.export.exporter import export_checkpoint

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, checkpoint)
    settings = json.loads((checkpoint / "tokenizer_config.json").read_text())
    del settings["pad_token"]
    (checkpoint / "tokenizer_config.json").write_text(json.dumps(settings))
    reference = AutoTokenizer.from_pretrained(checkpoint)
    ids = reference("a word and more words", add_special_tokens=False).input_ids
    pad = ids[1]  # an ordinary token
    generation = json.loads((checkpoint / "generation_config.json").read_text())
    (checkpoint / "generation_config.json").write_text(
        json.dumps({**generation, "pad_token_id": pad})
    )
    export_checkpoint(checkpoint, tmp_path / "model", verify=False, fused=False, log=print)
    manifest = Manifest.load(tmp_path / "model")
    assert manifest.tokens.pad_token_id == pad
    codec = TextCodec(tmp_path / "model" / manifest.tokenizer, manifest.tokens, 1)
    expected = reference.decode(ids, skip_special_tokens=True)
    assert codec.decode(ids) == "".join(stream(codec, ids)) == expected
    assert reference.decode([pad]) in expected
