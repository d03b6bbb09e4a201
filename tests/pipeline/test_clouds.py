"""`aser quantize` from a bucket to a bucket on each of the three clouds, killed and resumed: S3
(moto), Google Cloud Storage (fake-gcs-server) and Azure Blob (Azurite), each an emulator of the
real protocol on 127.0.0.1, reached through its fsspec package (s3fs, gcsfs, adlfs) and the
cloud's usual environment variables. Source checkpoint, calibration text and DEST all live in
the store. The run is SIGKILLed after its second layer and run again; the output must equal,
byte for byte, the uninterrupted S3 run of the same checkpoint and settings (the chaos harness's
reference), and no credential may appear in what the runs print or write."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from aser.checkpoint import storage
from aser.pipeline import lease, manifest
from chaos_harness import RUN_TIMEOUT_S, Setup, dest_files, done_stages, finish, start, upload
from cloud_emulators import AZURITE_KEY, azure_env, gcs_env

pytestmark = [pytest.mark.timeout(900), pytest.mark.cluster]


def _cloud_env(bucket: str) -> dict[str, str]:
    """What the run's processes (the driver and the local Ray it starts) need to reach the store:
    the variables the ``bucket`` fixture set, as a user would export them."""
    names = {"s3": ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"),
             "gs": tuple(gcs_env("").keys()), "az": tuple(azure_env("").keys())}[bucket.split("://")[0]]
    return {n: os.environ[n] for n in names}


def test_quantize_killed_and_resumed_in_each_cloud(bucket: str, reference: tuple[Any, dict[str, bytes], float],
                                                   stories_dir: Path) -> None:
    ref_setup, ref, _ = reference
    src, dest = storage.join(bucket, "models", "stories260K"), storage.join(bucket, "quantized", "stories260K")
    upload(stories_dir, src)
    calib = storage.join(bucket, "calib", "sample.txt")
    storage.write_bytes_atomic(calib, Path(ref_setup.calib).read_bytes())
    env = _cloud_env(bucket)
    setup = Setup(ref_setup.endpoint, src, calib, ref_setup.num_samples, ref_setup.seq_len, ref_setup.rank,
                  env={**ref_setup.env, **env})

    killed = start(setup, dest, extra_env={"ASER_TEST_KILL_AFTER": "layer:1"})
    rc, _ = finish(killed, RUN_TIMEOUT_S)
    assert rc == -9, killed.stderr()[-3000:]  # SIGKILL, as planned
    mf = manifest.load_manifest(dest)
    assert mf is not None and not manifest.is_complete(mf, dest) and done_stages(dest) >= 2

    resumed = start(setup, dest)
    rc, wall = finish(resumed, RUN_TIMEOUT_S)
    out = resumed.stderr()
    assert rc == 0, out[-3000:]
    assert f"resuming {dest}: " in out, out[-3000:]  # it says it resumes rather than restarts
    done = manifest.load_manifest(dest)
    assert done is not None
    starts = done.summary["starts"]
    assert len(starts) == 2 and starts[1]["start"] >= 2, starts  # the finished layers not redone
    print(f"{bucket.split('://')[0]}: resumed run {wall:.1f} s")
    assert dest_files(dest) == ref
    assert lease.current(dest) is None  # released
    # The Azure connection string and its account key (AWS's "testing" is too common a word).
    secrets = [v for k, v in env.items() if ("KEY" in k or "CONNECTION" in k) and len(v) > 12] + [AZURITE_KEY]
    written = storage.read_text(storage.join(dest, "aser_manifest.json"))
    for text in (killed.stderr(), out, written):
        assert not any(s in text for s in secrets)
