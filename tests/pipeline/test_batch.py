"""`aser batch` over S3 (moto on loopback): a watchlist with a complete DEST, a partial one (a
killed run), a new one and a broken source. Outputs are compared byte for byte with the chaos
harness's uninterrupted single run of the same checkpoint and config."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from aser.checkpoint import storage
from aser.pipeline import batch, manifest
from chaos_harness import RUN_TIMEOUT_S, dest_files, finish, spawn, start, upload

pytestmark = pytest.mark.timeout(900)


def _recipe(setup: Any) -> dict[str, Any]:
    """The recipe equal to the chaos harness's flags (Setup.command)."""
    return {"calib": {"source": setup.calib, "num_samples": setup.num_samples, "seq_len": setup.seq_len},
            "method": {"rank": setup.rank}}


def _batch(setup: Any, watchlist: Path) -> tuple[int, dict[str, Any], str]:
    run = spawn(setup, [sys.executable, "-m", "aser.pipeline.cli", "batch", str(watchlist), "--json", "--no-progress"])
    rc, _ = finish(run, 2 * RUN_TIMEOUT_S)
    out = run.stderr()
    report = json.loads(out.strip().splitlines()[-1])
    return rc, report, out


@pytest.mark.cluster  # four real runs (~2.5 min): run by .ci/run with -m cluster
def test_batch_skips_resumes_starts_and_reports_the_broken_one(
        reference: tuple[Any, dict[str, bytes], float], stories_dir: Path, tmp_path: Path) -> None:
    setup, ref, _ = reference
    models, quantized = "s3://aser-chaos/batch/models", "s3://aser-chaos/batch/quantized"
    for name in ("partial", "new"):
        upload(stories_dir, f"{models}/org/{name}")
    upload(stories_dir, f"{models}/org/broken")
    config = json.loads((stories_dir / "config.json").read_text())
    del config["hidden_size"]
    storage.write_text_atomic(f"{models}/org/broken/config.json", json.dumps(config))
    partial_setup = dataclasses.replace(setup, source=f"{models}/org/partial")
    killed = start(partial_setup, f"{quantized}/org/partial", extra_env={"ASER_TEST_KILL_AFTER": "layer:1"})
    assert finish(killed, RUN_TIMEOUT_S)[0] == -9
    assert not manifest.is_finished(f"{quantized}/org/partial") and manifest.load_manifest(f"{quantized}/org/partial")

    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "stories.yaml").write_text(yaml.safe_dump(_recipe(setup)))
    watchlist = tmp_path / "watchlist.yaml"
    watchlist.write_text(yaml.safe_dump({
        "jobs": [{"source": setup.source, "dest": "s3://aser-chaos/ref", "recipe": "recipes/stories.yaml"}],
        "prefixes": [{"source_prefix": models + "/", "dest_prefix": quantized + "/", "recipe": "recipes/stories.yaml"}],
    }))

    rc, report, out = _batch(setup, watchlist)
    assert rc == 1, out[-3000:]
    got = {o["dest"].rsplit("/", 1)[-1]: (o["before"], o["status"]) for o in report["jobs"]}
    assert got == {"ref": ("complete", "skipped"), "broken": ("new", "failed"),
                   "new": ("new", "completed"), "partial": ("partial", "completed")}, [(o["dest"], o["error"]) for o in report["jobs"]]
    broken = next(o for o in report["jobs"] if o["dest"].endswith("broken"))
    assert broken["error"].startswith("PlanError: ") and "config.json implies" in broken["error"], broken
    assert "Traceback" not in out
    for name in ("partial", "new"):
        assert dest_files(f"{quantized}/org/{name}") == ref, name
    assert dest_files("s3://aser-chaos/ref") == ref
    assert not storage.exists(f"{quantized}/org/broken/{manifest.MANIFEST_NAME}")
    assert "status" in out and "1 failed" in out  # the table on stderr

    rc, report, out = _batch(setup, watchlist)
    assert rc == 1, out[-3000:]
    statuses = {o["dest"].rsplit("/", 1)[-1]: o["status"] for o in report["jobs"]}
    assert statuses == {"ref": "skipped", "partial": "skipped", "new": "skipped", "broken": "failed"}, statuses
    assert all(o["seconds"] < 5 for o in report["jobs"]), report
    assert "nothing to do" not in out  # decided by batch itself: no driver, no calibration, no Ray
    print(f"second batch run: {report['wall_s']:.1f} s for {len(report['jobs'])} jobs")


def test_complete_dest_of_a_changed_source_is_failed_not_skipped(tmp_path: Path, stories_dir: Path) -> None:
    """A complete DEST whose source was replaced since (same names, other values): reported."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(stories_dir, src)
    job = batch.Job(str(src), str(tmp_path / "out"), None, "jobs[0]")
    config = batch._config(job)
    from aser.pipeline.plan import make_plan

    mf = manifest.new_manifest(config, make_plan(config).fingerprint, None)
    storage.write_text_atomic(storage.join(job.dest, "model.safetensors.index.json"), "{}")
    mf.final_files = {"model.safetensors.index.json": manifest.FileRecord(*storage.sha256_and_size(
        storage.join(job.dest, "model.safetensors.index.json")))}
    manifest.save_manifest(job.dest, mf)
    assert batch._state(config) == batch.BEFORE_COMPLETE
    data = bytearray((src / "model.safetensors").read_bytes())
    data[-3] ^= 1
    (src / "model.safetensors").write_bytes(bytes(data))
    out = batch.run_job(job, show_progress=False, wait=False)
    assert out.status == batch.FAILED and "the source changed" in out.error, out


def test_watchlist_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from aser.pipeline import cli

    bad = tmp_path / "w.yaml"
    bad.write_text("jobs:\n  - {source: a}\n")
    assert cli.main(["batch", str(bad)]) == 2
    assert "jobs[0]: missing dest" in capsys.readouterr().err
    bad.write_text("job: []\n")
    assert cli.main(["batch", str(bad)]) == 2
    assert cli.main(["batch", str(tmp_path / "absent.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_prefix_discovery_finds_checkpoints_not_outputs(tmp_path: Path) -> None:
    root = tmp_path / "models"
    for rel in ("a", "org/b", "org/c/too/deep"):
        (root / rel).mkdir(parents=True)
        (root / rel / "config.json").write_text("{}")
    (root / "org" / "out").mkdir()
    (root / "org" / "out" / "config.json").write_text("{}")
    (root / "org" / "out" / manifest.MANIFEST_NAME).write_text("{}")
    (root / "notes").mkdir()
    (root / "notes" / "x.txt").write_text("")
    assert batch.checkpoint_dirs(str(root), max_depth=2) == ["a", "org/b"]
    assert batch.checkpoint_dirs(str(root), max_depth=4) == ["a", "org/b", "org/c/too/deep"]
    wl = tmp_path / "w.yaml"
    jobs, errors = batch.expand(str(wl), {"prefixes": [
        {"source_prefix": str(root), "dest_prefix": str(root / "org" / "q"), "recipe": "r.yaml"}]})
    assert [(j.source, j.dest, j.recipe) for j in jobs] == [
        (f"{root}/a", f"{root}/org/q/a", f"{tmp_path}/r.yaml"),
        (f"{root}/org/b", f"{root}/org/q/org/b", f"{tmp_path}/r.yaml")]
    assert errors == []
