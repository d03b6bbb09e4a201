"""`aser batch WATCHLIST.yaml`: scheduled compression as one idempotent command.

The watchlist (YAML; a path or URL)::

    jobs:                              # explicit pairs
      - {source: s3://models/a, dest: s3://quantized/a, recipe: recipes/r64.yaml}
    prefixes:                          # every checkpoint directory under source_prefix
      - {source_prefix: s3://models/finetunes/, dest_prefix: s3://quantized/finetunes/,
         recipe: recipes/r64.yaml, max_depth: 2}

A recipe is what ``aser quantize --recipe`` reads; a relative recipe path is relative to the
watchlist's folder. Each job runs exactly as ``aser quantize SOURCE DEST --recipe RECIPE`` would
(same RunConfig, so the same bytes). A checkpoint directory under a prefix is any folder, at most
``max_depth`` levels below it (default 2: ``org/model``), that holds a ``config.json`` and is not
itself an aser output (no ``aser_manifest.json``); it goes to the same relative path under
``dest_prefix``.

For each job, in order: DEST complete (its index written) and made from this source with this
config → skipped, without starting Ray (a complete DEST whose source or config changed since is
reported failed: the old output is not silently kept); DEST started → resumed; absent → started;
DEST's lease held by a live run → busy (left to that run). Any error fails that job only, with
its one-line message, and the next one runs. The summary goes to stderr as a table (and to
stdout as JSON with ``--json``); the exit status is 0 when every job is complete, skipped or
busy, 1 when any failed, 2 when the watchlist itself cannot be read.
"""

from __future__ import annotations

import argparse
import json
import posixpath
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from aser.checkpoint import storage

BEFORE_NEW, BEFORE_PARTIAL, BEFORE_COMPLETE = "new", "partial", "complete"
SKIPPED, COMPLETED, FAILED, BUSY = "skipped", "completed", "failed", "busy"
DEFAULT_MAX_DEPTH = 2


class WatchlistError(ValueError):
    """The watchlist cannot be read or does not have the documented form."""


@dataclass
class Job:
    source: str
    dest: str
    recipe: str | None
    rule: str  # "jobs[I]" or "prefixes[I]": where in the watchlist it came from


@dataclass
class Outcome:
    source: str
    dest: str
    recipe: str | None
    rule: str
    before: str  # new | partial | complete | unknown
    status: str  # skipped | completed | failed | busy
    seconds: float
    error: str | None = None


def _resolve_recipe(recipe: Any, watchlist: str, where: str) -> str | None:
    if recipe is None:
        return None
    if not isinstance(recipe, str) or not recipe:
        raise WatchlistError(f"{where}.recipe must be a path or URL, got {recipe!r}")
    if storage.is_url(recipe) or posixpath.isabs(recipe):
        return recipe
    base = watchlist.rsplit("/", 1)[0] if "/" in watchlist else "."
    return storage.join(base, recipe) if storage.is_url(base) else posixpath.normpath(posixpath.join(base, recipe))


def _fields(entry: Any, where: str, required: tuple[str, ...], optional: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise WatchlistError(f"{where} must be a mapping, got {entry!r}")
    unknown = sorted(set(entry) - set(required) - set(optional))
    missing = [k for k in required if not entry.get(k)]
    if unknown or missing:
        raise WatchlistError(f"{where}: " + "; ".join(
            ([f"unknown field(s) {', '.join(unknown)}"] if unknown else [])
            + ([f"missing {', '.join(missing)}"] if missing else [])))
    return entry


def read_watchlist(url: str) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(storage.read_bytes(url).decode("utf-8"))
    except FileNotFoundError as e:
        raise WatchlistError(f"watchlist {storage.redact(url)} does not exist") from e
    except yaml.YAMLError as e:
        raise WatchlistError(f"watchlist {storage.redact(url)} is not valid YAML: {e}") from e
    if not isinstance(data, dict) or not (set(data) <= {"jobs", "prefixes"}):
        raise WatchlistError(f"watchlist {storage.redact(url)} must be a mapping with `jobs` and/or `prefixes`")
    for key in ("jobs", "prefixes"):
        if not isinstance(data.get(key) or [], list):
            raise WatchlistError(f"watchlist {storage.redact(url)}: `{key}` must be a list")
    return data


def checkpoint_dirs(prefix: str, max_depth: int) -> list[str]:
    """Relative paths (posix, no trailing slash) of the checkpoint directories under ``prefix``."""
    fs, root = storage.resolve(prefix)
    root = root.rstrip("/")
    try:
        found = fs.find(root, maxdepth=max_depth + 1)
    except FileNotFoundError:
        return []
    files = {p[len(root) + 1 :] for p in found if p.startswith(root + "/")}
    dirs = {posixpath.dirname(f) for f in files if posixpath.basename(f) == "config.json"}
    from aser.pipeline.manifest import MANIFEST_NAME

    outputs = {posixpath.dirname(f) for f in files if posixpath.basename(f) == MANIFEST_NAME}
    return sorted(d for d in dirs if d and d not in outputs)


def expand(url: str, data: dict[str, Any]) -> tuple[list[Job], list[Outcome]]:
    """The jobs the watchlist names now (prefixes listed), and a failed outcome for each prefix
    rule that could not be listed."""
    jobs: list[Job] = []
    errors: list[Outcome] = []
    for i, entry in enumerate(data.get("jobs") or []):
        where = f"jobs[{i}]"
        e = _fields(entry, where, ("source", "dest"), ("recipe",))
        jobs.append(Job(str(e["source"]), str(e["dest"]), _resolve_recipe(e.get("recipe"), url, where), where))
    for i, entry in enumerate(data.get("prefixes") or []):
        where = f"prefixes[{i}]"
        e = _fields(entry, where, ("source_prefix", "dest_prefix"), ("recipe", "max_depth"))
        recipe = _resolve_recipe(e.get("recipe"), url, where)
        src, dst = str(e["source_prefix"]).rstrip("/"), str(e["dest_prefix"]).rstrip("/")
        t0 = time.perf_counter()
        try:
            found = checkpoint_dirs(src, int(e.get("max_depth", DEFAULT_MAX_DEPTH)))
        except (OSError, ValueError) as err:
            errors.append(Outcome(src, dst, recipe, where, "unknown", FAILED, time.perf_counter() - t0,
                                  f"cannot list {storage.redact(src)}: {err}"))
            continue
        dst_inside = dst + "/"
        for rel in found:
            source = storage.join(src, rel)
            if (source + "/").startswith(dst_inside):
                continue  # an output under a dest_prefix inside the source prefix
            jobs.append(Job(source, storage.join(dst, rel), recipe, where))
    return jobs, errors


def _config(job: Job) -> Any:
    """The RunConfig of ``aser quantize SOURCE DEST --recipe RECIPE``."""
    from aser.pipeline.quantize_cmd import config_from_args

    return config_from_args(argparse.Namespace(source=job.source, dest=job.dest, recipe=job.recipe))


def _state(config: Any) -> str:
    """new / partial / complete; raises (ManifestError) if a complete DEST was made from another
    source or config."""
    from aser.pipeline import manifest
    from aser.pipeline.plan import make_plan

    existing = manifest.load_manifest(config.dest)
    if manifest.is_finished(config.dest) and existing is None:
        raise ValueError(f"{storage.redact(config.dest)} holds a checkpoint not written by aser")
    if existing is None:
        return BEFORE_NEW
    if not manifest.is_complete(existing, config.dest):
        return BEFORE_PARTIAL  # including killed between its index and its last manifest save
    # The source's fingerprint (index, headers, store versions, config.json) and the config; the
    # calibration is compared by a run, not here (it may have to be sampled from the model).
    manifest.check_compatible(existing, config, make_plan(config).fingerprint, existing.calibration_sha256,
                              ignore=frozenset({"workers"}))
    return BEFORE_COMPLETE


def run_job(job: Job, *, show_progress: bool, wait: bool) -> Outcome:
    from aser.pipeline import driver

    t0 = time.perf_counter()
    before = "unknown"

    def done(status: str, error: str | None = None) -> Outcome:
        return Outcome(job.source, job.dest, job.recipe, job.rule, before, status, time.perf_counter() - t0, error)

    try:
        config = _config(job)
        before = _state(config)
        if before == BEFORE_COMPLETE:
            return done(SKIPPED)
        print(f"[aser batch] {before}: {storage.redact(job.source)} -> {storage.redact(job.dest)}", file=sys.stderr)
        result = driver.run(config, show_progress=show_progress, wait=wait)
        return done(SKIPPED if result.status == "already complete" else COMPLETED)
    except driver.DestBusy as e:
        return done(BUSY, str(e))
    except Exception as e:  # noqa: BLE001 - one job's failure is reported; the rest still run
        return done(FAILED, f"{type(e).__name__}: {e}".splitlines()[0][:1000])


def table(outcomes: list[Outcome]) -> str:
    rows = [("status", "before", "seconds", "source -> dest", "error")]
    for o in outcomes:
        rows.append((o.status, o.before, f"{o.seconds:.1f}",
                     f"{storage.redact(o.source)} -> {storage.redact(o.dest)}", o.error or ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + ("  " + r[4] if r[4] else "") for r in rows]
    counts = {s: sum(o.status == s for o in outcomes) for s in (COMPLETED, SKIPPED, BUSY, FAILED)}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)


def cmd_batch(a: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    try:
        jobs, outcomes = expand(a.watchlist, read_watchlist(a.watchlist))
    except WatchlistError as e:
        print(f"aser batch: error: {e}", file=sys.stderr)
        return 2
    print(f"[aser batch] {len(jobs)} job(s) from {storage.redact(a.watchlist)}", file=sys.stderr)
    for i, job in enumerate(jobs):
        if a.dry_run:
            try:
                before = _state(_config(job))
                outcomes.append(Outcome(job.source, job.dest, job.recipe, job.rule, before,
                                        SKIPPED if before == BEFORE_COMPLETE else "to do", 0.0))
            except Exception as e:  # noqa: BLE001
                outcomes.append(Outcome(job.source, job.dest, job.recipe, job.rule, "unknown", FAILED, 0.0,
                                        f"{type(e).__name__}: {e}".splitlines()[0]))
            continue
        print(f"[aser batch] job {i + 1}/{len(jobs)} ({job.rule})", file=sys.stderr)
        outcomes.append(run_job(job, show_progress=not a.no_progress, wait=a.wait))
    print(table(outcomes), file=sys.stderr)
    failed = sum(o.status == FAILED for o in outcomes)
    if a.json:
        print(json.dumps({"watchlist": storage.redact(a.watchlist), "ok": failed == 0,
                          "wall_s": time.perf_counter() - t0, "jobs": [asdict(o) for o in outcomes]}))
    return 1 if failed else 0


def add_batch_parser(subparsers: Any) -> argparse.ArgumentParser:
    b = subparsers.add_parser(
        "batch", help="quantize every job of a watchlist: complete ones skipped, partial ones resumed, "
                      "new ones started; exit 1 if any failed",
    )
    b.add_argument("watchlist", help="watchlist YAML (path or URL): jobs: [{source, dest, recipe}], "
                                     "prefixes: [{source_prefix, dest_prefix, recipe, max_depth}]")
    b.add_argument("--wait", action="store_true", help="wait for a DEST another run holds instead of reporting it busy")
    b.add_argument("--dry-run", action="store_true", help="list the jobs and their state; run nothing")
    b.add_argument("--no-progress", action="store_true")
    b.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    b.set_defaults(func=cmd_batch)
    return b
