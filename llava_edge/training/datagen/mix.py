"""Mixing LLaVA files with weights, as LLaVA-1.5 mixes generated conversations with short-answer
VQA data.

A source's weight is how many times its samples go into the mix: 1 all of them once, 0.5 a
random half, 2.5 all of them twice and a random half a third time. The mix is shuffled. The
same sources, weights and seed give the same file. Samples are copied unchanged; each one is
checked first (the same checks training makes), so a bad sample stops the mix with its source
and id, not a training run hours later.
"""

from __future__ import annotations

import math
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

from llava_edge.errors import LlavaEdgeError
from llava_edge.logs import terminal_bar
from llava_edge.training.data import BadSample, SampleFile, parse_sample
from llava_edge.training.datagen.llava_json import write_samples


@dataclass(frozen=True)
class Source:
    path: Path
    weight: float


@dataclass
class SourceStats:
    source: Source
    available: int = 0  # samples in the file
    samples: int = 0  # in the mix
    images: set = field(default_factory=set)
    turns: int = 0
    answer_words: int = 0

    @property
    def mean_answer_words(self) -> float:
        return self.answer_words / self.turns if self.turns else 0.0


@dataclass
class MixResult:
    out: Path
    seed: int
    sources: list[SourceStats]


def parse_source(spec: str | os.PathLike | Source) -> Source:
    """`FILE` or `FILE:WEIGHT` (the last colon splits, so paths may hold colons); a Path is a
    file of weight 1."""
    if isinstance(spec, Source):
        source = spec
    elif isinstance(spec, os.PathLike):
        source = Source(Path(spec), 1.0)
    else:
        path, colon, weight = spec.rpartition(":")
        if not colon or "/" in weight or "\\" in weight:
            path, weight = spec, "1"
        try:
            source = Source(Path(path), float(weight))
        except ValueError:
            raise LlavaEdgeError(
                f"{spec!r}: weight {weight!r} is not a number; write FILE:WEIGHT, e.g. a.json:0.5"
            ) from None
    if not math.isfinite(source.weight) or source.weight < 0:
        raise LlavaEdgeError(f"{source.path}: weight {source.weight} must be a number 0 or more")
    return source


def mix(
    sources: list[str | os.PathLike | Source],
    out: str | Path,
    seed: int = 0,
    progress: bool = True,
) -> MixResult:
    """Write the weighted, shuffled mix of `sources` to `out`; see the module docstring.
    progress: bars for the check of each source and the writing, on a terminal only (a minute
    or so for LLaVA-1.5's 665k-sample mix)."""
    out = Path(out)
    if not sources:
        raise LlavaEdgeError("nothing to mix: give at least one FILE[:WEIGHT]")
    parsed = [parse_source(s) for s in sources]
    if out.is_dir():
        raise LlavaEdgeError(f"--out {out} is a directory; name the JSON file to write")
    if any(s.path.resolve() == out.resolve() for s in parsed):
        raise LlavaEdgeError(f"--out {out} is one of the sources; write the mix elsewhere")
    rng = random.Random(seed)
    files, stats, picks = [], [], []
    for source in parsed:
        shown = progress and sys.stderr.isatty()
        file = SampleFile(source.path, keep=_checker(source.path), progress=shown)
        files.append(file)
        stats.append(SourceStats(source, available=len(file)))
    _check_size(stats)
    for number, (source, file) in enumerate(zip(parsed, files, strict=True)):
        copies, fraction = divmod(source.weight, 1.0)
        chosen = list(range(len(file))) * int(copies)
        chosen += sorted(rng.sample(range(len(file)), round(fraction * len(file))))
        picks += [(number, index) for index in chosen]
    if not picks:
        raise LlavaEdgeError(
            "the mix is empty: "
            + ", ".join(f"{s.source.path}:{s.source.weight:g} of {s.available}" for s in stats)
            + " samples take none (a fraction of a file takes the nearest whole number)"
        )
    rng.shuffle(picks)

    def samples():
        for number, index in picks:
            record = files[number].record(index)
            sample = parse_sample(record, int(files[number].positions[index]))
            row = stats[number]
            row.samples += 1
            if sample.image is not None:
                row.images.add(sample.image)
            row.turns += len(sample.turns)
            row.answer_words += sum(len(answer.split()) for _, answer in sample.turns)
            yield record

    write_samples(
        out, terminal_bar(samples(), progress, total=len(picks), desc="writing", unit=" samples")
    )
    return MixResult(out, seed, stats)


# The mix is drawn in memory, a few dozen bytes a sample: 15 times LLaVA-1.5's 665k-sample mix
# is room enough, and a mistyped weight (a.json:10000) is refused before it fills the memory.
MAX_MIX_SAMPLES = 10_000_000


def _check_size(stats: list[SourceStats]) -> None:
    total = sum(math.floor(s.source.weight) * s.available for s in stats)
    if total > MAX_MIX_SAMPLES:
        weights = ", ".join(f"{s.source.path}:{s.source.weight:g} of {s.available}" for s in stats)
        raise LlavaEdgeError(
            f"the mix would hold over {MAX_MIX_SAMPLES:,} samples ({weights}); lower the weights"
        )


def _checker(path: Path):
    def keep(position: int, record: object) -> bool:
        try:
            parse_sample(record, position)
        except BadSample as e:
            raise LlavaEdgeError(f"{path}: {e}; fix or remove it before mixing") from None
        return True

    return keep


def format_table(result: MixResult) -> str:
    """Samples, images, turns and mean answer length per source, and for the whole mix."""
    header = ("source", "weight", "samples", "in file", "images", "turns", "words/answer")
    rows = [
        (
            str(s.source.path),
            f"{s.source.weight:g}",
            str(s.samples),
            str(s.available),
            str(len(s.images)),
            str(s.turns),
            f"{s.mean_answer_words:.1f}",
        )
        for s in result.sources
    ]
    turns = sum(s.turns for s in result.sources)
    words = sum(s.answer_words for s in result.sources)
    rows.append(
        (
            "mix",
            "",
            str(sum(s.samples for s in result.sources)),
            str(sum(s.available for s in result.sources)),
            str(len(set().union(*(s.images for s in result.sources)))),
            str(turns),
            f"{words / turns if turns else 0:.1f}",
        )
    )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.insert(len(lines) - 1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + f"\nwrote {result.out} (seed {result.seed})"
