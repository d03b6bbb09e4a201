"""Calibration tokens: from text, or sampled from the model itself when no text is given."""

import shutil

import pytest
import torch
import transformers

from aser.pipeline.calib_tokens import calibration_tokens
from aser.pipeline.config import CalibConfig, RunConfig
from aser.pipeline.data import DataError


def _cfg(source, calib):
    return RunConfig(source=source, dest="memory://unused", calib=calib)


def test_self_generated_calibration_is_deterministic_and_says_so(stories_dir):
    cfg = _cfg(str(stories_dir), CalibConfig(source=None, num_samples=3, seq_len=24, seed=5))
    a, how = calibration_tokens(cfg, str(stories_dir), 1 << 20)
    b, _ = calibration_tokens(cfg, str(stories_dir), 1 << 20)
    assert a.shape == (3, 24) and a.dtype == torch.int64
    assert torch.equal(a, b)  # resume fingerprints these tokens: they must not change
    assert (a[:, 0] == 1).all() and "self-generated" in how
    assert len(set(a[:, 1:].flatten().tolist())) > 10  # real samples, not one repeated token


def test_the_model_is_sampled_in_a_child_process_not_the_driver(stories_dir, monkeypatch):
    # The driver holds metadata only (a 2 GiB checkpoint loaded for sampling would triple its
    # memory): loading the model in this process fails the test.
    def loaded_here(*args, **kwargs):
        raise AssertionError("the model was loaded in the driver")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", loaded_here)
    cfg = _cfg(str(stories_dir), CalibConfig(source=None, num_samples=2, seq_len=16, seed=5))
    a, _ = calibration_tokens(cfg, str(stories_dir), 1 << 20)
    assert a.shape == (2, 16)


def test_sampling_that_fails_in_the_child_is_one_clear_error(stories_dir, tmp_path):
    src = tmp_path / "no-weights"
    shutil.copytree(stories_dir, src)
    for f in src.glob("*.safetensors"):
        f.unlink()
    cfg = _cfg(str(src), CalibConfig(source=None, num_samples=2, seq_len=16))
    with pytest.raises(DataError, match=rf"sampling calibration from {src} failed: \w+Error: .*safetensors"):
        calibration_tokens(cfg, str(src), 1 << 20)


def test_remote_source_without_text_is_a_clear_error(stories_dir):
    cfg = _cfg("s3://bucket/model", CalibConfig(source=None))
    with pytest.raises(DataError, match="--calib"):
        calibration_tokens(cfg, "s3://bucket/model", 1 << 20)


def test_text_too_short_names_the_problem(stories_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time.")
    cfg = _cfg(str(stories_dir), CalibConfig(source=str(short), num_samples=2, seq_len=64))
    with pytest.raises(DataError, match="too short"):
        calibration_tokens(cfg, str(stories_dir), 1 << 20)
