"""Dry-run launch plans: exact argv and environment for every engine and option combination (pure)."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any

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


def test_fastdeploy_multi_api_server_sees_exactly_tp_times_n_gpus() -> None:
    # FastDeploy 2.x asserts len(CUDA_VISIBLE_DEVICES) == tp x dp: GPUs listed beyond it are not passed.
    p = plan("fastdeploy", 2, "--tensor-parallel-size", "2", model="M", gpus=[str(g) for g in range(8)],
             ports=[1811, 1822], metrics_ports=[3101, 3201])
    assert one(p)[1]["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    with pytest.raises(UsageError, match="lists 3 GPU"):
        plan("fastdeploy", 2, "--tensor-parallel-size", "2", model="M", gpus=["0", "1", "2"])


def test_fastdeploy_metrics_base_port_and_base_port() -> None:
    argv, _ = one(plan("fastdeploy", 2, model="M", gpus=["0", "1"], base_port=7000, metrics_base_port=7100))
    assert argv[3:9] == ["--num-servers", "2", "--ports", "7000,7001", "--metrics-ports", "7100,7101"]
    assert argv[-2:] == ["--engine-worker-queue-port", "9000,9001"]


def test_fastdeploy_model_from_engine_args_only() -> None:
    argv, _ = one(plan("fastdeploy", 1, "--model=/m/ernie", gpus=["0"]))
    # The = form of a flag fdngx reads reaches multi_api_server as two tokens (it matches exact tokens).
    assert argv[-8:] == ["--model", "/m/ernie", "--host", "127.0.0.1", "--data-parallel-size", "1",
                         "--engine-worker-queue-port", "10001"]  # fmt: skip


def test_fastdeploy_per_instance_slices_gpus_by_tensor_parallel_size() -> None:
    p = plan("fastdeploy", 2, "--tensor-parallel-size", "2", "--max-num-seqs", "32",
             model="M", gpus=["0", "1", "2", "3"], per_instance=True)  # fmt: skip
    assert [c.name for c in p.procs] == ["dp0", "dp1"]
    assert p.procs[1].argv == [
        *FD_ONE, "--tensor-parallel-size", "2", "--max-num-seqs", "32", "--model", "M", "--host", "127.0.0.1",
        "--port", "8002", "--metrics-port", "9002", "--engine-worker-queue-port", "10002",
        "--cache-queue-port", "11002",
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


def test_per_instance_gives_each_api_server_its_own_cache_queue_port() -> None:
    """Older FastDeploy defaults every api_server to cache queue port 8003 (fastdeploy/engine/args_utils.py,
    EngineArgs.cache_queue_port): with prefix caching on, the second replica could not start. Each gets its
    API port + 3000, checked free with the other planned ports; a port past 65535 is refused at once."""
    p = plan("fastdeploy", 3, model="M", gpus=["0", "1", "2"], per_instance=True)
    cache = [c.argv[c.argv.index("--cache-queue-port") + 1] for c in p.procs]
    assert cache == ["11001", "11002", "11003"]
    assert {11001, 11002, 11003} <= set(p.ports)
    assert all(c.argv.count("--cache-queue-port") == 1 for c in p.procs)
    with pytest.raises(UsageError) as err:
        plan("fastdeploy", 2, model="M", gpus=["0", "1"], per_instance=True, ports=[62000, 62536])
    assert str(err.value) == ("--cache-queue-port 65536 (API port + 3000) is out of range: lower --ports/--base-port")
    with pytest.raises(UsageError, match="port 11001 is planned twice"):
        plan("fastdeploy", 2, model="M", gpus=["0", "1"], per_instance=True, metrics_base_port=11001)
    # multi_api_server (newer builds) fills its per-rank list with free ports: fdngx adds none there.
    assert "--cache-queue-port" not in one(plan("fastdeploy", 2, model="M", gpus=["0", "1"]))[0]


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


def test_name_prefix_renames_every_instance_and_what_each_process_serves() -> None:
    p = plan("sim", 2, per_instance=True, name_prefix="node1-")
    assert [i.name for i in p.inventory.instances] == ["node1-dp0", "node1-dp1"]
    assert [c.instances for c in p.procs] == [["node1-dp0"], ["node1-dp1"]]
    assert [c.argv for c in p.procs] == [c.argv for c in plan("sim", 2, per_instance=True).procs]  # names only
    with pytest.raises(UsageError, match="--name-prefix 'a b'"):
        plan("sim", 2, name_prefix="a b")


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


# -- issue 11: -tp, the = form, controller ports, per-rank port lists ----------------------------------------


def test_fastdeploy_tp_alias_slices_gpus_in_both_forms() -> None:
    for tp in (["-tp", "2"], ["-tp=2"], ["--tensor-parallel-size=2"]):
        p = plan("fastdeploy", 2, *tp, model="M", gpus=["0", "1", "2", "3"], per_instance=True)
        assert [c.env["CUDA_VISIBLE_DEVICES"] for c in p.procs] == ["0,1", "2,3"], tp
        assert p.procs[0].argv[3:5] == [tp[0].split("=")[0], "2"]  # two tokens, whatever the user wrote
    with pytest.raises(UsageError, match="8 replicas x 2 GPU"):
        plan("fastdeploy", 8, "-tp", "2", model="M", gpus=GPUS8)


def test_fastdeploy_equals_form_queue_ports_reach_multi_api_server_as_two_tokens() -> None:
    p = plan("fastdeploy", 2, "--engine-worker-queue-port=25611,25621", "--cache-queue-port=25612,25622",
             model="M", gpus=["0", "1"])  # fmt: skip
    argv, _ = one(p)
    tail = argv[argv.index("--args") + 1 :]
    assert tail[:4] == ["--engine-worker-queue-port", "25611,25621", "--cache-queue-port", "25612,25622"]
    assert not any(t.startswith("--engine-worker-queue-port=") for t in argv)
    assert tail.count("--engine-worker-queue-port") == 1  # fdngx adds none of its own
    # The user's ports are the ones recorded and checked free.
    assert p.ports == [8001, 8002, 9001, 9002, 25611, 25621, 25612, 25622]


def test_two_token_only_touches_the_named_flags_and_stops_at_the_separator() -> None:
    from fdngx.engines.argv import two_token

    got = two_token(["--a=1", "--b=x=y", "--c=2", "--", "--a=3"], "--a", "--b")
    assert got == ["--a", "1", "--b", "x=y", "--c=2", "--", "--a=3"]


@pytest.mark.parametrize(
    ("extra", "kw", "message"),
    [
        (["--cache-queue-port", "1,2,3"], {}, "--cache-queue-port lists 3 port(s) but --num-servers is 2"),
        # One per GPU of every rank (fastdeploy/config.py local_rdma_comm_ports).
        (["--rdma-comm-ports", "5,6"], {"gpus": ["0", "1", "2", "3"], "extra": ["-tp", "2"]},
         "--rdma-comm-ports lists 2 port(s) but --num-servers is 2 x --tensor-parallel-size 2"),
        (["--rdma-comm-ports=5,6"], {"per_instance": True}, "--rdma-comm-ports after -- conflicts with --per-instance"),
        (["--pd-comm-port=5,6"], {"per_instance": True}, "--pd-comm-port after -- conflicts with --per-instance"),
        (["--engine-worker-queue-port=5,6"], {"per_instance": True}, "conflicts with --per-instance"),
        ([], {"controller_ports": [7001]}, "--controller-ports lists 1 port(s) but --num-servers is 2"),
        ([], {"controller_ports": [9001, 9002]}, "port 9001 is planned twice"),
        (["--controller-ports", "1,2"], {}, "--controller-ports after -- conflicts with fdngx"),
        (["--controller-port=7"], {}, "--controller-port after -- conflicts with fdngx"),
        ([], {"per_instance": True, "dp_mode": "moe"}, "--per-instance conflicts with --dp-mode moe"),
    ],
)
def test_fastdeploy_port_list_refusals(extra: list[str], kw: dict, message: str) -> None:
    more = kw.pop("extra", [])
    with pytest.raises(UsageError) as err:
        plan("fastdeploy", 2, *extra, *more, **{"model": "M", "gpus": ["0", "1"], **kw})
    assert message in str(err.value)


def test_fastdeploy_rdma_ports_one_per_gpu_of_every_rank_are_checked_free() -> None:
    p = plan("fastdeploy", 2, "--rdma-comm-ports", "8310,8311,8320,8321", "-tp", "2", model="M",
             gpus=["0", "1", "2", "3"], ports=[1811, 1822], metrics_ports=[3101, 3201])
    assert {8310, 8311, 8320, 8321} <= set(p.ports)


def test_fastdeploy_controller_ports_one_per_server() -> None:
    p = plan("fastdeploy", 2, model="M", gpus=["0", "1"], controller_ports=[7001, 7002])
    argv, _ = one(p)
    assert argv[3:11] == ["--num-servers", "2", "--ports", "8001,8002", "--metrics-ports", "9001,9002",
                          "--controller-ports", "7001,7002"]  # fmt: skip
    assert argv.index("--controller-ports") < argv.index("--args")  # a multi_api_server option, not a child flag
    assert p.ports == [8001, 8002, 9001, 9002, 10001, 10002, 7001, 7002]
    assert [i.extra["controller_port"] for i in p.inventory.instances] == [7001, 7002]
    per = plan("fastdeploy", 2, model="M", gpus=["0", "1"], controller_ports=[7001, 7002], per_instance=True)
    assert [c.argv[-2:] for c in per.procs] == [["--controller-port", "7001"], ["--controller-port", "7002"]]
    assert 7002 in per.ports


@pytest.mark.parametrize("engine", ["vllm", "sglang", "sim"])
def test_controller_ports_and_router_are_fastdeploy_only(engine: str) -> None:
    with pytest.raises(UsageError, match="--controller-ports is a FastDeploy option"):
        plan(engine, 1, model="M", controller_ports=[7001])
    with pytest.raises(UsageError, match=f"--router: --engine {engine} does not register"):
        plan(engine, 1, model="M", router="http://127.0.0.1:9000")


def test_multi_api_server_stops_and_dies_with_sigint_others_with_sigterm() -> None:
    from fdngx.launch.children import Child

    multi = plan("fastdeploy", 2, model="M", gpus=["0", "1"]).procs[0]
    single = plan("fastdeploy", 2, model="M", gpus=["0", "1"], per_instance=True).procs[0]
    assert Child(multi).death_signal == signal.SIGINT  # it handles only KeyboardInterrupt
    assert Child(single).death_signal == signal.SIGTERM
    assert Child(plan("vllm", 1, model="M").procs[0]).death_signal == signal.SIGTERM


# -- issue 11: MoE data parallelism -----------------------------------------------------------------------


def test_vllm_moe_one_serve_per_rank_as_its_external_load_balancing_docs_say() -> None:
    p = plan("vllm", 2, "--enable-expert-parallel", model="deepseek", gpus=["0", "1"], dp_mode="moe")
    assert [c.argv for c in p.procs] == [
        ["vllm", "serve", "deepseek", "--host", "127.0.0.1", "--port", "8001", "--data-parallel-size", "2",
         "--data-parallel-rank", "0", "--enable-expert-parallel"],
        ["vllm", "serve", "deepseek", "--host", "127.0.0.1", "--port", "8002", "--data-parallel-size", "2",
         "--data-parallel-rank", "1", "--enable-expert-parallel"],
    ]  # fmt: skip
    assert [c.env for c in p.procs] == [{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}]
    assert p.coupled and not p.grouped
    assert p.ports == [8001, 8002, 29550]  # rank 0's data-parallel RPC port (vLLM's default) must be free too
    assert "ranks of one data-parallel group" in p.describe()
    # The user's own size (equal to --num-servers) and RPC port are kept, not repeated.
    q = plan("vllm", 2, "-dp", "2", "--data-parallel-rpc-port=13345", "-tp", "2", model="M", gpus=GPUS8[:4],
             dp_mode="moe")  # fmt: skip
    assert q.procs[1].argv[5:9] == ["--port", "8002", "--data-parallel-rank", "1"]
    assert q.procs[1].env == {"CUDA_VISIBLE_DEVICES": "2,3"}
    assert q.ports == [8001, 8002, 13345]
    # One rank per `vllm serve` said outright, as vLLM's own external-LB tests do: that is this layout.
    r = plan("vllm", 2, "--data-parallel-size-local", "1", model="M", gpus=GPUS8[:2], dp_mode="moe")
    argv = r.procs[1].argv
    assert argv[argv.index("--data-parallel-size-local") + 1] == "1"
    assert argv[argv.index("--data-parallel-rank") + 1] == "1"


@pytest.mark.parametrize(
    ("engine", "extra", "kw", "message"),
    [
        ("vllm", ["-dp", "4"], {"dp_mode": "moe"}, "--data-parallel-size 4 after -- conflicts with --num-servers 2"),
        ("vllm", ["--data-parallel-rank", "0"], {"dp_mode": "moe"}, "--data-parallel-rank after -- conflicts"),
        ("vllm", ["--headless"], {"dp_mode": "moe"}, "not vLLM's internal or hybrid load balancer"),
        ("vllm", ["-dpl", "2"], {"dp_mode": "moe"}, "-dpl after -- conflicts"),
        ("vllm", ["--data-parallel-size-local=4"], {"dp_mode": "moe"}, "--data-parallel-size-local after -- conf"),
        ("vllm", ["--data-parallel-size", "2"], {}, "use --dp-mode moe"),
        ("sglang", ["--dp-size", "2"], {}, "use --dp-mode moe"),
        ("sglang", ["--enable-dp-attention"], {}, "needs --dp-size, which fdngx sets with --dp-mode moe"),
        ("sglang", ["--tp", "3"], {"dp_mode": "moe"}, "--tp-size (3) to be a multiple of the DP size"),
        ("sglang", ["--dp", "4"], {"dp_mode": "moe"}, "--dp-size 4 after -- conflicts with --num-servers 2"),
        ("sglang", [], {"dp_mode": "moe", "ports": [1, 2]}, "give one port in --ports, got 2"),
    ],
)
def test_moe_refusals_are_clear(engine: str, extra: list[str], kw: dict, message: str) -> None:
    with pytest.raises(UsageError) as err:
        plan(engine, 2, *extra, **{"model": "M", "gpus": ["0", "1"], **kw})
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_moe_needs_two_ranks() -> None:
    with pytest.raises(UsageError, match="needs --num-servers 2 or more"):
        plan("vllm", 1, model="M", dp_mode="moe")
    with pytest.raises(UsageError, match="dp-size > 1"):
        plan("sglang", 1, model="M", dp_mode="moe")


def test_sglang_moe_is_one_dp_attention_server_with_one_endpoint() -> None:
    p = plan("sglang", 4, "--tp", "8", model="deepseek", gpus=GPUS8, dp_mode="moe", base_port=30000)
    argv, env = one(p)
    assert argv == [PY, "-m", "sglang.launch_server", "--model-path", "deepseek", "--host", "127.0.0.1",
                    "--port", "30000", "--dp-size", "4", "--enable-dp-attention", "--enable-metrics",
                    "--tp", "8"]  # fmt: skip
    assert env == {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
    [inst] = p.inventory.instances  # SGLang balances its ranks itself, behind this one endpoint
    assert (inst.name, inst.port, inst.metrics_port) == ("dp0", 30000, 30000)
    assert inst.extra["dp_ranks"] == 4 and inst.extra["capacity_guessed"] is True
    assert p.grouped and p.ports == [30000]
    # Without a --tp-size, the DP size is the TP size (one GPU per rank).
    q = plan("sglang", 2, "--max-running-requests", "64", model="M", dp_mode="moe")
    assert one(q)[0][9:15] == ["--tp-size", "2", "--dp-size", "2", "--enable-dp-attention", "--enable-metrics"]
    assert "capacity_guessed" not in q.inventory.instances[0].extra
    assert q.inventory.instances[0].max_num_seqs == 64


def test_dp_mode_independent_is_per_instance_for_fastdeploy_and_sim() -> None:
    a = plan("fastdeploy", 2, model="M", gpus=["0", "1"], dp_mode="independent")
    b = plan("fastdeploy", 2, model="M", gpus=["0", "1"], per_instance=True)
    assert a.to_dict() == b.to_dict()
    assert [c.name for c in plan("sim", 2, dp_mode="independent").procs] == ["dp0", "dp1"]
    assert [c.name for c in plan("sim", 2, dp_mode="moe").procs] == ["sim"]
    with pytest.raises(UsageError, match="--per-instance conflicts with --dp-mode moe"):
        plan("sim", 2, dp_mode="moe", per_instance=True)


def test_guessed_capacity_is_marked_in_the_inventory() -> None:
    guessed = plan("vllm", 1, model="M").inventory.instances[0]
    assert guessed.max_num_seqs == 256 and guessed.extra["capacity_guessed"] is True
    assert "capacity_guessed" not in plan("vllm", 1, "--max-num-seqs=512", model="M").inventory.instances[0].extra
    assert plan("sglang", 1, model="M").inventory.instances[0].extra["capacity_guessed"] is True
    # FastDeploy's default (8) and the simulator's are known settings, not guesses.
    assert "capacity_guessed" not in plan("fastdeploy", 1, model="M", gpus=["0"]).inventory.instances[0].extra
    assert "capacity_guessed" not in plan("sim", 1).inventory.instances[0].extra


# -- --router, --host, --advertise-host (FastDeploy's registration self-check) ---------------------------


def resolver(address: str | None, name: str = "gpu-node-7") -> Any:
    from fdngx.launch.hosts import SelfName

    calls: list[int] = []

    def resolve() -> SelfName:
        calls.append(1)
        return SelfName(name, address, None if address else "Name or service not known")

    resolve.calls = calls  # type: ignore[attr-defined]
    return resolve


@pytest.mark.parametrize(
    ("host", "advertise", "router", "address", "bind", "named", "warns"),
    [
        # No router: 127.0.0.1 unless told; the resolver is not even asked.
        (None, None, None, None, "127.0.0.1", "127.0.0.1", []),
        ("0.0.0.0", None, None, None, "0.0.0.0", "0.0.0.0", []),
        (None, "10.1.2.3", None, None, "127.0.0.1", "10.1.2.3", ["listen on 127.0.0.1 only"]),
        # Router: listen on every address, name the resolved one.
        (None, None, "10.0.0.5:9000", "192.168.1.20", "0.0.0.0", "192.168.1.20", []),
        (None, "gw.example.org", "10.0.0.5:9000", "192.168.1.20", "0.0.0.0", "gw.example.org", []),
        ("192.168.1.20", None, "10.0.0.5:9000", "192.168.1.20", "192.168.1.20", "192.168.1.20", []),
        # The Debian case: the name resolves to 127.0.1.1; a 127.0.0.1 bind never passes FastDeploy's check.
        ("127.0.0.1", None, "http://127.0.0.1:9000", "127.0.1.1", "127.0.0.1", "127.0.0.1",
         ["FastDeploy checks http://127.0.1.1:PORT/health", "use --host 0.0.0.0 or --host 127.0.1.1"]),
        ("127.0.0.1", None, "http://127.0.0.1:9000", "192.168.1.20", "127.0.0.1", "127.0.0.1",
         ["gpu-node-7 resolves to 192.168.1.20", "no replica will ever register"]),
        # A loopback registration address is useless to a router on another machine.
        (None, None, "http://10.0.0.5:9000", "127.0.1.1", "0.0.0.0", "127.0.1.1",
         ["registers host_ip 127.0.1.1", "router on 10.0.0.5 cannot reach"]),
        (None, None, "http://127.0.0.1:9000", "127.0.1.1", "0.0.0.0", "127.0.1.1", []),
    ],
)
def test_host_decision(host: str | None, advertise: str | None, router: str | None, address: str | None,
                       bind: str, named: str, warns: list[str]) -> None:  # fmt: skip
    from fdngx.launch.hosts import decide

    resolve = resolver(address)
    got = decide(host, advertise, router, resolve)
    assert (got.bind, got.advertise) == (bind, named)
    text = " | ".join(got.warnings)
    assert all(w in text for w in warns), text
    assert bool(got.warnings) == bool(warns)
    assert all("\n" not in w for w in got.warnings)
    assert bool(resolve.calls) == (router is not None)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("host", "advertise", "router", "message"),
    [
        (None, None, "http://10.0.0.5:9000", "'gpu-node-7' does not resolve"),
        (None, None, " ", "must be a URL"),
        (None, None, "http://:9000", "must be a URL"),
        (None, "0.0.0.0", None, "not a wildcard"),
        ("a b", None, None, "--host 'a b' is not an IP address"),
        (None, "x;y", None, "--advertise-host 'x;y' is not an IP address"),
    ],
)
def test_host_decision_refusals(host: str | None, advertise: str | None, router: str, message: str) -> None:
    from fdngx.launch.hosts import decide

    with pytest.raises(UsageError, match=message):
        decide(host, advertise, router, resolver(None))


def test_fastdeploy_router_plan_binds_everywhere_and_names_the_resolved_address() -> None:
    req = LaunchRequest(engine="fastdeploy", num_servers=2, model="M", gpus=["0", "1"], inventory=INV,
                        router="http://10.0.0.5:9000")  # fmt: skip
    p = build_plan(req, resolve=resolver("192.168.1.20"))
    argv, _ = one(p)
    assert argv[argv.index("--args") + 1 :][:6] == ["--model", "M", "--host", "0.0.0.0", "--router",
                                                     "http://10.0.0.5:9000"]  # fmt: skip
    assert [i.host for i in p.inventory.instances] == ["192.168.1.20"] * 2
    assert p.bind_host == "0.0.0.0" and p.warnings == []
    assert Plan.from_dict(json.loads(json.dumps(p.to_dict()))).bind_host == "0.0.0.0"
    # FastDeploy's own --router after -- is the same thing (and is not passed twice).
    q = build_plan(LaunchRequest(engine="fastdeploy", num_servers=1, model="M", gpus=["0"], inventory=INV,
                                 extra_args=["--router=10.0.0.5:9000"]), resolve=resolver("192.168.1.20"))
    tail = one(q)[0]
    assert tail.count("--router") == 1 and q.inventory.instances[0].host == "192.168.1.20"
    with pytest.raises(UsageError, match="--router http://a:1 conflicts with engine argument --router b:2"):
        build_plan(LaunchRequest(engine="fastdeploy", num_servers=1, model="M", gpus=["0"], router="http://a:1",
                                 extra_args=["--router", "b:2"]), resolve=resolver("192.168.1.20"))


@pytest.mark.parametrize("engine", ["fastdeploy", "vllm", "sglang", "sim"])
def test_engine_host_after_dashdash_is_where_fdngx_probes_and_what_the_inventory_names(engine: str) -> None:
    """The engine listens where its own --host says: fdngx probes there and names it, as if given before --."""
    kw: dict[str, object] = {} if engine == "sim" else {"model": "M", "gpus": ["0", "1"]}
    p = plan(engine, 2, "--host", "127.0.0.2", **kw)
    assert p.bind_host == "127.0.0.2"
    assert [i.host for i in p.inventory.instances] == ["127.0.0.2"] * 2
    assert all(proc.argv.count("--host") == 1 for proc in p.procs)
    assert plan(engine, 2, "--host=127.0.0.1", host="127.0.0.1", **kw).bind_host == "127.0.0.1"
    conflict = r"--host 127\.0\.0\.1 conflicts with engine argument --host 127\.0\.0\.2 after --"
    with pytest.raises(UsageError, match=conflict):
        plan(engine, 2, "--host", "127.0.0.2", host="127.0.0.1", **kw)
    with pytest.raises(UsageError, match="--host 'a;b' is not an IP address"):
        plan(engine, 2, "--host", "a;b", **kw)


def test_cli_router_warning_is_one_line_on_stderr(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("fdngx.launch.plan.resolve_self", resolver("127.0.1.1", "debian"))
    result = CliRunner().invoke(
        app,
        ["launch", "--dry-run", "--engine", "fastdeploy", "-n", "1", "--gpus", "0", "--model", "M",
         "--host", "127.0.0.1", "--router", "127.0.0.1:9000", "--inventory", str(tmp_path / "f.json")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("fdngx: warning:")]
    assert len(warnings) == 1
    assert "FastDeploy checks http://127.0.1.1:PORT/health" in warnings[0]
    assert "--host 127.0.0.1 --router 127.0.0.1:9000" in result.output


# -- progress off a terminal -------------------------------------------------------------------------------


def test_progress_says_it_is_still_waiting_every_30s_off_a_terminal() -> None:
    import io

    from fdngx.launch.progress import Progress

    now = [0.0]
    out = io.StringIO()
    prog = Progress(["dp0", "dp1"], out, timeout=1800, clock=lambda: now[0])
    waiting = {"dp0": "not listening yet", "dp1": "not listening yet"}
    prog.update(waiting)
    assert out.getvalue().count("\n") == 2  # the first sight of each
    for t in (10.0, 29.0):
        now[0] = t
        prog.update(waiting)
    assert "still waiting" not in out.getvalue()
    now[0] = 30.5
    prog.update(waiting)
    assert "fdngx: still waiting after 30s of 1800s: 0/2 healthy; dp0: not listening yet, dp1: not listening yet\n" \
        in out.getvalue()
    now[0] = 45.0
    prog.update({"dp0": "healthy", "dp1": "HTTP 404"})  # a change is a line of its own, and resets the clock
    now[0] = 70.0
    prog.update({"dp0": "healthy", "dp1": "HTTP 404"})
    assert out.getvalue().count("still waiting") == 1
    now[0] = 75.5
    prog.update({"dp0": "healthy", "dp1": "HTTP 404"})
    assert out.getvalue().rstrip().endswith("still waiting after 76s of 1800s: 1/2 healthy; dp1: HTTP 404")
    now[0] = 200.0
    prog.update({"dp0": "healthy", "dp1": "healthy"})
    now[0] = 400.0
    prog.update({"dp0": "healthy", "dp1": "healthy"})  # nothing pending: nothing to say
    assert out.getvalue().count("still waiting") == 2


def test_progress_on_a_terminal_redraws_instead() -> None:
    import io

    from fdngx.launch.progress import Progress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    now = [0.0]
    out = Tty()
    prog = Progress(["dp0"], out, clock=lambda: now[0])
    for t in (0.0, 31.0, 62.0):
        now[0] = t
        prog.update({"dp0": "not listening yet"})
    assert "still waiting" not in out.getvalue() and "\r\x1b[K[" in out.getvalue()


# -- typed values: health, pidfile -------------------------------------------------------------------------


def test_health_results_are_typed_and_read_well() -> None:
    from fdngx.launch.probe import Health, HealthState

    assert Health(HealthState.HEALTHY, 200).ok
    assert not Health(HealthState.HTTP_STATUS, 404).ok
    assert [str(h) for h in (
        Health(HealthState.HEALTHY, 200), Health(HealthState.NOT_LISTENING), Health(HealthState.HTTP_STATUS, 304),
        Health(HealthState.TIMEOUT, detail="2s"), Health(HealthState.ERROR, detail="No route to host"),
    )] == ["healthy", "not listening yet", "HTTP 304", "no answer in 2s", "No route to host"]  # fmt: skip


def pidfile_doc() -> dict:
    return {
        "supervisor": {"pid": 4242, "start": 99}, "state": "ready", "detached": True, "engine": "sim",
        "inventory": "/srv/fdngx.json", "grace": 5,
        "children": [{"name": "sim", "pid": 4243, "start": 100, "stop_signal": "SIGINT", "instances": ["dp0"],
                      "state": "running", "members": [[4250, 120], [4251, 121]]}],
        "instances": {"dp0": "healthy"}, "unwritten": {"/srv/fdngx.json": "No space left on device"},
    }  # fmt: skip


def test_pidfile_round_trips_typed(tmp_path: Path) -> None:
    from fdngx.launch.pidfile import ChildState, LaunchState, read_pidfile, write_pidfile

    path = tmp_path / "f.json.pid"
    path.write_text(json.dumps(pidfile_doc()))
    rec = read_pidfile(path)
    assert rec is not None
    assert rec.state is LaunchState.READY and rec.children[0].state is ChildState.RUNNING
    assert rec.children[0].members == {4250: 120, 4251: 121}
    assert rec.supervisor.pid == 4242 and rec.grace == 5.0
    assert rec.unwritten == {"/srv/fdngx.json": "No space left on device"}
    write_pidfile(path, rec)
    assert read_pidfile(path) == rec
    assert read_pidfile(tmp_path / "none.pid") is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["supervisor"].update(pid=0), "supervisor.pid must be a pid"),
        (lambda d: d["supervisor"].update(pid="12"), "supervisor.pid must be a non-negative integer"),
        (lambda d: d["supervisor"].update(start=True), "supervisor.start must be a non-negative integer"),
        (lambda d: d.update(state="exploded"), "state must be one of starting, ready, failed"),
        (lambda d: d["children"][0].update(stop_signal="SIGKILL"), "children[0].stop_signal must be one of"),
        (lambda d: d["children"][0].update(pid=-1), "children[0].pid must be"),
        (lambda d: d["children"][0].update(members=[[1]]), "children[0].members[0] must be [pid, start time]"),
        (lambda d: d["children"][0].update(members=[[0, 5]]), "children[0].members[0] must be a pid"),
        (lambda d: d.update(children={}), "children must be a list"),
        (lambda d: d.update(grace=1e9), "grace must be 0..3600 seconds"),
        (lambda d: d.update(engine="ollama"), "engine must be one of"),
        (lambda d: d.update(unwritten=["/srv/fdngx.json"]), "unwritten must be an object"),
        (lambda d: d.update(unwritten={"/srv/fdngx.json": 28}), "unwritten./srv/fdngx.json must be a string"),
    ],
)
def test_pidfile_is_validated_on_load(tmp_path: Path, change: Any, message: str) -> None:
    from fdngx.errors import LaunchError
    from fdngx.launch.pidfile import read_pidfile

    doc = pidfile_doc()
    change(doc)
    path = tmp_path / "f.json.pid"
    path.write_text(json.dumps(doc))
    with pytest.raises(LaunchError) as err:
        read_pidfile(path)
    assert f"{path}: pidfile field {message}" in str(err.value)


def test_pidfile_garbage_is_one_error_naming_the_absolute_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fdngx.errors import LaunchError
    from fdngx.launch.pidfile import read_pidfile

    monkeypatch.chdir(tmp_path)
    for text in ("{not json", "[1, 2]", "[" * 100_000):
        Path("f.json.pid").write_text(text)
        with pytest.raises(LaunchError) as err:
            read_pidfile("f.json.pid")
        assert str(err.value).startswith(f"{tmp_path}/f.json.pid: ")
