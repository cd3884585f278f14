"""``--backend ray`` on a two-node Ray cluster on this machine (one CPU each): the same summary.json as the
local backend for fnn, tfn and depth_sweep (its raised-precision column included), a node killed mid-sweep
loses and duplicates nothing, a driver killed mid-sweep is finished by ``--resume`` (on the local backend),
and asking for Ray without it installed is a one-line error naming the extra."""

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from verification import fnn

ROOT = Path(__file__).resolve().parents[2]

SMALL = ["--quick", "--width", "4", "--seeds", "1", "--iterations", "30", "--no-figure"]

CASES = {
    "fnn": ["--ranks", "1,2", "--chunk", "2"],
    "tfn": ["--ranks", "1,2", "--seq-len", "3", "--frozen", "random", "--chunk", "2"],
    # depth 6: blocks of more than 4 layers, their constructions at raised precision (mpmath)
    "depth_sweep": ["--depths", "6", "--ranks", "1", "--frozen", "random", "--workers", "1"],
}

#: the sweep the kill tests interrupt: one run per task, 24 tasks of 400 steps (about 5 s of training on
#: 2 cores), so that the kill after the first record lands mid-sweep however fast the machine is. (It was 8
#: tasks of 100 steps under --quick, which forces 100 steps: on an idle machine the whole sweep finished
#: between the first record and the kill.)
KILLED = ["--width", "4", "--seeds", "1", "--iterations", "400", "--no-figure", "--ranks", "1,2", "--frozen", "random"]
KILLED += ["--chunk", "1"]


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _ids(out: Path) -> list:
    return [json.loads(line)["id"] for line in (out / "runs.jsonl").read_text().splitlines() if line.strip()]


def _losses(out: Path) -> dict:
    recs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines() if line.strip()]
    return {r["id"]: r["losses"] for r in recs}


def test_ray_without_ray_installed_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    out = tmp_path / "x"
    assert fnn.main(SMALL + ["--backend", "ray", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    message = '--backend ray needs Ray, which is not installed: pip install -e ".[cluster]"'
    assert err == [f"python -m verification.fnn: error: {message}"]
    assert not out.exists()


def test_pretraining_and_paper_refuse_ray_without_it_in_one_line(tmp_path, capsys, monkeypatch):
    from verification import paper, pretraining

    monkeypatch.setitem(sys.modules, "ray", None)
    assert pretraining.main(["--quick", "--backend", "ray", "--out", str(tmp_path / "p")]) == 2
    assert paper.main(["--only", "linear", "--backend", "ray", "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all('needs Ray, which is not installed: pip install -e ".[cluster]"' in e for e in err)
    assert not (tmp_path / "p").exists() and not (tmp_path / "q").exists()


def test_paper_hands_the_backend_to_every_experiment_only_when_given():
    from verification import paper

    step = paper.STEPS[0]
    plain = paper._parser().parse_args([])
    assert "--backend" not in paper.step_argv(step, plain)  # the experiments' own default: local
    ray_args = paper._parser().parse_args(["--backend", "ray", "--address", "10.0.0.1:6379"])
    assert paper.step_argv(step, ray_args)[-4:] == ["--backend", "ray", "--address", "10.0.0.1:6379"]


def test_address_without_ray_backend_is_refused(tmp_path, capsys):
    assert fnn.main(SMALL + ["--address", "auto", "--out", str(tmp_path / "x")]) == 2
    assert "--address names a Ray cluster: add --backend ray" in capsys.readouterr().err


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip(
        "ray", reason='Ray is not installed (pip install -e ".[cluster]"): no --backend ray tests'
    )
    from ray.cluster_utils import Cluster

    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    # a lost node is noticed within a second or two (the default takes tens of seconds)
    health = {"health_check_period_ms": 500, "health_check_failure_threshold": 2, "health_check_timeout_ms": 500}
    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False, "_system_config": health},
    )
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    # this process stays connected: its sweeps share one job and its warm workers (a sweep started here
    # uses the connection it finds); the kill tests' drivers are processes of their own
    ray.init(address=c.address, runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}})
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.mark.parametrize("name", sorted(CASES))
def test_ray_sweep_gives_the_local_numbers(name, cluster, tmp_path, capsys):
    module = importlib.import_module(f"verification.{name}")
    local, remote = tmp_path / "local", tmp_path / "ray"
    assert module.main(SMALL + CASES[name] + ["--backend", "local", "--out", str(local)]) == 0
    assert (
        module.main(SMALL + CASES[name] + ["--backend", "ray", "--address", cluster.address, "--out", str(remote)]) == 0
    )
    err = capsys.readouterr().err
    assert "Ray cluster at" in err and "2 nodes, 2 CPUs" in err  # the estimate counts the cluster
    assert _summary(remote) == _summary(local)
    assert _losses(remote) == _losses(local)  # every run's numbers, not only the medians
    assert len(_ids(remote)) == len(set(_ids(remote)))
    if name == "depth_sweep":  # the raised-precision column was built on the cluster, once per cell and seed
        deep = [r for r in _summary(remote)["rows"] if r["depth"] == 6]
        assert deep and all(isinstance(r["construction_precision_digits"], int) for r in deep)
        cached = (remote / "constructions.jsonl").read_text().splitlines()
        assert len(cached) == len({json.loads(line)["key"] for line in cached}) == len(deep)


def _start(out: Path, address: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "verification.fnn", *KILLED, "--backend", "ray", "--address", address]
    return subprocess.Popen(cmd + ["--out", str(out)], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)


def _wait_for_records(out: Path, proc: subprocess.Popen, count: int = 1, timeout: float = 120) -> int:
    """Lines in runs.jsonl once there are ``count`` (the sweep is training)."""
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        path = out / "runs.jsonl"
        n = len(path.read_text().splitlines()) if path.is_file() else 0
        if n >= count:
            return n
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    raise AssertionError("no record written")


@pytest.fixture(scope="module")
def killed_reference(tmp_path_factory):
    """The summary of the kill tests' sweep, run whole on the local backend."""
    out = tmp_path_factory.mktemp("reference")
    assert fnn.main(KILLED + ["--out", str(out)]) == 0
    return _summary(out), sorted(_ids(out))


def test_driver_killed_mid_sweep_is_finished_by_resume(cluster, killed_reference, tmp_path, capsys):
    out = tmp_path / "killed"
    proc = _start(out, cluster.address)
    at_kill = _wait_for_records(out, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    summary, ids = killed_reference
    assert 0 < len(_ids(out)) < len(ids)  # killed mid-sweep: some records written, not all
    assert at_kill <= len(_ids(out))
    assert fnn.main(["--resume", str(out), "--backend", "local"]) == 0  # finished on the other backend
    assert sorted(_ids(out)) == ids  # every run once
    assert _summary(out) == summary


def test_node_killed_mid_sweep_loses_and_duplicates_nothing(cluster, killed_reference, tmp_path):
    out = tmp_path / "node"
    proc = _start(out, cluster.address)
    _wait_for_records(out, proc)
    worker = [n for n in cluster.list_all_nodes() if n is not cluster.head_node][0]
    cluster.remove_node(worker)  # its task in flight runs again on the head node
    _, err = proc.communicate(timeout=300)
    summary, ids = killed_reference
    assert proc.returncode == 0, err[-2000:]
    assert sorted(_ids(out)) == ids  # nothing lost, nothing written twice
    assert _summary(out) == summary
    cluster.add_node(num_cpus=1)  # as the fixture made it


def test_a_task_that_raises_stops_with_one_line_naming_it_and_keeps_the_finished(cluster):
    from verification.sweep.cluster import RayBackend, TaskFailed

    def work(i):
        if i == 3:
            time.sleep(0.5)  # the others finish first: they must be kept
            raise ValueError(f"bad input {i}\nsecond line")
        return i

    kept = []
    with RayBackend(cluster.address, ": resume to go on") as backend:
        fn = backend.remote(work, num_cpus=1)
        with pytest.raises(TaskFailed) as exc:
            backend.run([(fn, (i,), i) for i in range(4)], lambda m, v, _r: kept.append(v), lambda m: f"task {m}")
    assert str(exc.value) == "task 3 failed on the Ray cluster (ValueError: bad input 3): resume to go on"
    assert sorted(kept) == [0, 1, 2]
