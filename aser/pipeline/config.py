"""The run configuration: one frozen, validated, versioned dataclass tree.

Defaults live here and only here (the dataclass field defaults); the CLI and YAML recipes build
a ``RunConfig`` and nothing else reads argv or the environment. Every value is checked when the
object is built, so a bad value fails before any work, with a message naming the field
(``ConfigError("calib.num_samples must be >= 1, got 0")``).

``MethodConfig`` (the quantization method's knobs) belongs to the numerics and is defined once,
in ``aser.workers.reconstruct``; it is imported lazily so that this module stays light.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Mapping

if TYPE_CHECKING:
    from aser.workers.reconstruct import MethodConfig

# Bump when a field is added, removed or changes meaning: a manifest written by another
# version is then refused instead of silently reinterpreted.
CONFIG_VERSION = 1

from aser.checkpoint.formats import DEFAULT_FORMAT, FORMAT_NAMES, OutputFormat  # noqa: E402  (re-exported: the config names it)

Propagate = Literal["fp", "quantized"]
PROPAGATE_MODES: tuple[str, ...] = ("fp", "quantized")


# What an exported checkpoint supports (aser/kernels/loader.py reads only these): the
# activation width, as recipes spell it (16: none, W4A16; MethodConfig stores that as None).
A_BITS_WEIGHT_ONLY = 16
A_BITS_FORMATS: dict[int, OutputFormat] = {8: "w4a8", A_BITS_WEIGHT_ONLY: "w4a16"}
_A_BITS_VALID = "8 (INT8 activations, W4A8) or 16 (no activation quantization, W4A16)"


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def _method_config_type() -> type[MethodConfig]:
    from aser.workers.reconstruct import MethodConfig

    return MethodConfig


def _default_method() -> MethodConfig:
    """MethodConfig's defaults in ``DEFAULT_FORMAT``: what a run computes and writes when neither
    a flag nor a recipe names the format. Validated where every method is: in ``RunConfig``."""
    return _method_config_type()(**method_with_format({}, None))


def _check_int(name: str, value: object, minimum: int) -> None:
    # bool is an int subclass; `num_workers: true` in a recipe is a mistake, not 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")


def _check_number(name: str, value: object, minimum: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")


def _check_url(name: str, value: object, required: bool) -> None:
    if value is None and not required:
        return
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{name} must be a non-empty URL or path, got {value!r}")


@dataclass(frozen=True)
class CalibConfig:
    """Calibration data. ``source``: URL of a UTF-8 text file, or None for the built-in set."""

    source: str | None = None
    num_samples: int = 128
    seq_len: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        _check_url("calib.source", self.source, required=False)
        _check_int("calib.num_samples", self.num_samples, 1)
        _check_int("calib.seq_len", self.seq_len, 1)
        _check_int("calib.seed", self.seed, 0)


@dataclass(frozen=True)
class WorkersConfig:
    """Calibration workers (one Ray actor each) and the resources each one asks for.

    ``None`` means "from the cluster" (``driver.resolve_resources``): on a cluster with GPUs,
    one calibration worker per GPU with ``CALIB_GPU_FRACTION`` of it, and reconstruction tasks
    with ``RECONSTRUCT_GPU_FRACTION`` each, so both share every GPU; without GPUs, one worker and
    no GPU anywhere.
    """

    num_workers: int | None = None
    # CPUs (= torch threads) per worker; None: 1 with a GPU, else its node's CPUs less one for
    # the tasks, shared among the workers on the node (``resources.default_cpus_per_worker``).
    num_cpus_per_worker: float | None = None
    num_gpus_per_worker: float | None = None
    # GPUs (a fraction: several tasks share one) per reconstruction task.
    reconstruct_gpus: float | None = None
    # CPUs per reconstruction task, and its torch threads. Part of the recorded config (a resume
    # must match it): the thread count decides how CPU sums are split, hence the bytes.
    reconstruct_cpus: int = 1

    def __post_init__(self) -> None:
        if self.num_workers is not None:
            _check_int("workers.num_workers", self.num_workers, 1)
        if self.num_cpus_per_worker is not None:
            _check_number("workers.num_cpus_per_worker", self.num_cpus_per_worker, 0.0)
        if self.num_gpus_per_worker is not None:
            _check_number("workers.num_gpus_per_worker", self.num_gpus_per_worker, 0.0)
        _check_int("workers.reconstruct_cpus", self.reconstruct_cpus, 1)
        if self.reconstruct_gpus is not None:
            _check_number("workers.reconstruct_gpus", self.reconstruct_gpus, 0.0)
            if self.reconstruct_gpus > 1:
                raise ConfigError(f"workers.reconstruct_gpus must be <= 1 (a task runs on one GPU), "
                                  f"got {self.reconstruct_gpus}")


@dataclass(frozen=True)
class RunConfig:
    """One quantization run: SOURCE checkpoint URL -> DEST URL, with method and resources."""

    source: str
    dest: str
    method: MethodConfig = field(default_factory=_default_method)
    calib: CalibConfig = field(default_factory=CalibConfig)
    propagate: Propagate = "fp"
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    ray_address: str | None = None
    # Upper bound for one output shard; a layer larger than this is split across shards.
    shard_size_bytes: int = 5 * 1024**3
    # Save the workers' states at every this many layer boundaries; None: when the forward work
    # since the last save outweighs its cost (``pipeline.save_policy``). Never changes the bytes.
    save_state_every: int | None = None

    def __post_init__(self) -> None:
        _check_url("source", self.source, required=True)
        _check_url("dest", self.dest, required=True)
        if self.source.rstrip("/") == self.dest.rstrip("/"):
            raise ConfigError(f"dest must differ from source, both are {self.source!r}")
        if not isinstance(self.calib, CalibConfig):
            raise ConfigError(f"calib must be a CalibConfig, got {type(self.calib).__name__}")
        if not isinstance(self.workers, WorkersConfig):
            raise ConfigError(
                f"workers must be a WorkersConfig, got {type(self.workers).__name__}"
            )
        if self.propagate not in PROPAGATE_MODES:
            raise ConfigError(f"propagate must be one of {PROPAGATE_MODES}, got {self.propagate!r}")
        _check_url("ray_address", self.ray_address, required=False)
        _check_int("shard_size_bytes", self.shard_size_bytes, 1)
        if self.save_state_every is not None:
            _check_int("save_state_every", self.save_state_every, 1)
        method_type = _method_config_type()
        if not isinstance(self.method, method_type):
            raise ConfigError(f"method must be a MethodConfig, got {type(self.method).__name__}")
        try:
            self.method.validate()
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(str(e) if str(e).startswith("method") else f"method: {e}") from e
        if self.method.group_size is not None:
            # The loader and kernels (aser/kernels) read one INT4 scale per output channel only.
            raise ConfigError(
                f"method.group_size (--group-size) {self.method.group_size}: group quantization is "
                "not supported by `aser quantize`, whose checkpoints use per-output-channel INT4 "
                "scales; leave it unset (per-channel is the default), or measure groups in memory "
                "with `aser simulate --group-size`"
            )
        self.output_format  # noqa: B018 - validates w_bits / a_bits against the export formats

    @property
    def output_format(self) -> OutputFormat:
        """The checkpoint format, derived from the method's bit widths and activation quantizer."""
        w_bits, a_bits = self.method.w_bits, self.method.a_bits
        if w_bits != 4:
            raise ConfigError(f"method.w_bits must be 4 for export (w4a8 / w4a16), got {w_bits}")
        fmt = _a_bits_format(A_BITS_WEIGHT_ONLY if a_bits is None else a_bits)
        return "w4a8-marlin" if fmt == "w4a8" and self.method.act_quant == "marlin" else fmt

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with the config version; the inverse of ``from_dict``."""
        d = dataclasses.asdict(self)
        d["method"] = self.method.to_dict()
        return {"version": CONFIG_VERSION, **d}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunConfig:
        """Build from a (possibly partial) dict; absent fields take the defaults above.

        A ``version`` other than CONFIG_VERSION is refused; a dict without one (a recipe) is read
        as the current version.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"config must be a mapping, got {type(data).__name__}")
        data = dict(data)
        # A recipe's `format:` is method fields (see apply_format); without one, DEFAULT_FORMAT's.
        # A manifest (it has a version) records the fields, not the format: read as written (one
        # from before `act_quant` existed computed with the compressed-tensors quantizer).
        method = data.get("method", {})
        if not isinstance(method, Mapping):
            raise ConfigError(f"method must be a mapping, got {method!r}")
        fmt = data.pop("format", None)
        if fmt is not None or "version" not in data:
            data["method"] = method_with_format(method, fmt)
        version = data.pop("version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise ConfigError(
                f"config version {version!r} is not supported by this aser "
                f"(expects {CONFIG_VERSION}); rerun with the aser version that wrote it"
            )
        kwargs = _fields_from(cls, data, "")
        for name in ("calib", "workers", "method"):
            if name in kwargs and not isinstance(kwargs[name], Mapping):
                raise ConfigError(f"{name} must be a mapping, got {kwargs[name]!r}")
        if "calib" in kwargs:
            kwargs["calib"] = _build(CalibConfig, kwargs["calib"], "calib")
        if "workers" in kwargs:
            kwargs["workers"] = _build(WorkersConfig, kwargs["workers"], "workers")
        if "method" in kwargs:
            try:
                kwargs["method"] = _method_config_type().from_dict(_method_fields(kwargs["method"]))
            except TypeError as e:
                raise ConfigError(f"method: {e}") from e
            except ConfigError:
                raise
            except ValueError as e:
                raise ConfigError(str(e) if str(e).startswith("method") else f"method: {e}") from e
        for required in ("source", "dest"):
            if required not in kwargs:
                raise ConfigError(f"{required} is required")
        return cls(**kwargs)


def apply_format(method: Mapping[str, Any], fmt: object) -> dict[str, Any]:
    """``--format`` (or a recipe's ``format``) as the method fields that decide it: ``w4a8-int``
    = compressed-tensors ``int-quantized`` with its INT8 activation quantizer (CPU/Arm/XPU
    engines, transformers); ``w4a16-pack`` = ``pack-quantized`` INT4 for GPU kernels (vLLM
    Marlin), computed with Marlin's INT8 activations (VLLM_MARLIN_INPUT_DTYPE=int8), or with
    16-bit ones when a_bits is 16."""
    if fmt not in FORMAT_NAMES:
        raise ConfigError(f"format must be one of {', '.join(FORMAT_NAMES)}, got {fmt!r}")
    weight_only = method.get("a_bits", 8) in (None, A_BITS_WEIGHT_ONLY)
    if fmt == "w4a8-int" and weight_only:
        raise ConfigError("format w4a8-int stores INT8 activations: a_bits must be 8, not 16")
    return {**method, "act_quant": "marlin" if fmt == "w4a16-pack" and not weight_only else "compressed-tensors"}


def method_with_format(method: Mapping[str, Any], fmt: object | None) -> dict[str, Any]:
    """The method fields with ``fmt`` applied; with no format, ``DEFAULT_FORMAT`` unless the
    fields already name their activation quantizer (a manifest's, or a recipe that sets it)."""
    if fmt is None:
        if "act_quant" in method:
            return dict(method)
        fmt = DEFAULT_FORMAT
    return apply_format(method, fmt)


def _a_bits_format(a_bits: object) -> OutputFormat:
    # Exactly int: `a_bits: true` (bool is an int subclass) or `8.0` is a mistake, not a width.
    if type(a_bits) is not int or a_bits not in A_BITS_FORMATS:
        raise ConfigError(f"method.a_bits must be {_A_BITS_VALID}, got {a_bits!r}")
    return A_BITS_FORMATS[a_bits]


def _method_fields(data: Mapping[str, Any]) -> dict[str, Any]:
    """A recipe's (or manifest's) method mapping as MethodConfig fields: ``a_bits: 16`` is
    weight-only (None); None, written by manifests, stays accepted; anything else not 8 fails."""
    fields = dict(data)
    if "a_bits" in fields and fields["a_bits"] is not None:
        _a_bits_format(fields["a_bits"])
        if fields["a_bits"] == A_BITS_WEIGHT_ONLY:
            fields["a_bits"] = None
    return fields


def _fields_from(cls: type, data: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config field {prefix}{unknown[0]!s} (known: {', '.join(sorted(names))})"
        )
    return dict(data)


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    return cls(**_fields_from(cls, data, prefix + "."))


def read_recipe(path: str) -> dict[str, Any]:
    """The mapping of a YAML recipe (a URL or path), not yet validated; empty file: {}."""
    import yaml

    from aser.checkpoint import storage

    try:
        data = yaml.safe_load(storage.read_bytes(path).decode("utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {storage.redact(path)} is not valid YAML: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"recipe {storage.redact(path)} must be a mapping at the top level")
    return dict(data)


def from_yaml(path: str, source: str | None = None, dest: str | None = None) -> RunConfig:
    """Read a YAML recipe (a URL or path) into a RunConfig.

    The recipe holds any subset of ``RunConfig.to_dict()``'s fields; ``source`` / ``dest``
    given here (from the command line) override the recipe's.
    """
    data = read_recipe(path)
    if source is not None:
        data["source"] = source
    if dest is not None:
        data["dest"] = dest
    return RunConfig.from_dict(data)


def to_dict(config: RunConfig) -> dict[str, Any]:
    return config.to_dict()


def from_dict(data: Mapping[str, Any]) -> RunConfig:
    return RunConfig.from_dict(data)
