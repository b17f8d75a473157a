"""The measuring commands on the tiny model, as a user deciding what to deploy runs them:
`bench`'s smallest workloads and its baseline, and `eval`'s answers that cannot match."""

from __future__ import annotations

from pathlib import Path

from llava_edge.cli import main as cli


def _bench(model: Path, *extra: str) -> list[str]:
    return ["bench", str(model), "--runs", "1", "--question-tokens", "4", *extra]


def test_bench_one_new_token_is_refused_in_one_line(tiny_model_dir, capsys):
    # decode speed needs two new tokens; one used to end in a KeyError traceback
    assert cli(_bench(tiny_model_dir, "--new-tokens", "1")) == 1
    err = capsys.readouterr().err
    assert "--new-tokens must be at least 2" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
