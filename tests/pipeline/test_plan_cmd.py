"""`aser plan` and the memory model it shares with the driver: config-only directories, the
cost terms on known shapes, clear errors, and the driver's refusal of a run that cannot fit."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from transformers import LlamaConfig

from aser.pipeline import cli, driver, memory
from aser.pipeline.plan_cmd import PROFILES, make_report, read_shape
from aser.pipeline.resources import ResourceError

GIB = 2**30


def _config_dir(tmp_path: Path, name: str = "m", **dims) -> Path:
    out = tmp_path / name
    out.mkdir()
    kw = dict(vocab_size=1000, hidden_size=256, intermediate_size=704, num_hidden_layers=3, num_attention_heads=8,
              num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, torch_dtype="bfloat16")
    kw.update(dims)
    LlamaConfig(**kw).save_pretrained(out)
    return out


@dataclass
class _Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def _plan(capsys: pytest.CaptureFixture[str]):
    """`aser plan ARGS` through the CLI's own main (in process: the subprocess start-up would
    cost seconds per call)."""
    def run(*args: str) -> _Result:
        code = cli.main(["plan", *args])
        out = capsys.readouterr()
        return _Result(code, out.out, out.err)
    return run


def test_config_only_directory_plans_with_the_json_contract(tmp_path: Path, _plan) -> None:
    src = _config_dir(tmp_path)
    res = _plan(str(src), "--device-profile", "h100", "--num-samples", "16", "--seq-len", "128", "--json")
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    kinds = {p["kind"]: p for p in rep["processes"]}
    assert set(kinds) == {"driver", "calibration", "smooth", "reconstruct", "writer", "finalize"}
    assert all({"count", "peak_host_bytes", "peak_gpu_bytes"} <= set(p) for p in rep["processes"])
    for key in ("bytes_read", "bytes_written", "flops", "seconds_estimate", "assumptions"):
        assert key in rep
    # On an 8-GPU node the defaults resolve as the driver resolves them.
    assert rep["resources"]["num_workers"] == 8 and rep["resources"]["gpus_per_worker"] == 0.5
    assert kinds["calibration"]["peak_gpu_bytes"] > 0 and kinds["smooth"]["peak_gpu_bytes"] == 0
    assert rep["model"]["dtype_bytes"] == 2  # from config.json: no safetensors here


def test_cost_terms_on_a_known_shape(tmp_path: Path) -> None:
    """The statistics of one layer are one Gram per group: K = 256 for qkv, o and gate_up, 704
    for down; the largest reconstruction is the linear with the largest K² + 2 N K."""
    shape = read_shape(str(_config_dir(tmp_path)))
    assert dict(shape.groups) == {"qkv": 256, "o": 256, "gate_up": 256, "down": 704}
    cost = memory.estimate(shape, num_samples=16, seq_len=128, num_workers=2, gpus_per_worker=0.0,
                           reconstruct_gpus=0.0, rank=32, num_outliers=8)
    k = cost.by_kind()
    stats64 = 8 * (3 * (256**2 + 2 * 256) + 704**2 + 2 * 704)
    assert k["calibration"].terms["stats_fp64"] == stats64
    # The smoothing reads no Gram unless it searches; then every group's sum and one part.
    assert not {"grams", "gram_part"} & set(k["smooth"].terms)
    searching = memory.estimate(shape, 16, 128, 2, 0.0, 0.0, 32, 8, search=True).by_kind()["smooth"]
    assert searching.terms["grams"] == 8 * (3 * 256**2 + 704**2) and searching.terms["gram_part"] == 8 * 704**2
    # A reconstruction task sums its group's parts into one buffer, whatever the worker count.
    eight = memory.estimate(shape, 16, 128, 8, 0.0, 0.0, 32, 8).by_kind()
    for kind in ("smooth", "reconstruct"):
        assert eight[kind].peak_host_bytes == k[kind].peak_host_bytes
    assert k["reconstruct"].terms["gram"] == k["reconstruct"].terms["gram_part"] == 8 * 704**2  # down: K = 704
    assert k["reconstruct"].terms["nk_float64"] == memory.RECONSTRUCT_NK_BUFFERS * 8 * 256 * 704
    # Each worker holds its shard: 8 of 16 samples, inputs and outputs, in the compute dtype:
    # fp32 on a CPU for this bf16 checkpoint, bf16 on a GPU.
    assert k["calibration"].terms["hidden_states"] == 2 * 8 * 128 * 256 * 4
    on_gpu = memory.estimate(shape, 16, 128, 2, 0.5, 0.25, 32, 8).by_kind()
    assert on_gpu["calibration"].terms["hidden_states"] == 2 * 8 * 128 * 256 * 2
    # Each layer once, whatever the worker count; the embedding by each worker and the copy.
    assert cost.bytes_read == 3 * shape.layer_bytes + 2 * shape.embedding_bytes + shape.embed_bytes
    # The object store holds each worker's statistics until the layer's tasks are done.
    assert cost.object_store_bytes_per_layer - memory.estimate(shape, 16, 128, 1, 0.0, 0.0, 32, 8) \
        .object_store_bytes_per_layer == stats64
    # Overlapped, the statistics of the layers still in flight are the actor's pages during its
    # next forward (shared: not reserved); in lockstep they are freed first.
    behind = min(2, shape.num_layers - 1)
    assert behind > 0 and k["calibration"].terms["stats_previous_layers"] == behind * stats64
    lockstep = memory.estimate(shape, 16, 128, 2, 0.0, 0.0, 32, 8, inflight_layers=0).by_kind()
    assert "stats_previous_layers" not in lockstep["calibration"].terms
    assert k["calibration"].peak_host_bytes - lockstep["calibration"].peak_host_bytes == behind * stats64
    assert lockstep["calibration"].private_host_bytes == k["calibration"].private_host_bytes
    assert lockstep["reconstruct"].count == len(shape.linears) and lockstep["smooth"].count == 1
    # A writer's phases: the embedding/head copy, a layer's write, its read; the peak is the
    # largest, and each phase is priced on its own (a process that only copied is not a layer's).
    w = k["writer"]
    assert set(w.phases) == {"write", "copy", "read_layer", "return_layer"}
    assert w.peak_host_bytes == max(w.phases.values()) == w.phases[w.phase]
    assert w.phases["copy"] == memory.BASE_PROCESS_BYTES + 3 * shape.embedding_bytes
    # The driver of a local run times this CPU's matmuls in its preview: counted then only.
    probed = memory.estimate(shape, 16, 128, 2, 0.0, 0.0, 32, 8, rate_probe=True).by_kind()["driver"]
    assert probed.peak_host_bytes - k["driver"].peak_host_bytes == memory.rate_probe_bytes() > 60 * 2**20


def test_gpu_placement_moves_the_terms_to_the_gpu(tmp_path: Path) -> None:
    shape = read_shape(str(_config_dir(tmp_path)))
    cpu = memory.estimate(shape, 16, 128, 1, 0.0, 0.0, 32, 8).by_kind()
    gpu = memory.estimate(shape, 16, 128, 1, 0.5, 0.25, 32, 8).by_kind()
    assert cpu["calibration"].peak_gpu_bytes == 0 and cpu["reconstruct"].peak_gpu_bytes == 0
    for kind, big in (("calibration", "layer_built"), ("reconstruct", "nk_float64")):
        assert big in cpu[kind].terms and big in gpu[kind].terms
        # On the GPU the big buffers leave the host: its peak is the host phase's terms alone.
        assert gpu[kind].peak_gpu_bytes + gpu[kind].peak_host_bytes == sum(gpu[kind].terms.values())
        assert gpu[kind].peak_gpu_bytes >= memory.CUDA_CONTEXT_GPU_BYTES + gpu[kind].terms[big]
        assert gpu[kind].peak_host_bytes < cpu[kind].peak_host_bytes + memory.CUDA_CONTEXT_HOST_BYTES


def test_does_not_fit_says_which_process_and_exits_non_zero(tmp_path: Path, _plan) -> None:
    """A 405B-class layer width on one H100: the GPU shared by a worker and two reconstruction
    tasks cannot hold them."""
    src = _config_dir(tmp_path, hidden_size=16384, intermediate_size=53248, num_attention_heads=128,
                      num_key_value_heads=8, num_hidden_layers=2)
    res = _plan(str(src), "--device-profile", "h100", "--num-samples", "128", "--seq-len", "2048")
    assert res.returncode == 3
    assert "DOES NOT FIT" in res.stdout
    assert "GPU: a calibration worker and the reconstruction tasks sharing its GPU need" in res.stderr
    assert "a GPU has 80 GB" in res.stderr


@pytest.mark.parametrize(
    "setup,message",
    [
        (lambda d: None, "has no config.json: not a Hugging Face checkpoint directory"),
        (lambda d: (d / "config.json").write_text("{not json"), "config.json is not valid JSON"),
        (lambda d: (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8})), "gpt2"),
    ],
    ids=["no-config", "bad-json", "unsupported-architecture"],
)
def test_bad_input_is_one_clear_line(tmp_path: Path, setup, message: str, _plan) -> None:
    d = tmp_path / "src"
    d.mkdir()
    setup(d)
    res = _plan(str(d))
    assert res.returncode != 0
    assert message in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]


def test_driver_refuses_what_no_node_can_hold(tmp_path: Path) -> None:
    shape = read_shape(str(_config_dir(tmp_path)))
    cost = memory.estimate(shape, 16, 128, 1, 0.0, 0.0, 32, 8)
    nodes = [{"Alive": True, "Resources": {"memory": 0.4 * GIB}}, {"Alive": False, "Resources": {"memory": 99 * GIB}}]
    with pytest.raises(ResourceError, match=r"^a calibration process needs 0\.\d GiB of host memory .*the largest "
                                            r"Ray node offers 0\.4 GiB"):
        driver.fit_memory(cost, nodes)
    asked = driver.fit_memory(cost, [{"Alive": True, "Resources": {"memory": 64 * GIB}}])
    assert asked.memory == {p.kind: p.private_host_bytes for p in cost.processes if p.kind != "driver"}
    assert not asked.lockstep


def test_the_layers_go_in_lockstep_when_the_forward_and_the_tasks_do_not_fit_together(tmp_path: Path) -> None:
    """Ray holds an actor's memory for its whole life: with what the actors hold in their forward
    plus the largest task beyond the cluster, a task would wait forever (seen: stories260K, 2
    workers, a 1.3 GiB Ray instance hung). Where each phase fits on its own, the driver runs one
    layer at a time and the actors reserve only what they hold between calls; where not even
    that fits, it refuses before any work."""
    shape = read_shape(str(_config_dir(tmp_path)))
    cost = memory.estimate(shape, 16, 128, 2, 0.0, 0.0, 32, 8)
    kinds = cost.by_kind()
    calib = kinds["calibration"]
    held, idle = 2 * calib.private_host_bytes, 2 * calib.idle_host_bytes
    task = max(kinds[k].private_host_bytes for k in memory.TASK_KINDS)
    assert calib.count == 2 and idle < held
    assert calib.idle_host_bytes == memory.BASE_PROCESS_BYTES + calib.terms["hidden_states"]

    def node(b: float) -> list[dict]:
        return [{"Alive": True, "Resources": {"memory": b}}]

    overlap = driver.fit_memory(cost, node(held + task))
    assert not overlap.lockstep and overlap.memory["calibration"] == calib.private_host_bytes
    step = driver.fit_memory(cost, node(held + task - 1))
    assert step.lockstep and step.memory["calibration"] == calib.idle_host_bytes
    assert step.memory["reconstruct"] == kinds["reconstruct"].private_host_bytes
    assert "one layer at a time" in step.note
    # Not even one phase at a time: the forward alone, or the idle actors beside a task.
    for short in (held - 1, idle + task - 1):
        if short >= max(p.private_host_bytes for p in cost.processes):
            with pytest.raises(ResourceError, match=r"^the run would wait forever: 2 calibration worker\(s\) hold 2 x "
                                                    r"0\.\d GiB of host memory in their forward"):
                driver.fit_memory(cost, node(short))
    # A forward larger than the idle actors and a task together (long sequences: the attention
    # scores exist only in the forward): lockstep cannot help below the forward alone.
    long = memory.estimate(shape, 16, 2048, 2, 0.0, 0.0, 32, 8)
    lk = long.by_kind()
    fwd = 2 * lk["calibration"].private_host_bytes
    assert fwd - 1 > 2 * lk["calibration"].idle_host_bytes + max(lk[k].private_host_bytes for k in memory.TASK_KINDS)
    with pytest.raises(ResourceError, match=r"^the run would wait forever"):
        driver.fit_memory(long, node(fwd - 1))
    assert driver.fit_memory(long, node(fwd)).lockstep
    # Several nodes: the memory of all of them counts (necessary, not sufficient: Ray places).
    assert not driver.fit_memory(cost, node((held + task) / 2) * 2).lockstep
    # aser plan says the same, from the same function.
    assert memory.fit(cost, held + task - 1, held + task - 1).lockstep


def test_make_report_uses_the_profile_and_node_count(tmp_path: Path) -> None:
    shape = read_shape(str(_config_dir(tmp_path)))
    one = make_report(shape, PROFILES["h200"], 1, None, None, None, 16, 128, 32, 8)
    two = make_report(shape, PROFILES["h200"], 2, None, None, None, 16, 128, 32, 8)
    assert two["resources"]["num_workers"] == 16 and one["resources"]["num_workers"] == 8
    assert two["seconds_estimate"]["reconstruct"] < one["seconds_estimate"]["reconstruct"]


def test_a_gpu_worker_still_holds_its_statistics_on_the_host(tmp_path: Path) -> None:
    """collect moves the statistics to the CPU and Ray serializes them there: two fp64 copies on
    the host of a GPU worker, besides the CUDA context's host memory."""
    shape = read_shape(str(_config_dir(tmp_path)))
    calib = memory.estimate(shape, 16, 128, 1, 0.5, 0.25, 32, 8).by_kind()["calibration"]
    stats64 = calib.terms["stats_on_host"]
    assert calib.phase == "return" and stats64 == calib.terms["stats_serialized"]
    assert calib.peak_host_bytes >= memory.BASE_PROCESS_BYTES + memory.CUDA_CONTEXT_HOST_BYTES + 2 * stats64
    # The serialized copy is in the object store: Ray is asked for the rest.
    assert calib.private_host_bytes == calib.peak_host_bytes - stats64 - calib.terms["layer_shared"] \
        - calib.terms["stats_previous_layers"]
