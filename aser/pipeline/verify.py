"""``aser verify DEST``: re-read a destination and check every file against its manifest.

The manifest records the sha256 and size of every file the run wrote: the stage shards in its
layer records, the files finalize wrote (config, copied tokenizer files, adapter, index) in
``final_files``. Verification reads each of them once, in ``storage.DIGEST_CHUNK`` pieces,
several files at a time (object stores serve parallel reads), and checks that the index names
only recorded shards and every recorded shard is in the index. Adapter parts under
``.aser_state/`` are not checked: finalize merges them into the adapter, which is, and the run
then clears them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from aser.checkpoint import storage
from aser.checkpoint.safetensors_io import INDEX_NAME
from aser.checkpoint.state import STATE_DIR, FileRecord
from aser.pipeline import manifest

# Files hashed at once: enough to keep an object store's connections busy, few enough that each
# holds one chunk (``storage.DIGEST_CHUNK``) in memory.
PARALLEL_READS = 8


class VerifyError(ValueError):
    """DEST cannot be verified at all (no manifest, an unreadable one)."""


@dataclass(frozen=True)
class Finding:
    name: str  # relative to DEST
    problem: str  # missing | size | sha256 | unrecorded | not-in-index | unreadable | incomplete
    detail: str

    def line(self) -> str:
        return f"{self.problem.upper()} {self.name}: {self.detail}"


@dataclass
class VerifyReport:
    dest: str
    files_checked: int = 0
    bytes_checked: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_dict(self) -> dict[str, object]:
        return {"dest": storage.redact(self.dest), "ok": self.ok, "files_checked": self.files_checked,
                "bytes_checked": self.bytes_checked,
                "findings": [{"name": f.name, "problem": f.problem, "detail": f.detail} for f in self.findings]}


def recorded_files(mf: manifest.Manifest) -> dict[str, FileRecord]:
    """Every file a finished run leaves in DEST, by name, as the manifest records it."""
    files: dict[str, FileRecord] = {}
    for rec in mf.layers.values():
        if rec.status != manifest.LAYER_DONE:
            continue
        files.update({n: f for n, f in rec.files.items() if not n.startswith(f"{STATE_DIR}/")})
    files.update(mf.final_files)
    return files


def _check_file(dest: str, name: str, rec: FileRecord) -> tuple[Finding | None, int]:
    try:
        sha, size = storage.sha256_and_size(storage.join(dest, name))
    except FileNotFoundError:
        return Finding(name, "missing", f"recorded ({rec.size_bytes} bytes) but absent"), 0
    except OSError as e:
        return Finding(name, "unreadable", f"{type(e).__name__}: {e}"), 0
    if size != rec.size_bytes:
        return Finding(name, "size", f"{size} bytes, recorded {rec.size_bytes}"), size
    if sha != rec.sha256:
        return Finding(name, "sha256", f"{sha}, recorded {rec.sha256}"), size
    return None, size


def _index_findings(dest: str, files: dict[str, FileRecord]) -> list[Finding]:
    """The index must name exactly the recorded stage shards (read only if its own bytes matched)."""
    try:
        weight_map = json.loads(storage.read_text(storage.join(dest, INDEX_NAME)))["weight_map"]
        named = set(weight_map.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return [Finding(INDEX_NAME, "unreadable", f"{type(e).__name__}: {e}")]
    out = [Finding(n, "unrecorded", f"named by {INDEX_NAME} but not recorded in the manifest")
           for n in sorted(named - set(files))]
    shards = {n for n in files if n.endswith(".safetensors") and "/" not in n}
    out += [Finding(n, "not-in-index", f"recorded shard that {INDEX_NAME} does not name")
            for n in sorted(shards - named)]
    return out


def check_files(dest: str, files: dict[str, FileRecord], on_file: Callable[[str, int], None] | None = None
                ) -> tuple[list[Finding], int]:
    """Each of ``files`` (name under DEST -> record) re-read and compared with its record,
    ``PARALLEL_READS`` at a time. Returns the findings (in name order) and the bytes read."""
    names = sorted(files)
    findings: list[Finding] = []
    nbytes_total = 0
    with ThreadPoolExecutor(max_workers=max(1, min(PARALLEL_READS, len(names)))) as pool:
        for name, (finding, nbytes) in zip(names, pool.map(lambda n: _check_file(dest, n, files[n]), names)):
            nbytes_total += nbytes
            if finding is not None:
                findings.append(finding)
            if on_file is not None:
                on_file(name, nbytes)
    return findings, nbytes_total


def damaged_layers(mf: manifest.Manifest, dest: str) -> dict[int, list[Finding]]:
    """Stages recorded done whose files (adapter parts included) are missing or differ from
    their records: what a resume must redo and finalize must not index."""
    owner = {name: idx for idx, rec in mf.layers.items() if rec.status == manifest.LAYER_DONE for name in rec.files}
    files = {name: mf.layers[idx].files[name] for name, idx in owner.items()}
    out: dict[int, list[Finding]] = {}
    for f in check_files(dest, files)[0]:
        out.setdefault(owner[f.name], []).append(f)
    return out


def verify(dest: str, on_file: Callable[[str, int], None] | None = None,
           on_total: Callable[[int], None] | None = None) -> VerifyReport:
    """Check DEST against its manifest. on_total(bytes): called once with the bytes about to be
    read (for a progress bar); on_file(name, bytes): as each file is done.

    Raises VerifyError when there is nothing to check against (no manifest, a corrupt one)."""
    try:
        mf = manifest.load_manifest(dest)
    except manifest.ManifestError as e:
        raise VerifyError(f"{storage.redact(dest)}: {e}") from e
    except OSError as e:
        raise VerifyError(f"cannot read {storage.redact(dest)}: {e}") from e
    if mf is None:
        raise VerifyError(f"{storage.redact(dest)} has no {manifest.MANIFEST_NAME}: not written by aser quantize")
    report = VerifyReport(dest)
    if not mf.final_files:
        report.findings.append(Finding(manifest.MANIFEST_NAME, "incomplete",
                                       "the run has not finished; rerun the same `aser quantize` command to complete it"))
    files = recorded_files(mf)
    if on_total is not None:
        on_total(sum(f.size_bytes for f in files.values()))
    findings, report.bytes_checked = check_files(dest, files, on_file)
    report.files_checked = len(files)
    report.findings += findings
    if INDEX_NAME in files and not any(f.name == INDEX_NAME for f in findings):
        report.findings += _index_findings(dest, files)
    return report

