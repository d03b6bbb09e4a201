"""Offline checks of the deployment files in cluster/ (no Kubernetes, no cloud, no Slurm).

* ray.io manifests (and the RayJob held in the CronJob's ConfigMap) against KubeRay v1.7.0's CRD
  schemas from ../shared/schemas, strictly: an unknown field is an error, as the API server
  reports it under kubectl's default --validate=strict. The CEL rules (x-kubernetes-validations)
  are not evaluated; a test checks that none of them applies to a field these manifests set.
* Core kinds (and every pod template inside the ray.io manifests) with kubernetes-validate,
  strict, against Kubernetes 1.30.
* What no schema checks: every `aser quantize` command is parsed by the project's own parser and
  turned into a RunConfig; recipes and the watchlist load; no credential is written inline; the
  sbatch script parses and its trap stops Ray (run with stub srun/scontrol/aser); the Ray
  cluster-launcher config passes Ray's own schema.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
KUBERAY_DIR = CLUSTER / "kuberay"
RECIPES = CLUSTER / "recipes"
SBATCH = CLUSTER / "slurm" / "aser.sbatch"
RAY_CLUSTER_CONFIG = CLUSTER / "ray" / "cluster-aws.yaml"
README = CLUSTER / "README.md"
IMAGE_ROOT = "/app/"  # cluster/Dockerfile copies the repository's files here

KUBERAY_SCHEMAS = "kuberay-v1.7.0"
# shared/ beside the checkout, or beside the data folder named by ASER_TEST_DATA (tests/conftest.py,
# .ci/run): the schemas and the test data are siblings in shared/.
SCHEMA_DIRS = tuple(
    d for d in (Path(__file__).resolve().parents[3] / "shared" / "schemas",
                Path(os.environ["ASER_TEST_DATA"]).parent / "schemas" if os.environ.get("ASER_TEST_DATA") else None)
    if d is not None
)
K8S_VERSION = "1.30.0"
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")

CREDENTIAL_VARS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN"}
# KubeRay v1.7.0 ray-operator/controllers/ray/utils/constant.go
MAX_RAYJOB_NAME = 47
MAX_RAYCRONJOB_NAME = 36
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def _missing(what: str) -> NoReturn:
    if IN_CI:
        pytest.fail(f"{what}; CI=true, so this is an error", pytrace=False)
    pytest.skip(what)


# ---------------------------------------------------------------- loading


# libyaml when PyYAML has it: the CRDs are 56,000 lines (1.4 s instead of 6 s).
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.load_all(path.read_text(), Loader=_LOADER) if d]


def _k8s_files() -> list[Path]:
    return sorted(KUBERAY_DIR.glob("*.yaml"))


def _k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    """(label, document) for every Kubernetes object in cluster/kuberay/, plus each object a
    ConfigMap holds as YAML (label ``file#ConfigMap/name:key``)."""
    out = []
    for path in _k8s_files():
        for i, doc in enumerate(_docs(path)):
            label = f"{path.relative_to(REPO)}#{i}:{doc.get('kind')}"
            out.append((label, doc))
            if doc.get("kind") == "ConfigMap":
                for key, text in (doc.get("data") or {}).items():
                    inner = yaml.safe_load(text)
                    if isinstance(inner, dict) and "apiVersion" in inner and "kind" in inner:
                        out.append((f"{label}/{doc['metadata']['name']}:{key}", inner))
    return out


def _ray_docs() -> list[tuple[str, dict[str, Any]]]:
    return [(label, d) for label, d in _k8s_docs() if str(d.get("apiVersion", "")).startswith("ray.io/")]


def _core_docs() -> list[tuple[str, dict[str, Any]]]:
    return [(label, d) for label, d in _k8s_docs() if not str(d.get("apiVersion", "")).startswith("ray.io/")]


def _one(kind: str, embedded: bool = False) -> dict[str, Any]:
    found = [d for label, d in _k8s_docs() if d.get("kind") == kind and ("/" in label.split("#")[1]) == embedded]
    assert len(found) == 1, f"expected one {kind} (embedded={embedded}), found {len(found)}"
    return found[0]


def _rayjob_specs() -> list[tuple[str, dict[str, Any]]]:
    """Every RayJob spec: RayJobs (top level or in a ConfigMap) and RayCronJob job templates."""
    out = []
    for label, d in _ray_docs():
        if d["kind"] == "RayJob":
            out.append((label, d["spec"]))
        elif d["kind"] == "RayCronJob":
            out.append((label + ".jobTemplate", d["spec"]["jobTemplate"]))
    return out


def _pod_templates(spec: dict[str, Any]) -> list[dict[str, Any]]:
    rcs = spec["rayClusterSpec"]
    return [rcs["headGroupSpec"]["template"]] + [g["template"] for g in rcs.get("workerGroupSpecs", [])]


def _local(path: str) -> Path:
    """A path as the cluster sees it (inside the image, /app/...) or relative to the repository
    root (Slurm, `ray job submit --working-dir .`) -> the file in this checkout."""
    if path.startswith(IMAGE_ROOT):
        # Of the repository, the image holds pyproject.toml, README.md, aser/ and cluster/.
        assert path.startswith(IMAGE_ROOT + "cluster/"), f"{path}: not a file the image holds"
        return REPO / path[len(IMAGE_ROOT):]
    assert not path.startswith("/"), f"{path}: neither under {IMAGE_ROOT} nor relative to the repository"
    return REPO / path


# ---------------------------------------------------------------- CRD schemas


def _kubernetes_structural(node: Any, path: tuple[str, ...], cel: list[tuple[str, ...]]) -> Any:
    """The CRD schema as plain JSON Schema, minus the x-kubernetes-* keys, with unknown fields
    refused wherever the CRD lists the fields and does not preserve unknown ones (the API server
    prunes or, under strict field validation, rejects them). Collects where CEL rules sit."""
    if isinstance(node, list):
        return [_kubernetes_structural(n, path, cel) for n in node]
    if not isinstance(node, dict):
        return node
    if "x-kubernetes-validations" in node:
        cel.append(path)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-"):
            continue
        if key == "properties":
            out[key] = {name: _kubernetes_structural(sub, path + (name,), cel) for name, sub in value.items()}
        elif key == "items":
            out[key] = _kubernetes_structural(value, path + ("*",), cel)
        elif key == "additionalProperties":
            out[key] = _kubernetes_structural(value, path + ("*",), cel)
        else:
            out[key] = _kubernetes_structural(value, path, cel)
    if "properties" in out and "additionalProperties" not in out and not node.get(
        "x-kubernetes-preserve-unknown-fields"
    ):
        out["additionalProperties"] = False
    return out


class CRDs:
    def __init__(self, root: Path) -> None:
        self.validators: dict[tuple[str, str], jsonschema.protocols.Validator] = {}
        self.cel_paths: dict[tuple[str, str], list[tuple[str, ...]]] = {}
        for crd_path in sorted((root / KUBERAY_SCHEMAS).glob("ray.io_*.yaml")):
            crd = yaml.load(crd_path.read_text(), Loader=_LOADER)
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if not version.get("served"):
                    continue
                cel: list[tuple[str, ...]] = []
                schema = _kubernetes_structural(version["schema"]["openAPIV3Schema"], (), cel)
                # (No check_schema against the metaschema: 3 s per CRD version on this machine.)
                cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
                key = (f"{group}/{version['name']}", kind)
                self.validators[key] = cls(schema)
                self.cel_paths[key] = cel

    def errors(self, doc: dict[str, Any]) -> list[str]:
        key = (doc.get("apiVersion", ""), doc.get("kind", ""))
        if key not in self.validators:
            return [f"no served CRD version for {key} in {KUBERAY_SCHEMAS}"]
        return [
            f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
            for e in sorted(self.validators[key].iter_errors(doc), key=lambda e: list(e.absolute_path))
        ]


@pytest.fixture(scope="session")
def crds() -> CRDs:
    for root in SCHEMA_DIRS:
        if (root / KUBERAY_SCHEMAS).is_dir():
            loaded = CRDs(root)
            assert {k for _, k in loaded.validators} >= {"RayJob", "RayCronJob", "RayCluster"}
            return loaded
    _missing(f"KubeRay CRD schemas not found in {' or '.join(str(d) for d in SCHEMA_DIRS)}")


@pytest.fixture(scope="session")
def k8s_validate() -> Any:
    try:
        import kubernetes_validate
    except ImportError:
        _missing("kubernetes-validate is not installed (pip install -e '.[dev]')")
    return kubernetes_validate


def test_manifests_found() -> None:
    kinds = sorted((label.split("#")[0], d["kind"]) for label, d in _k8s_docs())
    assert ("cluster/kuberay/rayjob.yaml", "RayJob") in kinds
    assert ("cluster/kuberay/raycronjob.yaml", "RayCronJob") in kinds
    for kind in ("CronJob", "ConfigMap", "ServiceAccount", "Role", "RoleBinding", "RayJob"):
        assert ("cluster/kuberay/cronjob.yaml", kind) in kinds, kinds


@pytest.mark.parametrize("label,doc", _ray_docs(), ids=[label for label, _ in _ray_docs()])
def test_kuberay_manifest_matches_crd(crds: CRDs, label: str, doc: dict[str, Any]) -> None:
    assert crds.errors(doc) == []


def test_crd_validation_rejects_broken_manifests(crds: CRDs) -> None:
    good = _one("RayJob")
    assert crds.errors(good) == []

    wrong_type = copy.deepcopy(good)
    wrong_type["spec"]["backoffLimit"] = "2"
    assert any(e.startswith("spec.backoffLimit:") for e in crds.errors(wrong_type))

    typo = copy.deepcopy(good)
    typo["spec"]["shutdownAfterJobFinish"] = typo["spec"].pop("shutdownAfterJobFinishes")
    assert any("shutdownAfterJobFinish" in e for e in crds.errors(typo))

    no_group_name = copy.deepcopy(good)
    del no_group_name["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]
    assert any("groupName" in e for e in crds.errors(no_group_name))

    bad_env = copy.deepcopy(good)
    bad_env["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"][1][
        "valueFrom"]["secretKeyRef"]["key"] = 7
    assert any("secretKeyRef.key" in e for e in crds.errors(bad_env))

    cron = copy.deepcopy(_one("RayCronJob"))
    del cron["spec"]["schedule"]
    assert any("'schedule' is a required property" in e for e in crds.errors(cron))


def _has_path(node: Any, path: tuple[str, ...]) -> bool:
    if not path:
        return True
    head, rest = path[0], path[1:]
    if head == "*":
        items = node if isinstance(node, list) else list(node.values()) if isinstance(node, dict) else []
        return any(_has_path(n, rest) for n in items)
    return isinstance(node, dict) and head in node and _has_path(node[head], rest)


def test_no_unchecked_cel_rule_applies(crds: CRDs) -> None:
    """JSON Schema cannot run the CRDs' CEL rules; make sure none sits on a field we set."""
    for label, doc in _ray_docs():
        key = (doc["apiVersion"], doc["kind"])
        assert crds.cel_paths[key], "the CRD has CEL rules; if none are found the walk is broken"
        applying = [".".join(p) for p in crds.cel_paths[key] if _has_path(doc, p)]
        assert applying == [], f"{label} sets fields guarded by CEL rules not checked here: {applying}"


def test_kuberay_controller_rules() -> None:
    """A subset of what KubeRay v1.7.0's controller refuses (utils/validation.go), which no schema
    expresses."""
    for label, doc in _ray_docs():
        meta = doc["metadata"]
        name = meta.get("name") or meta["generateName"] + "x" * 5  # kubectl create adds 5 characters
        limit = MAX_RAYCRONJOB_NAME if doc["kind"] == "RayCronJob" else MAX_RAYJOB_NAME
        assert len(name) <= limit and DNS1035.match(name), f"{label}: name {name!r}"
    for label, spec in _rayjob_specs():
        assert spec.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "SidecarMode", "HTTPMode"), label
        assert spec["shutdownAfterJobFinishes"] is True, label
        assert spec["ttlSecondsAfterFinished"] > 0, label
        assert spec["activeDeadlineSeconds"] > 0, label
        assert spec["backoffLimit"] >= 0, label
        rcs = spec["rayClusterSpec"]
        assert rcs.get("authOptions", {}).get("enableK8sTokenAuth") is not True, f"{label}: not supported for RayJob"
        if rcs.get("authOptions", {}).get("mode") == "token":
            version = tuple(int(x) for x in rcs["rayVersion"].split("."))
            assert version >= (2, 52, 0), f"{label}: token auth needs Ray >= 2.52.0"
        for tpl in _pod_templates(spec):
            assert tpl["spec"]["containers"], label
        if not rcs.get("enableInTreeAutoscaling"):
            for g in rcs["workerGroupSpecs"]:
                assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], f"{label}: {g['groupName']}"


# ---------------------------------------------------------------- core kinds


@pytest.mark.parametrize("label,doc", _core_docs(), ids=[label for label, _ in _core_docs()])
def test_core_manifest_validates(k8s_validate: Any, label: str, doc: dict[str, Any]) -> None:
    assert k8s_validate.validate(doc, K8S_VERSION, strict=True) == "1.30"


def test_pod_templates_inside_ray_manifests_validate(k8s_validate: Any) -> None:
    """The CRD embeds its own copy of PodSpec; check each template against Kubernetes 1.30's too."""
    n = 0
    for label, spec in _rayjob_specs():
        for tpl in _pod_templates(spec):
            wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": tpl}
            k8s_validate.validate(wrapped, K8S_VERSION, strict=True)
            n += 1
    assert n >= 6


def test_core_validation_rejects_broken_manifests(k8s_validate: Any) -> None:
    cron = copy.deepcopy(_one("CronJob"))
    k8s_validate.validate(cron, K8S_VERSION, strict=True)
    cron["spec"]["concurrencyPolicyy"] = cron["spec"].pop("concurrencyPolicy")
    with pytest.raises(k8s_validate.ValidationError):
        k8s_validate.validate(cron, K8S_VERSION, strict=True)
    role = copy.deepcopy(_one("Role"))
    role["rules"][0]["verbs"] = "create"
    with pytest.raises(k8s_validate.ValidationError):
        k8s_validate.validate(role, K8S_VERSION, strict=True)


def test_cronjob_matches_raycronjob() -> None:
    """Two ways to the same nightly run: same schedule, same time zone, same RayJob spec."""
    raycron, cron, inner = _one("RayCronJob"), _one("CronJob"), _one("RayJob", embedded=True)
    assert cron["spec"]["schedule"] == raycron["spec"]["schedule"]
    assert cron["spec"]["timeZone"] == raycron["spec"]["timeZone"]
    assert inner["spec"] == raycron["spec"]["jobTemplate"]
    assert len(raycron["spec"]["schedule"].split()) == 5 and "TZ" not in raycron["spec"]["schedule"]


def test_cronjob_wiring() -> None:
    cron, cm = _one("CronJob"), _one("ConfigMap")
    sa, role, binding = _one("ServiceAccount"), _one("Role"), _one("RoleBinding")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    job = cron["spec"]["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0, "a retried pod would create a second RayJob"
    pod = job["template"]["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": sa["metadata"]["namespace"]}]
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get", "list"]}]
    namespaces = {d["metadata"].get("namespace") for _, d in _k8s_docs()}
    assert namespaces == {"aser"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    (container,) = pod["containers"]
    (mount,) = container["volumeMounts"]
    assert volumes[mount["name"]]["configMap"]["name"] == cm["metadata"]["name"]
    script = container["args"][0]
    created = re.search(r"kubectl create -f (\S+)", script)
    assert created and created.group(1) == f"{mount['mountPath']}/rayjob.yaml"
    assert "rayjob.yaml" in cm["data"]


def test_cronjob_script_parses(tmp_path: Path) -> None:
    (container,) = _one("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["/bin/sh", "-c"]
    script = tmp_path / "create-rayjob.sh"
    script.write_text(container["args"][0])
    shell = "dash" if subprocess.run(["sh", "-c", "command -v dash"], capture_output=True).returncode == 0 else "sh"
    assert subprocess.run([shell, "-n", str(script)], capture_output=True, text=True).stderr == ""


# ---------------------------------------------------------------- credentials


def _inline_credentials(node: Any, path: str = "") -> list[str]:
    found = []
    if isinstance(node, dict):
        if node.get("name") in CREDENTIAL_VARS and "value" in node:
            found.append(f"{path}: {node['name']} has an inline value")
        for k, v in node.items():
            found += _inline_credentials(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += _inline_credentials(v, f"{path}[{i}]")
    return found


# A credential variable set to a literal in any text (`NAME=x`, `NAME: x`, quoted or not); a value
# from the shell (`$...`) or a `...` placeholder is fine. And AWS access key ids.
_LITERAL_SECRET = re.compile(
    r"AKIA[0-9A-Z]{16}|\b(?:AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN|RAY_AUTH_TOKEN)\s*[=:]\s*[\"']?(?![$\s\"']|\.\.\.|$)"
)


def _literal_secret_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if _LITERAL_SECRET.search(line)]


def test_inline_credential_checks_can_fail() -> None:
    doc = copy.deepcopy(_one("RayJob"))
    env = doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    env.append({"name": "AWS_SECRET_ACCESS_KEY", "value": "not-a-real-key"})
    assert len(_inline_credentials(doc)) == 1
    bad = ['export RAY_AUTH_TOKEN="abc123"', "RAY_AUTH_TOKEN=abc", "  AWS_SECRET_ACCESS_KEY: abc",
           "--from-literal=AWS_SECRET_ACCESS_KEY=abc", "key AKIAABCDEFGHIJKLMNOP"]
    good = ["RAY_AUTH_TOKEN=$(python -c 'import secrets')", "export RAY_AUTH_TOKEN", "- name: RAY_AUTH_TOKEN",
            "--from-literal=AWS_SECRET_ACCESS_KEY=...", 'AWS_SECRET_ACCESS_KEY="$KEY"']
    assert _literal_secret_lines("\n".join(bad)) == bad
    assert _literal_secret_lines("\n".join(good)) == []


def test_no_inline_credentials() -> None:
    for label, doc in _k8s_docs():
        assert _inline_credentials(doc) == [], label
    assert not [label for label, d in _k8s_docs() if d["kind"] == "Secret"], "Secrets are created with kubectl, not kept here"
    for path in sorted(CLUSTER.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            assert _literal_secret_lines(path.read_text()) == [], path.relative_to(REPO)


def test_ray_pods_take_credentials_from_secrets() -> None:
    for label, spec in _rayjob_specs():
        auth = spec["rayClusterSpec"]["authOptions"]
        assert auth["mode"] == "token"
        for tpl in _pod_templates(spec):
            for c in tpl["spec"]["containers"]:
                env = {e["name"]: e for e in c.get("env", [])}
                assert env["RAY_AUTH_MODE"]["value"] == "token", label
                ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
                # One token for head, workers and (injected by KubeRay from authOptions) submitter.
                assert ref == {"name": auth["secretName"], "key": "auth_token"}, label
                assert {"secretRef": {"name": "aser-aws"}} in c["envFrom"], label


# ---------------------------------------------------------------- entrypoints and recipes


def _quantize_config(argv: list[str]) -> Any:
    from aser.pipeline.cli import build_parser
    from aser.pipeline.quantize_cmd import config_from_args

    assert argv[0] == "aser" and argv[1] == "quantize", argv
    a = build_parser().parse_args(argv[1:])
    assert a.recipe, f"{argv}: no --recipe"
    a.recipe = str(_local(a.recipe))
    config = config_from_args(a)
    # Without SOURCE and DEST config_from_args falls back to the embedded defaults: a command that
    # loads only because of that would quantize the wrong model.
    assert config.source == argv[2] and config.dest == argv[3], argv
    assert config.source.startswith("s3://") and config.dest.startswith("s3://"), argv
    return config


def _check_entrypoint(where: str, command: str) -> str:
    argv = shlex.split(command)
    assert argv[0] == "aser", f"{where}: {command}"
    if argv[1] == "quantize":
        _quantize_config(argv)
    elif argv[1] == "batch":
        from aser.pipeline import batch
        from aser.pipeline.cli import build_parser

        a = build_parser().parse_args(argv[1:])
        watchlist = str(_local(a.watchlist))
        jobs = [j for j in (batch.read_watchlist(watchlist).get("jobs") or [])]
        prefixes = batch.read_watchlist(watchlist).get("prefixes") or []
        assert jobs or prefixes, f"{where}: {watchlist} names nothing"
        for entry in [*jobs, *prefixes]:  # every recipe the nightly run would read loads
            _quantize_config(["aser", "quantize", entry.get("source") or entry["source_prefix"].rstrip("/") + "/x",
                              entry.get("dest") or entry["dest_prefix"].rstrip("/") + "/x", "--recipe", entry["recipe"]])
    else:
        raise AssertionError(f"{where}: unexpected subcommand in {command!r}")
    return argv[1]


def _commands_in_text(text: str, markdown: bool) -> list[str]:
    """`aser quantize ...` commands in a README's ```bash blocks or in YAML comments (backslash
    continuations joined, `ray job submit ... --` prefixes dropped)."""
    if markdown:
        lines = [line for block in re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S)
                 for line in block.splitlines()]
    else:
        lines = [re.sub(r"^\s*#\s?", "", line) for line in text.splitlines() if line.lstrip().startswith("#")]
    joined, cur = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        joined.append(cur + line)
        cur = ""
    out = []
    for line in joined:
        m = re.search(r"(?:^|\s)(aser quantize\s[^#]*)", line)
        if m:
            out.append(m.group(1).strip())
    return out


def test_entrypoints_parse() -> None:
    subcommands = {}
    for label, spec in _rayjob_specs():
        subcommands[label] = _check_entrypoint(label, spec["entrypoint"])
    assert "quantize" in subcommands.values() and "batch" in subcommands.values(), subcommands


def test_commands_in_docs_parse() -> None:
    found: dict[str, list[str]] = {}
    for path in (README, RAY_CLUSTER_CONFIG):
        commands = _commands_in_text(path.read_text(), markdown=path.suffix == ".md")
        assert commands, f"no `aser quantize` command found in {path}"
        for command in commands:
            _check_entrypoint(str(path.relative_to(REPO)), command)
        found[path.name] = commands
    # The README quotes the RayJob's command: it must not drift from the manifest.
    entrypoint = " ".join(_one("RayJob")["spec"]["entrypoint"].split())
    assert entrypoint in [" ".join(c.split()) for c in found["README.md"]]


def test_rayjob_workers_match_its_gpus() -> None:
    """--workers is pinned (see the recipe); it must equal the GPUs the RayJob asks for."""
    spec = _one("RayJob")["spec"]
    a = _quantize_config(shlex.split(spec["entrypoint"]))
    gpus = sum(
        g["replicas"] * int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
        for g in spec["rayClusterSpec"]["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]
    )
    assert a.workers.num_workers == gpus == 16


def test_recipe_parser_rejects_a_bad_command() -> None:
    from aser.pipeline.config import ConfigError

    good = shlex.split(_one("RayJob")["spec"]["entrypoint"])
    with pytest.raises(SystemExit):  # argparse: unknown flag
        _quantize_config(good + ["--rnak", "64"])
    with pytest.raises(ConfigError):
        _quantize_config(good + ["--group-size", "128"])


def _recipe_files() -> list[Path]:
    return sorted(p for p in RECIPES.glob("*.yaml") if p.name != "watchlist.yaml")


@pytest.mark.parametrize("path", _recipe_files(), ids=lambda p: p.name)
def test_recipe_loads(path: Path) -> None:
    from aser.pipeline.config import from_yaml, read_recipe

    data = read_recipe(str(path))
    assert "source" not in data and "dest" not in data, "SOURCE/DEST come from the command line"
    config = from_yaml(str(path), source="s3://models/x", dest="s3://quantized/x")
    assert config.method.method == "aser" and config.method.rank == 64
    assert config.output_format == "w4a8-marlin", "GPU clusters serve with vLLM Marlin"
    assert config.calib.source is not None, "without one aser samples text from the (70B+) model"


def test_watchlist() -> None:
    from aser.pipeline.config import from_yaml

    data = yaml.safe_load((RECIPES / "watchlist.yaml").read_text())
    assert set(data) == {"jobs", "prefixes"}
    assert data["jobs"] and data["prefixes"]
    for job in data["jobs"]:
        assert set(job) == {"source", "dest", "recipe"}, job
        from_yaml(str(_local(job["recipe"])), source=job["source"], dest=job["dest"])
    for pre in data["prefixes"]:
        assert set(pre) == {"source_prefix", "dest_prefix", "recipe"}, pre
        assert pre["source_prefix"].endswith("/") and pre["dest_prefix"].endswith("/"), pre
        assert pre["source_prefix"] != pre["dest_prefix"]
        from_yaml(str(_local(pre["recipe"])), source=pre["source_prefix"] + "m", dest=pre["dest_prefix"] + "m")
    used = {_local(e["recipe"]).resolve() for e in data["jobs"] + data["prefixes"]}
    assert used == {p.resolve() for p in _recipe_files()}


# ---------------------------------------------------------------- image, cluster launcher


def test_image_and_ray_version_agree() -> None:
    text = (CLUSTER / "Dockerfile").read_text()
    tag = re.search(r"^ARG RAY_TAG=(\S+)$", text, re.M)
    assert tag and re.search(r"^FROM \$\{RAY_IMAGE\}:\$\{RAY_TAG\}$", text, re.M)
    ray_version = tag.group(1).split("-")[0]
    assert "-gpu" in tag.group(1) and "COPY --chown=ray:users cluster /app/cluster" in text
    for label, spec in _rayjob_specs():
        assert spec["rayClusterSpec"]["rayVersion"] == ray_version, label
        images = {c["image"] for t in _pod_templates(spec) for c in t["spec"]["containers"]}
        assert len(images) == 1, f"{label}: head and workers must run the same image: {images}"
    assert f'"ray[default]=={ray_version}"' in RAY_CLUSTER_CONFIG.read_text()


def test_ray_cluster_launcher_config() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(RAY_CLUSTER_CONFIG.read_text())
    validate_config(config)
    filled = prepare_config(copy.deepcopy(config))  # merges Ray's AWS defaults, validates again
    assert filled["provider"]["type"] == "aws" and filled["provider"]["region"]
    types = filled["available_node_types"]
    assert filled["head_node_type"] in types
    gpu_types = [t for t in types.values() if t["node_config"]["InstanceType"].startswith("p5.")]
    assert gpu_types and gpu_types[0]["min_workers"] == gpu_types[0]["max_workers"] == 2
    assert any("pip install" in c and "aser" in c for c in filled["setup_commands"])

    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu-8x"]["min_workers"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(broken)


# ---------------------------------------------------------------- Slurm


def test_sbatch_parses() -> None:
    r = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


STUBS = {
    "scontrol": 'echo "scontrol $*" >> "$STUB_LOG"; printf "gpu01\\ngpu02\\ngpu03\\n"',
    "srun": r"""echo "srun $*" >> "$STUB_LOG"
case "$*" in
  *"ray start"*)
    trap 'kill "$child"; echo "ray start ended" >> "$STUB_LOG"; exit 0' TERM
    /bin/sleep 30 & child=$!; wait; exit 0 ;;
  *"hostname --ip-address"*) echo "10.0.0.1 fe80::1" ;;
esac""",
    # The token generator and the wait-for-GPUs step.
    "python": 'if [ "$1" = "-c" ]; then echo stub-token; else cat >/dev/null; fi',
    "sleep": ":",
    "aser": r"""printf '%s\0' "$@" > "$STUB_ARGV"
echo "aser started" >> "$STUB_LOG"
[ "$STUB_ASER" = exit0 ] && exit 0
trap 'kill "$child"; echo "aser terminated" >> "$STUB_LOG"; exit 143' TERM
/bin/sleep 30 & child=$!; wait""",
}


@pytest.fixture
def stub_env(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STUBS.items():
        p = bin_dir / name
        p.write_text("#!/bin/bash\n" + body + "\n")
        p.chmod(0o755)
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "activate").write_text("# stub\n")
    return {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "ASER_VENV": str(tmp_path / "venv"),
        "SLURM_JOB_NODELIST": "gpu[01-03]",
        "SLURM_JOB_NUM_NODES": "3",
        "SLURM_CPUS_PER_TASK": "96",
        "STUB_LOG": str(tmp_path / "log"),
        "STUB_ARGV": str(tmp_path / "argv"),
    }


@pytest.fixture
def run_sbatch() -> Iterator[Any]:
    procs: list[subprocess.Popen[str]] = []

    def start(env: dict[str, str]) -> subprocess.Popen[str]:
        p = subprocess.Popen(["bash", str(SBATCH)], cwd=REPO, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        procs.append(p)
        return p

    yield start
    for p in procs:  # our own process group only, in case an assertion left it running
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _log(env: dict[str, str]) -> list[str]:
    path = Path(env["STUB_LOG"])
    return path.read_text().splitlines() if path.exists() else []


def _wait_for(env: dict[str, str], line: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while line not in _log(env):
        assert time.monotonic() < deadline, f"{line!r} not in {_log(env)}"
        time.sleep(0.05)


def _ray_stops(env: dict[str, str]) -> list[str]:
    return [line for line in _log(env) if "ray stop" in line]


def test_sbatch_runs_the_driver_and_stops_ray(stub_env: dict[str, str], run_sbatch: Any) -> None:
    env = {**stub_env, "STUB_ASER": "exit0"}
    p = run_sbatch(env)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    argv = Path(env["STUB_ARGV"]).read_text().split("\0")[:-1]
    config = _quantize_config(["aser"] + argv)  # exactly what bash passed, parsed by aser's parser
    assert config.ray_address == "10.0.0.1:6379"
    assert config.workers.num_workers == 3 * 8
    # Ray is stopped by ending its own `ray start --block` steps, never by `ray stop` (which
    # would stop every Ray of this user on the node, another job's included).
    assert _ray_stops(env) == []
    assert _log(env).count("ray start ended") == 2  # the head step and the workers' step


def test_sbatch_trap_stops_ray_on_scancel(stub_env: dict[str, str], run_sbatch: Any) -> None:
    env = {**stub_env, "STUB_ASER": "block"}
    p = run_sbatch(env)
    _wait_for(env, "aser started")
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)  # what scancel and --signal=B:TERM@300 send the batch shell
    _, err = p.communicate(timeout=30)
    assert p.returncode == 143, err
    assert time.monotonic() - t0 < 10, "the trap waited for the driver instead of stopping it"
    log = _log(env)
    assert "aser terminated" in log
    assert _ray_stops(env) == []
    assert log.count("ray start ended") == 2
    assert log.index("aser terminated") < log.index("ray start ended")  # the driver first


def test_sbatch_trap_covers_exit_and_term() -> None:
    text = SBATCH.read_text()
    traps = dict((m.group(2), m.group(1)) for m in re.finditer(r"^trap ('[^']*'|\S+) (\S+)", text, re.M))
    assert traps["EXIT"] == "stop_ray" and traps["TERM"] == "'exit 143'"
    body = text[text.index("stop_ray() {"):text.index("\n}\n", text.index("stop_ray() {"))]
    assert 'kill -TERM "$aser_pid"' in body and "kill -TERM $pids" in body  # driver, then Ray steps
    assert "ray stop" not in text.replace("`ray stop`", "")  # nowhere but in the comments' quotes
