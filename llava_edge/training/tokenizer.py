"""A Llama-style tokenizer built locally with `tokenizers` (no download possible here).

SentencePiece-like BPE: words start with '▁', unknown characters fall back to byte tokens
(<0x00>..<0xFF>), `<s>` is prepended to every prompt. Trained on the strings of the synthetic data
and the chat templates, so the demo's words are single tokens and a tiny model learns fast.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from llava_edge.runtime.template import IMAGE_PLACEHOLDER, TEMPLATES
from llava_edge.training.synth import corpus

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]

GENERAL_TEXT = """\
The quick brown fox jumps over the lazy dog. What is in the image? Describe the picture in detail.
A robot arm picks up a box from the table and places it on the shelf next to the door.
There is a person walking on the street with a dog. The sky is blue and the grass is green.
Answer with the option's letter from the given choices directly. Yes. No. The answer is 0 1 2 3 4 5 6 7 8 9.
"""


def build_tokenizer(vocab_size: int) -> Tokenizer:
    """Train a BPE of at most `vocab_size` entries, then add `<image>` and `<pad>` after them."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNK, byte_fallback=True, fuse_unk=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[UNK, BOS, EOS, *BYTE_TOKENS],
        show_progress=False,
    )
    lines = corpus() + GENERAL_TEXT.splitlines()
    for template in TEMPLATES.values():
        lines += [template.system, template.user, template.assistant]
    tokenizer.train_from_iterator([line for line in lines if line.strip()], trainer)
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in (IMAGE_PLACEHOLDER, PAD)]
    )
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tokenizer
