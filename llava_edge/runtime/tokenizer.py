"""Text <-> token ids with the `tokenizers` library, following the manifest's token facts."""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer

from llava_edge.errors import LlavaEdgeError, PromptTooLong
from llava_edge.manifest import TokenSpec

BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading token ids two sequences share."""
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


class TextCodec:
    """Encodes prompts (expanding `<image>` to one id per image feature) and decodes answers."""

    def __init__(
        self,
        path: str | Path,
        tokens: TokenSpec,
        num_image_tokens: int,
        max_tokens: int | None = None,
    ):
        """max_tokens: the longest prompt there is room for (the context); a text far too long
        to encode to that many is refused unread (None: every text is read)."""
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise LlavaEdgeError(f"cannot read tokenizer {path}: {e}") from None
        self.tokens = tokens
        self.num_image_tokens = num_image_tokens
        # What decode leaves out: the image placeholder, the end of an answer and the tokenizer's
        # own special tokens, as transformers' decode does. Not the manifest's pad or BOS id as
        # such: a generation config's pad_token_id may name an ordinary token ('!'), whose text
        # an answer keeps.
        self.silent = {tokens.image_token_id, *tokens.eos_token_ids} | {
            i for i, token in self.tokenizer.get_added_tokens_decoder().items() if token.special
        }
        vocab = self.tokenizer.get_vocab()
        # byte-fallback tokens, as the ByteFallback decoder recognises them
        self.byte_tokens = {i for token, i in vocab.items() if BYTE_TOKEN.fullmatch(token)}
        # No token spans more characters than its vocabulary entry (byte-level entries spell a
        # byte a character), so a text over `max_tokens` times that is over the limit unread.
        self.longest_token = max((len(token) for token in vocab), default=1)
        self.max_tokens = max_tokens

    @property
    def video_placeholder(self) -> str | None:
        """The text of the model's video placeholder, which `encode` refuses (None: it has
        none)."""
        video_id = self.tokens.video_token_id
        return None if video_id is None else self.tokenizer.id_to_token(video_id)

    def encode(
        self,
        text: str,
        first: bool = True,
        image_tokens: int | Sequence[int] | None = None,
        raw: bool = False,
    ) -> list[int]:
        """Token ids of `text`; `first` starts a new sequence (adds BOS where the model wants it:
        before a text the chat template rendered, or, `raw`, before one written without it).

        Each `<image>` placeholder becomes as many image ids as its image has features (default:
        the model's `num_image_tokens`; an AnyRes image's count depends on its size; a sequence
        gives each placeholder its own, in order), as transformers' processor does, so the ids
        line up with the image features put in their place.
        """
        # Encoding holds the GIL (seconds for megabytes): every thread of the process would wait
        # on a text that cannot fit anyway. Twice the bound, for normalizers that drop text.
        if self.max_tokens is not None and len(text) > 2 * self.longest_token * self.max_tokens:
            raise PromptTooLong(
                f"the prompt is {len(text)} characters, far more than the {self.max_tokens} "
                "tokens this model takes; shorten it"
            )
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        video_id = self.tokens.video_token_id
        if video_id is not None and video_id in ids:
            raise LlavaEdgeError(
                f"the prompt holds {self.video_placeholder!r}, the model's video "
                "placeholder: llava-edge takes no video (ask about its frames as images); "
                "take it out of the text"
            )
        add_bos = self.tokens.add_bos
        if raw and self.tokens.raw_bos is not None:
            add_bos = self.tokens.raw_bos
        if first and add_bos and self.tokens.bos_token_id is not None:
            ids = [self.tokens.bos_token_id, *ids]
        image_id = self.tokens.image_token_id
        if image_id not in ids:
            return ids
        if image_tokens is None or isinstance(image_tokens, int):
            counts = itertools.repeat(image_tokens or self.num_image_tokens)
        else:
            counts = iter(image_tokens)
        expanded: list[int] = []
        for token_id in ids:
            if token_id != image_id:
                expanded.append(token_id)
                continue
            count = next(counts, None)
            if count is None:
                raise LlavaEdgeError(
                    "the prompt holds more <image> placeholders than images given: give one "
                    "image for each"
                )
            expanded.extend([image_id] * count)
        return expanded

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            [i for i in ids if i not in self.silent], skip_special_tokens=True
        )

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Turns a growing list of token ids into text pieces that are whole UTF-8 characters and
    that, joined, equal the decode of all the ids.

    A piece is released once it no longer ends in a replacement character; decoding a short
    window of ids (not the whole answer) keeps the cost per token constant, the way
    text-generation-inference does it. A byte-fallback token (`<0xE5>`) is held until the run of
    byte tokens it belongs to ends: the ByteFallback decoder turns a whole run that is not valid
    UTF-8 into replacement characters, so a byte that reads as a character alone ('+') may read
    as '\ufffd' once the next byte arrives. Hand-written because tokenizers' DecodeStream, the
    same algorithm, releases such a byte at once and then raises ("Invalid prefix encountered")
    when the run goes on, which a model's output can make it do.
    """

    def __init__(self, codec: TextCodec):
        self.codec = codec
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: always just after a released, complete token
        self.read_offset = 0  # ids up to here are released

    def push(self, token_id: int) -> str:
        """Add one token and return the text it completes ('' while a character is unfinished)."""
        if token_id in self.codec.silent or self.codec.tokenizer.id_to_token(token_id) is None:
            return ""  # decodes to nothing, so a byte run goes on across it
        self.ids.append(token_id)
        if token_id in self.codec.byte_tokens:
            return ""  # the run may go on and change how its bytes read
        decode = self.codec.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset])
        text = decode(self.ids[self.prefix_offset :])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Whatever is left at the end, even an unfinished character."""
        prefix = self.codec.decode(self.ids[self.prefix_offset : self.read_offset])
        text = self.codec.decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix) :]
