from __future__ import annotations

import json
from pathlib import Path

import pytest

from aser.pipeline.config import (
    CONFIG_VERSION,
    CalibConfig,
    ConfigError,
    RunConfig,
    WorkersConfig,
    from_yaml,
)
from aser.workers.reconstruct import MethodConfig


def test_defaults_round_trip_through_json() -> None:
    cfg = RunConfig(source="s3://a/model", dest="s3://b/out")
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["version"] == CONFIG_VERSION
    assert RunConfig.from_dict(d) == cfg
    assert cfg.output_format == "w4a8"


def test_weight_only_is_w4a16() -> None:
    cfg = RunConfig(source="a", dest="b", method=MethodConfig(a_bits=None))
    assert cfg.output_format == "w4a16"


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: RunConfig(source="a", dest="b", method=MethodConfig(rank=-1)), "method.rank"),
        (lambda: RunConfig(source="a", dest="b", calib=CalibConfig(num_samples=0)), "calib.num_samples"),
        (lambda: RunConfig(source="a", dest="b", workers=WorkersConfig(num_workers=0)), "workers.num_workers"),
        (lambda: RunConfig(source="a", dest="b", propagate="int8"), "propagate"),  # type: ignore[arg-type]
        (lambda: RunConfig(source="a", dest="b", shard_size_bytes=0), "shard_size_bytes"),
        (lambda: RunConfig(source="", dest="b"), "source"),
        (lambda: RunConfig(source="a", dest="a/"), "dest"),
        (lambda: RunConfig(source="a", dest="b", method=MethodConfig(a_bits=6)), "method.a_bits"),
        (lambda: RunConfig(source="a", dest="b", method=MethodConfig(w_bits=3)), "method.w_bits"),
        (lambda: WorkersConfig(num_workers=True), "workers.num_workers"),
    ],
)
def test_bad_values_name_the_field(build, field: str) -> None:
    with pytest.raises(ConfigError) as e:
        build()
    assert str(e.value).startswith(field), str(e.value)


def test_rank_message_is_exact() -> None:
    with pytest.raises(ConfigError, match=r"^method\.rank must be >= 0, got -1$"):
        RunConfig(source="a", dest="b", method=MethodConfig(rank=-1))


def test_from_dict_rejects_unknown_field_and_wrong_version() -> None:
    with pytest.raises(ConfigError, match="calib.num_sample"):
        RunConfig.from_dict({"source": "a", "dest": "b", "calib": {"num_sample": 3}})
    with pytest.raises(ConfigError, match="version"):
        RunConfig.from_dict({"version": CONFIG_VERSION + 1, "source": "a", "dest": "b"})
    with pytest.raises(ConfigError, match="method"):
        RunConfig.from_dict({"source": "a", "dest": "b", "method": {"rnak": 3}})
    with pytest.raises(ConfigError, match="^dest is required"):
        RunConfig.from_dict({"source": "a"})


def test_frozen() -> None:
    cfg = RunConfig(source="a", dest="b")
    with pytest.raises(AttributeError):
        cfg.source = "c"  # type: ignore[misc]


def test_yaml_recipe_partial_with_cli_override(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "method:\n  method: er\n  rank: 16\ncalib:\n  num_samples: 4\npropagate: quantized\n"
        "workers:\n  num_workers: 2\n"
    )
    cfg = from_yaml(str(recipe), source="file:///src", dest="memory://dst")
    assert cfg.method == MethodConfig(method="er", rank=16)
    assert cfg.calib == CalibConfig(num_samples=4)
    assert (cfg.propagate, cfg.workers.num_workers, cfg.source) == ("quantized", 2, "file:///src")
    recipe.write_text("method:\n  rank: -2\n")
    with pytest.raises(ConfigError, match=r"method\.rank"):
        from_yaml(str(recipe), source="a", dest="b")
    recipe.write_text("method: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        from_yaml(str(recipe), source="a", dest="b")
