"""A Llama-style tokenizer built locally with `tokenizers` (no download possible here).

SentencePiece-like BPE: words start with '▁', unknown characters fall back to byte tokens
(<0x00>..<0xFF>), `<s>` is prepended to every prompt. Trained on the strings of the synthetic data
and the chat templates, so the demo's words are single tokens and a tiny model learns fast.
"""

from __future__ import annotations

import json

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from llava_edge.runtime.template import IMAGE_PLACEHOLDER, TEMPLATES
from llava_edge.training.synth import corpus

CORPUS_TEMPLATES = ("llava_1_5", "vicuna_v1", "plain")
UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]

GENERAL_TEXT = """\
The quick brown fox jumps over the lazy dog. What is in the image? Describe the picture in detail.
A robot arm picks up a box from the table and places it on the shelf next to the door.
There is a person walking on the street with a dog. The sky is blue and the grass is green.
Answer with the option's letter from the given choices directly. Yes. No. The answer is 0 1 2 3 4 5 6 7 8 9.
"""


def build_tokenizer(vocab_size: int) -> Tokenizer:
    """Train a BPE of at most `vocab_size` entries, then add `<image>` and `<pad>` after them.

    Byte tokens take ids 3-258 as in Llama's vocabulary. They must be ordinary vocabulary
    entries, not special tokens (which decoding skips), so the trained model is rebuilt with
    them in place rather than passed to the trainer as special tokens.
    """
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size - len(BYTE_TOKENS), 64),
        special_tokens=[UNK, BOS, EOS],
        show_progress=False,
    )
    draft = Tokenizer(models.BPE(unk_token=UNK))
    draft.pre_tokenizer = _pre_tokenizer()
    draft.train_from_iterator(_corpus(), trainer)
    trained = json.loads(draft.to_str())["model"]
    vocab = {token: i for i, token in enumerate([UNK, BOS, EOS, *BYTE_TOKENS])}
    for token, _ in sorted(trained["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in trained["merges"]]

    tokenizer = Tokenizer(
        models.BPE(vocab, merges, unk_token=UNK, byte_fallback=True, fuse_unk=True)
    )
    tokenizer.pre_tokenizer = _pre_tokenizer()
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in (UNK, BOS, EOS)]
    )
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in (IMAGE_PLACEHOLDER, PAD)]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return tokenizer


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")


def _corpus() -> list[str]:
    lines = corpus() + GENERAL_TEXT.splitlines()
    for name in CORPUS_TEMPLATES:  # fixed, so that new templates leave the vocabulary alone
        template = TEMPLATES[name]
        lines += [template.system, template.user, template.assistant]
    return [line for line in lines if line.strip()]
