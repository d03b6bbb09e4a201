"""`aser quantize` flags and recipes build the RunConfig (no Ray, no work)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from aser.pipeline import cli
from aser.pipeline.config import CalibConfig, ConfigError, RunConfig
from aser.pipeline.quantize_cmd import DEFAULT_DEST, DEFAULT_SOURCE, FIRST_RUN_CALIB, config_from_args
from aser.workers.reconstruct import MethodConfig


def _parse(argv: list[str]) -> argparse.Namespace:
    # The real `aser` parser, so these tests see the flags users type.
    return cli.build_parser().parse_args(argv)


def _config(argv: list[str]) -> RunConfig:
    return config_from_args(_parse(["quantize", *argv]))


def _recipe(tmp_path: Path, text: str) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_are_the_embedded_model_and_the_dataclass_defaults() -> None:
    # No flag and no recipe: the README's first command. Every value is RunConfig's own default
    # (defaults live there only) but the first run's smaller self-sampled calibration.
    assert _config([]) == RunConfig(source=DEFAULT_SOURCE, dest=DEFAULT_DEST, calib=CalibConfig(**FIRST_RUN_CALIB))
    # Any source or calibration setting given: the dataclass defaults, calibration included.
    assert _config([DEFAULT_SOURCE]) == RunConfig(source=DEFAULT_SOURCE, dest=DEFAULT_DEST)
    assert _config(["--num-samples", "128"]).calib == CalibConfig(num_samples=128)
    assert _config(["--calib", "t.txt"]).calib == CalibConfig(source="t.txt")


def test_simulate_method_defaults_are_a_runs_defaults() -> None:
    a = _parse(["simulate", "--eval", "e.txt"])
    assert cli.method_from_args(a) == RunConfig(source="s", dest="d").method
    assert RunConfig(source="s", dest="d").method.act_quant == "marlin"  # config.DEFAULT_FORMAT's


def test_flags_override_the_recipe_and_the_recipe_overrides_defaults(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, "method: {method: gptq+aser, rank: 64}\ncalib: {num_samples: 16, source: t.txt}\n"
                               "propagate: quantized\nworkers: {num_workers: 2}\n")
    c = _config(["s3://b/src", "s3://b/dst", "--recipe", recipe, "--rank", "16", "--workers", "3"])
    assert (c.source, c.dest) == ("s3://b/src", "s3://b/dst")
    assert (c.method.method, c.method.rank) == ("gptq+aser", 16)
    assert (c.calib.num_samples, c.calib.source, c.calib.seq_len) == (16, "t.txt", 512)
    assert (c.propagate, c.workers.num_workers) == ("quantized", 3)


def test_flags_equal_to_the_default_still_override_the_recipe(tmp_path: Path) -> None:
    # Each flag below equals its default; given, it must still beat the recipe's value.
    recipe = _recipe(tmp_path, "method: {rank: 64, reserve_rank: true}\npropagate: quantized\n"
                               "workers: {num_workers: 4}\nsource: s3://b/src\ndest: s3://b/dst\n")
    c = _config(["--recipe", recipe, "--rank", "32", "--workers", "1", "--propagate", "fp"])
    assert (c.method.rank, c.workers.num_workers, c.propagate) == (32, 1, "fp")
    assert (c.source, c.dest, c.method.reserve_rank) == ("s3://b/src", "s3://b/dst", True)
    assert _config(["--recipe", recipe, "--no-reserve-rank"]).method.reserve_rank is False


def test_base_outliers_from_the_flag_or_the_recipe(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, "method: {base_outliers: full}\nsource: s3://b/src\ndest: s3://b/dst\n")
    assert _config(["--recipe", recipe]).method.base_outliers == "full"
    assert _config(["--recipe", recipe, "--base-outliers", "clipped"]).method.base_outliers == "clipped"
    with pytest.raises(ConfigError, match="base_outliers must be one of"):
        _config(["--recipe", _recipe(tmp_path, "method: {base_outliers: half}\nsource: s3://b/src\ndest: s3://b/dst\n")])


def test_format_picks_the_layout_and_the_activation_quantizer(tmp_path: Path) -> None:
    # The default is the GPU-servable layout (pack-quantized, Marlin's INT8 activations), for the
    # flags, a recipe without `format:` and `aser simulate` alike; --a-bits 16 alone is W4A16.
    assert _config([]).output_format == "w4a8-marlin"
    assert _config(["--a-bits", "16"]).output_format == "w4a16"
    no_format = _recipe(tmp_path, "method: {rank: 8}\nsource: s3://b/src\ndest: s3://b/dst\n")
    assert _config(["--recipe", no_format]).output_format == "w4a8-marlin"
    # A recipe that names its activation quantizer but no format keeps that quantizer.
    named = _recipe(tmp_path, "method: {act_quant: compressed-tensors}\nsource: s3://b/src\ndest: s3://b/dst\n")
    assert _config(["--recipe", named]).output_format == "w4a8"
    assert cli.method_from_args(_parse(["simulate", "--eval", "e.txt"])).act_quant == "marlin"
    # A manifest's config is read as written: one from before `act_quant` existed is compressed-tensors'.
    recorded = _config(["--format", "w4a8-int"]).to_dict()
    del recorded["method"]["act_quant"]
    assert RunConfig.from_dict(recorded).output_format == "w4a8"
    assert RunConfig.from_dict(_config([]).to_dict()).output_format == "w4a8-marlin"
    c = _config(["--format", "w4a16-pack"])
    assert (c.method.act_quant, c.output_format) == ("marlin", "w4a8-marlin")
    c = _config(["--format", "w4a16-pack", "--a-bits", "16"])
    assert (c.method.act_quant, c.output_format) == ("compressed-tensors", "w4a16")
    assert _config(["--format", "w4a8-int"]).output_format == "w4a8"
    with pytest.raises(ConfigError, match="w4a8-int stores INT8 activations"):
        _config(["--format", "w4a8-int", "--a-bits", "16"])
    recipe = _recipe(tmp_path, "format: w4a16-pack\nmethod: {rank: 8}\nsource: s3://b/src\ndest: s3://b/dst\n")
    assert _config(["--recipe", recipe]).output_format == "w4a8-marlin"
    assert _config(["--recipe", recipe, "--format", "w4a8-int"]).output_format == "w4a8"  # the flag wins
    with pytest.raises(ConfigError, match="format must be one of w4a8-int, w4a16-pack"):
        _config(["--recipe", _recipe(tmp_path, "format: w4a8\nsource: s3://b/src\ndest: s3://b/dst\n")])
    assert cli.method_from_args(_parse(["simulate", "--eval", "e.txt", "--format", "w4a16-pack"])).act_quant == "marlin"
    with pytest.raises(ValueError, match="marlin quantizes activations to INT8 only"):
        MethodConfig(act_quant="marlin", a_bits=None).validate()


def test_recipe_method_must_be_a_mapping_when_flags_add_to_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="method must be a mapping"):
        _config(["--recipe", _recipe(tmp_path, "method: aser\n"), "--rank", "8"])


def test_bad_values_name_the_field() -> None:
    with pytest.raises(ConfigError, match="calib.num_samples"):
        _config(["a", "b", "--num-samples", "0"])
    with pytest.raises(ConfigError, match="dest must differ from source"):
        _config(["a", "a"])


def _main_refuses(argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> str:
    """Run `aser ARGV` with the driver replaced; assert it exits 2 before the driver (storage,
    Ray) is reached, and return stderr."""
    from aser.pipeline import driver

    def _never(*_a: object, **_k: object) -> None:
        raise AssertionError("the driver ran: the refusal came too late")

    monkeypatch.setattr(driver, "run", _never)
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse refusals
        rc = int(e.code or 0)
    assert rc == 2
    return capsys.readouterr().err


def test_group_size_is_refused_up_front(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    err = _main_refuses(["quantize", "s3://b/src", "s3://b/dst", "--group-size", "128"], monkeypatch, capsys)
    assert "--group-size" in err and "per-output-channel" in err, err
    recipe = _recipe(tmp_path, "method: {group_size: 64}\n")
    err = _main_refuses(["quantize", "s3://b/src", "s3://b/dst", "--recipe", recipe], monkeypatch, capsys)
    assert "method.group_size" in err and "per-output-channel" in err, err


def test_simulate_keeps_group_size() -> None:
    # Fake quantization per group is real in simulate (aser.kernels.quant), so the flag stays there.
    assert cli.method_from_args(_parse(["simulate", "--eval", "e", "--group-size", "64"])).group_size == 64


def test_a_bits_16_is_weight_only(tmp_path: Path) -> None:
    c = _config(["--a-bits", "16"])
    assert (c.method.a_bits, c.output_format) == (None, "w4a16")
    assert cli.method_from_args(_parse(["simulate", "--eval", "e", "--a-bits", "16"])).a_bits is None
    c = _config(["--recipe", _recipe(tmp_path, "method: {a_bits: 16}\n")])
    assert (c.method.a_bits, c.output_format) == (None, "w4a16")
    assert _config(["--a-bits", "8"]).output_format == "w4a8-marlin"
    assert _config(["--a-bits", "8", "--format", "w4a8-int"]).output_format == "w4a8"


@pytest.mark.parametrize("value", ["0", "none", "32", "x"])
def test_a_bits_flag_refuses_other_values_naming_the_valid_ones(
    value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _main_refuses(["quantize", "--a-bits", value], monkeypatch, capsys)
    assert "--a-bits" in err and "8" in err and "16" in err, err


@pytest.mark.parametrize("value", [0, 4, 32, "none", True])
def test_a_bits_recipe_refuses_other_values_naming_the_valid_ones(tmp_path: Path, value: object) -> None:
    recipe = _recipe(tmp_path, f"method: {{a_bits: {str(value).lower()}}}\n")
    with pytest.raises(ConfigError, match=r"^method\.a_bits must be 8 .*or 16 "):
        _config(["--recipe", recipe])


def test_weight_only_manifests_still_load() -> None:
    # Manifests store MethodConfig's spelling of weight-only (a_bits: null); a resume reads them.
    cfg = RunConfig(source="a", dest="b", method=MethodConfig(a_bits=None))
    assert RunConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["method"]["a_bits"] is None
