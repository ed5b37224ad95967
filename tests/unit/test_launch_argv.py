"""Dry-run launch plans: exact argv and environment for every engine and option combination (pure)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fdngx.cli import app
from fdngx.engines.argv import LaunchRequest, find_flag
from fdngx.errors import UsageError
from fdngx.launch.plan import Plan, build_plan

PY = sys.executable
INV = Path("/srv/fd/fdngx.json")
LOGS = "/srv/fd/fdngx-logs"
FD_MULTI = [PY, "-m", "fastdeploy.entrypoints.openai.multi_api_server"]
FD_ONE = [PY, "-m", "fastdeploy.entrypoints.openai.api_server"]
SIM = [PY, "-m", "fdngx.cli", "sim"]
GPUS8 = [str(i) for i in range(8)]


def plan(engine: str, n: int, *extra: str, **kw: object) -> Plan:
    return build_plan(LaunchRequest(engine=engine, num_servers=n, extra_args=list(extra), inventory=INV, **kw))


def one(p: Plan) -> tuple[list[str], dict[str, str]]:
    assert len(p.procs) == 1
    return p.procs[0].argv, p.procs[0].env


# -- FastDeploy multi_api_server -------------------------------------------------------------------------


def test_fastdeploy_multi_the_documented_dp8_example() -> None:
    p = plan("fastdeploy", 8, "--max-num-seqs", "64", model="M", gpus=GPUS8)
    argv, env = one(p)
    assert argv == [
        *FD_MULTI,
        "--num-servers", "8",
        "--ports", "8001,8002,8003,8004,8005,8006,8007,8008",
        "--metrics-ports", "9001,9002,9003,9004,9005,9006,9007,9008",
        "--args", "--max-num-seqs", "64",
        "--model", "M", "--host", "127.0.0.1", "--data-parallel-size", "8",
        "--engine-worker-queue-port", "10001,10002,10003,10004,10005,10006,10007,10008",
    ]  # fmt: skip
    assert env == {
        "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7",
        "FD_LOG_DIR": f"{LOGS}/fastdeploy",
        "FD_ENABLE_MULTI_API_SERVER": "1",
    }
    assert p.procs[0].stop_signal == "SIGINT"  # its only clean shutdown path
    assert p.grouped and p.timeout == 1800
    assert [i.max_num_seqs for i in p.inventory.instances] == [64] * 8
    names = [(i.name, i.port, i.metrics_port) for i in p.inventory.instances]
    assert names[:2] == [("dp0", 8001, 9001), ("dp1", 8002, 9002)]
    assert p.inventory.instances[3].extra == {
        "log": f"{LOGS}/multi_api_server.log",
        "fd_log_dir": f"{LOGS}/fastdeploy/log_3",
    }
    assert p.ports == [*range(8001, 8009), *range(9001, 9009), *range(10001, 10009)]


def test_fastdeploy_multi_explicit_ports_and_user_flags_win() -> None:
    p = plan(
        "fastdeploy", 2,
        "--model", "M", "--host", "0.0.0.0", "--data-parallel-size", "2",
        "--engine-worker-queue-port", "25611,25621", "--tensor-parallel-size", "2",
        model="M", gpus=["0", "1", "2", "3"], ports=[1811, 1822], metrics_ports=[3101, 3201],
    )  # fmt: skip
    argv, env = one(p)
    assert argv == [
        *FD_MULTI, "--num-servers", "2", "--ports", "1811,1822", "--metrics-ports", "3101,3201",
        "--args", "--model", "M", "--host", "0.0.0.0", "--data-parallel-size", "2",
        "--engine-worker-queue-port", "25611,25621", "--tensor-parallel-size", "2",
    ]  # fmt: skip
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    assert [i.max_num_seqs for i in p.inventory.instances] == [8, 8]  # FastDeploy's default
    assert p.ports == [1811, 1822, 3101, 3201, 25611, 25621]


def test_fastdeploy_metrics_base_port_and_base_port() -> None:
    argv, _ = one(plan("fastdeploy", 2, model="M", gpus=["0", "1"], base_port=7000, metrics_base_port=7100))
    assert argv[3:9] == ["--num-servers", "2", "--ports", "7000,7001", "--metrics-ports", "7100,7101"]
    assert argv[-2:] == ["--engine-worker-queue-port", "9000,9001"]


def test_fastdeploy_model_from_engine_args_only() -> None:
    argv, _ = one(plan("fastdeploy", 1, "--model=/m/ernie", gpus=["0"]))
    assert argv[-7:] == ["--model=/m/ernie", "--host", "127.0.0.1", "--data-parallel-size", "1",
                         "--engine-worker-queue-port", "10001"]  # fmt: skip


def test_fastdeploy_per_instance_slices_gpus_by_tensor_parallel_size() -> None:
    p = plan("fastdeploy", 2, "--tensor-parallel-size", "2", "--max-num-seqs", "32",
             model="M", gpus=["0", "1", "2", "3"], per_instance=True)  # fmt: skip
    assert [c.name for c in p.procs] == ["dp0", "dp1"]
    assert p.procs[1].argv == [
        *FD_ONE, "--tensor-parallel-size", "2", "--max-num-seqs", "32", "--model", "M", "--host", "127.0.0.1",
        "--port", "8002", "--metrics-port", "9002", "--engine-worker-queue-port", "10002",
    ]  # fmt: skip
    assert [c.env for c in p.procs] == [
        {"CUDA_VISIBLE_DEVICES": "0,1", "FD_LOG_DIR": f"{LOGS}/fastdeploy/dp0"},
        {"CUDA_VISIBLE_DEVICES": "2,3", "FD_LOG_DIR": f"{LOGS}/fastdeploy/dp1"},
    ]
    assert [c.stop_signal for c in p.procs] == ["SIGTERM", "SIGTERM"]
    assert not p.grouped
    assert p.inventory.instances[1].extra == {"log": f"{LOGS}/dp1.log"}
    assert [i.max_num_seqs for i in p.inventory.instances] == [32, 32]


@pytest.mark.parametrize(
    ("extra", "kw", "message"),
    [
        (["--data-parallel-size", "4"], {}, "--data-parallel-size 4 after -- conflicts with --num-servers 8"),
        (["--port", "8000"], {}, "engine argument --port after -- conflicts with fdngx"),
        (["--metrics-port=9000"], {}, "engine argument --metrics-port after -- conflicts"),
        (["--args", "x"], {}, "--args after -- conflicts"),
        (["--ports", "1,2"], {}, "--ports after -- conflicts with fdngx: it is an fdngx launch option"),
        (["--model", "B"], {}, "--model M conflicts with engine argument --model B"),
        (["--engine-worker-queue-port", "1,2"], {}, "lists 2 port(s) but --num-servers is 8"),
        ([], {"model": None}, "--model is required for --engine fastdeploy"),
        ([], {"gpus": None}, "--gpus is required for --engine fastdeploy"),
        ([], {"gpus": ["0", "1"]}, "--gpus lists 2 GPU(s) but 8 replicas x 1 GPU(s) need 8"),
        (["--tensor-parallel-size", "2"], {}, "8 replicas x 2 GPU(s) need 16"),
        ([], {"ports": [1, 2]}, "--ports lists 2 port(s) but --num-servers is 8"),
        ([], {"ports": [8001] * 8, "base_port": 8001}, "--ports and --base-port exclude each other"),
        ([], {"base_port": 65530}, "out of range"),
        ([], {"metrics_base_port": 8003}, "port 8003 is planned twice"),
        ([], {"ports": [8001] * 8}, "port 8001 is planned twice"),
        # Metrics ports 10001.. meet the engine worker queue ports (API port + 2000).
        ([], {"metrics_base_port": 10001}, "port 10001 is planned twice (API, metrics and engine ports together)"),
        ([], {"host": "a b"}, "--host 'a b' is not an IP address"),
        ([], {"restart": "always"}, "--restart must be one of no, on-failure"),
    ],
)
def test_fastdeploy_conflicts_are_clear_usage_errors(extra: list[str], kw: dict, message: str) -> None:
    args = {"model": "M", "gpus": GPUS8, **kw}
    with pytest.raises(UsageError) as err:
        plan("fastdeploy", 8, *extra, **args)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_per_instance_refuses_dp_size_and_queue_ports() -> None:
    with pytest.raises(UsageError, match="conflicts with --per-instance"):
        plan("fastdeploy", 2, "--data-parallel-size", "2", model="M", gpus=["0", "1"], per_instance=True)
    with pytest.raises(UsageError, match="--engine-worker-queue-port after -- conflicts with --per-instance"):
        plan("fastdeploy", 2, "--engine-worker-queue-port", "5,6", model="M", gpus=["0", "1"], per_instance=True)


# -- vLLM and SGLang -------------------------------------------------------------------------------------


def test_vllm_one_serve_per_replica_with_gpu_slices() -> None:
    p = plan("vllm", 2, "-tp", "2", "--max-num-seqs", "128", model="Qwen/Q", gpus=["0", "1", "2", "3"])
    assert [c.argv for c in p.procs] == [
        ["vllm", "serve", "Qwen/Q", "--host", "127.0.0.1", "--port", "8001", "-tp", "2", "--max-num-seqs", "128"],
        ["vllm", "serve", "Qwen/Q", "--host", "127.0.0.1", "--port", "8002", "-tp", "2", "--max-num-seqs", "128"],
    ]
    assert [c.env for c in p.procs] == [{"CUDA_VISIBLE_DEVICES": "0,1"}, {"CUDA_VISIBLE_DEVICES": "2,3"}]
    got = [(i.port, i.metrics_port, i.max_num_seqs) for i in p.inventory.instances]
    assert got == [(8001, 8001, 128), (8002, 8002, 128)]
    assert p.ports == [8001, 8002]


def test_vllm_single_replica_needs_no_gpus_and_user_host_wins() -> None:
    p = plan("vllm", 1, "--host", "0.0.0.0", model="M")
    assert p.procs[0].argv == ["vllm", "serve", "M", "--port", "8001", "--host", "0.0.0.0"]
    assert p.procs[0].env == {}
    assert p.inventory.instances[0].max_num_seqs == 256


@pytest.mark.parametrize(
    ("engine", "extra", "kw", "message"),
    [
        ("vllm", [], {}, "--gpus is required for --engine vllm with 2 replicas"),
        ("vllm", ["--port", "1"], {"gpus": ["0", "1"]}, "--port after -- conflicts"),
        ("vllm", ["-dp", "2"], {"gpus": ["0", "1"]}, "-dp after -- conflicts"),
        ("vllm", [], {"gpus": ["0", "1"], "metrics_base_port": 9000}, "serves metrics on its API port"),
        ("sglang", ["--dp-size", "2"], {"gpus": ["0", "1"]}, "--dp-size after -- conflicts"),
        ("sglang", ["--model-path", "X"], {"gpus": ["0", "1"]}, "conflicts with engine argument --model-path"),
    ],
)
def test_vllm_sglang_conflicts(engine: str, extra: list[str], kw: dict, message: str) -> None:
    with pytest.raises(UsageError) as err:
        plan(engine, 2, *extra, model="M", **kw)
    assert message in str(err.value)


def test_sglang_launch_server_with_metrics_enabled() -> None:
    p = plan("sglang", 2, "--tp-size", "1", "--max-running-requests", "48", model="M", gpus=["4", "5"], base_port=30000)
    assert p.procs[1].argv == [
        PY, "-m", "sglang.launch_server", "--model-path", "M", "--host", "127.0.0.1", "--port", "30001",
        "--enable-metrics", "--tp-size", "1", "--max-running-requests", "48",
    ]  # fmt: skip
    assert p.procs[1].env == {"CUDA_VISIBLE_DEVICES": "5"}
    got = [(i.port, i.metrics_port, i.max_num_seqs) for i in p.inventory.instances]
    assert got == [(30000, 30000, 48), (30001, 30001, 48)]


def test_sglang_user_model_path_and_metrics_flag_not_duplicated() -> None:
    p = plan("sglang", 1, "--model-path", "M", "--enable-metrics")
    assert p.procs[0].argv == [PY, "-m", "sglang.launch_server", "--host", "127.0.0.1", "--port", "8001",
                               "--model-path", "M", "--enable-metrics"]  # fmt: skip


# -- sim -------------------------------------------------------------------------------------------------


def test_sim_one_process_hosts_every_replica() -> None:
    p = plan("sim", 3, "--speed", "1.0,0.5,1.0", "--max-num-seqs", "8,16,8", ports=[5001, 5002, 5003])
    argv, env = one(p)
    assert argv == [*SIM, "--host", "127.0.0.1", "--ports", "5001,5002,5003", "--metrics-ports", "6001,6002,6003",
                    "--speed", "1.0,0.5,1.0", "--max-num-seqs", "8,16,8"]  # fmt: skip
    assert env == {}
    assert p.grouped and p.timeout == 60
    assert [i.max_num_seqs for i in p.inventory.instances] == [8, 16, 8]
    assert [i.engine for i in p.inventory.instances] == ["sim"] * 3


def test_sim_per_instance_splits_per_replica_lists() -> None:
    p = plan("sim", 2, "--speed", "1.0,0.5", "--max-num-seqs", "4", "--seed", "7", per_instance=True, timeout=9)
    assert [c.argv for c in p.procs] == [
        [*SIM, "--host", "127.0.0.1", "--ports", "8001", "--metrics-ports", "9001", "--max-num-seqs", "4",
         "--seed", "7", "--speed", "1.0"],
        [*SIM, "--host", "127.0.0.1", "--ports", "8002", "--metrics-ports", "9002", "--max-num-seqs", "4",
         "--seed", "7", "--speed", "0.5"],
    ]  # fmt: skip
    assert [i.max_num_seqs for i in p.inventory.instances] == [4, 4]
    assert p.timeout == 9


def test_sim_refuses_its_port_flags_and_bad_lists() -> None:
    with pytest.raises(UsageError, match="--ports after -- conflicts"):
        plan("sim", 2, "--ports", "1,2")
    with pytest.raises(UsageError, match="--speed lists 3 values but --num-servers is 2"):
        plan("sim", 2, "--speed", "1,1,1")


# -- helpers, serialisation, CLI -------------------------------------------------------------------------


def test_find_flag_forms_and_last_wins() -> None:
    assert find_flag(["--a", "1", "--b=2", "--a=3"], "--a") == ("--a", "3")
    assert find_flag(["--ab", "1"], "--a") is None
    with pytest.raises(UsageError, match="has no value"):
        find_flag(["--a"], "--a")


def test_plan_round_trips_for_the_detached_supervisor() -> None:
    p = plan("fastdeploy", 2, "--max-num-seqs", "3", model="M", gpus=["0", "1"])
    again = Plan.from_dict(json.loads(json.dumps(p.to_dict())))
    assert again.to_dict() == p.to_dict()
    assert again.pidfile == "/srv/fd/fdngx.json.pid"


def test_cli_dry_run_prints_command_env_and_inventory(tmp_path: Path) -> None:
    inv = tmp_path / "inv.json"
    result = CliRunner().invoke(
        app,
        ["launch", "--dry-run", "--engine", "fastdeploy", "--num-servers", "2", "--gpus", "0,1", "--model", "M",
         "--inventory", str(inv), "--", "--max-num-seqs", "64"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (
        f"CUDA_VISIBLE_DEVICES=0,1 FD_LOG_DIR={tmp_path}/fdngx-logs/fastdeploy FD_ENABLE_MULTI_API_SERVER=1 {PY} -m "
        "fastdeploy.entrypoints.openai.multi_api_server --num-servers 2 --ports 8001,8002 --metrics-ports 9001,9002 "
        "--args --max-num-seqs 64 --model M --host 127.0.0.1 --data-parallel-size 2 "
        "--engine-worker-queue-port 10001,10002\n"
    ) in result.output
    body = result.output[result.output.index("{") :]
    doc = json.loads(body[: body.rindex("}") + 1])
    assert [i["max_num_seqs"] for i in doc["instances"]] == [64, 64]
    assert not inv.exists()  # a dry run writes nothing


def test_cli_rejects_unknown_options_before_the_separator() -> None:
    result = CliRunner().invoke(app, ["launch", "--dry-run", "--engine", "sim", "-n", "1", "--gpu", "0"])
    assert result.exit_code == 2


def test_cli_says_which_engine_when_defaulting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("fdngx.launch.run.fastdeploy_installed", lambda: False)
    result = CliRunner().invoke(app, ["launch", "--dry-run", "-n", "1", "-i", str(tmp_path / "f.json")])
    assert result.exit_code == 0
    assert "no --engine given and FastDeploy is not installed here: using --engine sim" in result.output
    assert f"{PY} -m fdngx.cli sim --host 127.0.0.1 --ports 8001 --metrics-ports 9001" in result.output
