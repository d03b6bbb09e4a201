from __future__ import annotations

import json
import re
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest

from aser.pipeline.config import (
    CONFIG_VERSION,
    CalibConfig,
    ConfigError,
    RunConfig,
    WorkersConfig,
    from_dict,
    from_yaml,
    to_dict,
)
from aser.workers.reconstruct import MethodConfig


def test_defaults_round_trip_through_json() -> None:
    cfg = RunConfig(source="s3://a/model", dest="s3://b/out")
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["version"] == CONFIG_VERSION
    assert RunConfig.from_dict(d) == cfg
    assert from_dict(to_dict(cfg)) == cfg
    assert cfg.output_format == "w4a8-marlin"  # DEFAULT_FORMAT: w4a16-pack, Marlin's INT8


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
    assert cfg.method == MethodConfig(method="er", rank=16, act_quant="marlin")
    assert cfg.calib == CalibConfig(num_samples=4)
    assert (cfg.propagate, cfg.workers.num_workers, cfg.source) == ("quantized", 2, "file:///src")
    recipe.write_text("method:\n  rank: -2\n")
    with pytest.raises(ConfigError, match=r"method\.rank"):
        from_yaml(str(recipe), source="a", dest="b")
    recipe.write_text("method: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        from_yaml(str(recipe), source="a", dest="b")


# ---------------------------------------------------------------- exact messages, every field

_GROUP_MSG = (
    "method.group_size (--group-size) 128: group quantization is not supported by `aser quantize`, whose "
    "checkpoints use per-output-channel INT4 scales; leave it unset (per-channel is the default), or measure "
    "groups in memory with `aser simulate --group-size`"
)
_A_BITS_MSG = "method.a_bits must be 8 (INT8 activations, W4A8) or 16 (no activation quantization, W4A16), got "


def _raises_exactly(message: str) -> AbstractContextManager[Any]:
    return pytest.raises(ConfigError, match="^" + re.escape(message) + "$")


def _run(**kw: Any) -> RunConfig:
    return RunConfig(**{"source": "a", "dest": "b", **kw})


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: CalibConfig(source=""), "calib.source must be a non-empty URL or path, got ''"),
        (lambda: CalibConfig(num_samples=0), "calib.num_samples must be >= 1, got 0"),
        (lambda: CalibConfig(seq_len=0), "calib.seq_len must be >= 1, got 0"),
        (lambda: CalibConfig(seed=-1), "calib.seed must be >= 0, got -1"),
        (lambda: WorkersConfig(num_workers=True), "workers.num_workers must be an integer, got True"),
        (lambda: WorkersConfig(num_cpus_per_worker=-0.5), "workers.num_cpus_per_worker must be >= 0.0, got -0.5"),
        (lambda: WorkersConfig(num_cpus_per_worker="2"), "workers.num_cpus_per_worker must be a number, got '2'"),  # type: ignore[arg-type]
        (lambda: WorkersConfig(num_gpus_per_worker=-1), "workers.num_gpus_per_worker must be >= 0.0, got -1"),
        (lambda: WorkersConfig(num_gpus_per_worker=True), "workers.num_gpus_per_worker must be a number, got True"),
        (lambda: _run(source=None), "source must be a non-empty URL or path, got None"),
        (lambda: _run(dest=None), "dest must be a non-empty URL or path, got None"),
        (lambda: _run(dest="  "), "dest must be a non-empty URL or path, got '  '"),
        # Trailing slashes do not make a different destination (X: a name rstrip must not eat).
        (lambda: _run(source="s3://b/X/", dest="s3://b/X"), "dest must differ from source, both are 's3://b/X/'"),
        (lambda: _run(dest="s3://b/X/", source="s3://b/X"), "dest must differ from source, both are 's3://b/X'"),
        (lambda: _run(calib={"seed": 1}), "calib must be a CalibConfig, got dict"),
        (lambda: _run(workers={"num_workers": 2}), "workers must be a WorkersConfig, got dict"),
        (lambda: _run(method={"rank": 2}), "method must be a MethodConfig, got dict"),
        (lambda: _run(propagate="int8"), "propagate must be one of ('fp', 'quantized'), got 'int8'"),
        (lambda: _run(ray_address=""), "ray_address must be a non-empty URL or path, got ''"),
        (lambda: _run(shard_size_bytes=0), "shard_size_bytes must be >= 1, got 0"),
        (lambda: _run(method=MethodConfig(group_size=128)), _GROUP_MSG),
        (lambda: _run(method=MethodConfig(w_bits=3)), "method.w_bits must be 4 for export (w4a8 / w4a16), got 3"),
        (lambda: _run(method=MethodConfig(a_bits=6)), _A_BITS_MSG + "6"),
    ],
)
def test_bad_value_message_is_exact(build: Callable[[], object], message: str) -> None:
    with _raises_exactly(message):
        build()


def test_smallest_valid_values_are_accepted() -> None:
    cfg = _run(calib=CalibConfig(source="s3://c/t.txt", num_samples=1, seq_len=1, seed=0),
               workers=WorkersConfig(num_workers=1, num_cpus_per_worker=0.5, num_gpus_per_worker=0),
               ray_address="ray://head:10001", shard_size_bytes=1)
    assert (cfg.calib.num_samples, cfg.workers.num_cpus_per_worker, cfg.shard_size_bytes) == (1, 0.5, 1)


_FIELDS = "calib, dest, method, propagate, ray_address, save_state_every, shard_size_bytes, source, workers"


@pytest.mark.parametrize(
    "data, message",
    [
        ([1], "config must be a mapping, got list"),
        ({"version": 2, "source": "a", "dest": "b"},
         "config version 2 is not supported by this aser (expects 1); rerun with the aser version that wrote it"),
        ({"source": "a", "dest": "b", "foo": 1}, f"unknown config field foo (known: {_FIELDS})"),
        ({"source": "a", "dest": "b", "calib": 3}, "calib must be a mapping, got 3"),
        ({"source": "a", "dest": "b", "workers": [1]}, "workers must be a mapping, got [1]"),
        ({"source": "a", "dest": "b", "method": "er"}, "method must be a mapping, got 'er'"),
        ({"source": "a", "dest": "b", "workers": {"n": 1}},
         "unknown config field workers.n (known: num_cpus_per_worker, num_gpus_per_worker, num_workers, reconstruct_cpus, reconstruct_gpus)"),
        ({"source": "a", "dest": "b", "method": {"rnak": 3}}, "method: unknown method field(s): rnak"),
        ({"source": "a", "dest": "b", "method": {"rank": -1}}, "method.rank must be >= 0, got -1"),
        ({"source": "a", "dest": "b", "method": {"alpha_grid": 5}}, "method: 'int' object is not iterable"),
        ({"source": "a", "dest": "b", "method": {"a_bits": 0}}, _A_BITS_MSG + "0"),
        ({"source": "a", "dest": "b", "method": {"a_bits": True}}, _A_BITS_MSG + "True"),
        ({"source": "a"}, "dest is required"),
        ({"dest": "b"}, "source is required"),
    ],
)
def test_from_dict_message_is_exact(data: Any, message: str) -> None:
    with _raises_exactly(message):
        RunConfig.from_dict(data)


@pytest.mark.parametrize("a_bits, stored, fmt", [(16, None, "w4a16"), (None, None, "w4a16"), (8, 8, "w4a8-marlin")])
def test_recipe_a_bits(a_bits: int | None, stored: int | None, fmt: str) -> None:
    """Recipes spell weight-only as a_bits 16; manifests store it as None; both read back."""
    cfg = RunConfig.from_dict({"source": "a", "dest": "b", "method": {"a_bits": a_bits}})
    assert (cfg.method.a_bits, cfg.output_format) == (stored, fmt)


def test_method_value_errors_are_config_errors_naming_method(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ValueError from the method's own checks that does not name its field gets "method: "."""
    def validate(self: MethodConfig) -> None:
        raise ValueError("boom")

    monkeypatch.setattr(MethodConfig, "validate", validate)
    with _raises_exactly("method: boom"):
        _run()
    with _raises_exactly("method: boom"):
        RunConfig.from_dict({"source": "a", "dest": "b", "method": {}})


def test_empty_recipe_is_the_defaults_and_a_list_is_refused(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("")
    assert from_yaml(str(recipe), source="a", dest="b") == _run()
    recipe.write_text("- 1\n")
    with _raises_exactly(f"recipe {recipe} must be a mapping at the top level"):
        from_yaml(str(recipe), source="a", dest="b")
