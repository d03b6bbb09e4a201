"""`aser quantize` flags and recipes build the RunConfig (no Ray, no work)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from aser.pipeline.config import ConfigError
from aser.pipeline.quantize_cmd import DEFAULT_DEST, DEFAULT_SOURCE, add_quantize_parser, config_from_args


def _config(argv: list[str]):
    p = argparse.ArgumentParser()
    add_quantize_parser(p.add_subparsers(dest="cmd"))
    a = p.parse_args(["quantize", *argv])
    return config_from_args(a, a._quantize_parser)


def test_defaults_are_the_embedded_model() -> None:
    c = _config([])
    assert (c.source, c.dest) == (DEFAULT_SOURCE, DEFAULT_DEST)
    assert c.method.method == "aser" and c.propagate == "fp" and c.workers.num_workers == 1


def test_flags_override_the_recipe_and_the_recipe_overrides_defaults(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: {method: gptq+aser, rank: 64}\ncalib: {num_samples: 16, source: t.txt}\n"
                      "propagate: quantized\nworkers: {num_workers: 2}\n")
    c = _config(["s3://b/src", "s3://b/dst", "--recipe", str(recipe), "--rank", "16", "--workers", "3"])
    assert (c.source, c.dest) == ("s3://b/src", "s3://b/dst")
    assert (c.method.method, c.method.rank) == ("gptq+aser", 16)
    assert (c.calib.num_samples, c.calib.source, c.calib.seq_len) == (16, "t.txt", 512)
    assert (c.propagate, c.workers.num_workers) == ("quantized", 3)


def test_bad_values_name_the_field() -> None:
    with pytest.raises(ConfigError, match="calib.num_samples"):
        _config(["a", "b", "--num-samples", "0"])
    with pytest.raises(ConfigError, match="dest must differ from source"):
        _config(["a", "a"])
