"""A real multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`: a head and two worker nodes,
one CPU each, every node advertising 127.0.0.1): a worker node is killed in the middle of an ingest job and
the job still finishes with exactly a clean run's output; a Ctrl-C'd driver is resumed by a re-run;
`ray job submit --working-dir . -- cavmae-prep ingest ...` against a head with a job server; and a head started
the way users start one (`ray start --head`, token authentication on) joined with --address, RAY_ADDRESS and
ray://."""

import io
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from ray.cluster_utils import Cluster

from cavmae.shards.schema import sample_members
from cavmae.shards.writer import write_shard
from tests.clips import make_clip
from tests.conftest import time_limit

REPO = Path(__file__).resolve().parents[1]
N = 14
SETS = ["shards.samples_per_shard=1", "video.image_size=32", "video.num_frames=4", "clip.length_s=3.0"]
NODE = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}
# Ray turns a loopback address given to ray.init into the machine's outward IP unless told this is a
# one-machine setup; with this every process of these clusters speaks over 127.0.0.1 only.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
AGENT_WAIT_S = 300  # how long `ray job submit` is repeated while the head's job agent is not up


@pytest.fixture(autouse=True)
def loopback(monkeypatch):
    for k, v in LOOPBACK_ENV.items():
        monkeypatch.setenv(k, v)


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    d = tmp_path_factory.mktemp("cluster_videos")
    for i in range(N):
        make_clip(d, f"c{i:02d}", seconds=3.0, size=(128, 96), tone_hz=250 + 30 * i)
    return d


@pytest.fixture
def cluster():
    c = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    workers = [c.add_node(**NODE) for _ in range(2)]
    c.wait_for_nodes()
    try:
        yield c, workers
    finally:
        c.shutdown()


def _cli(args, **kw):
    return subprocess.run([sys.executable, "-m", "cavmae.preprocess.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO, **kw)


def _popen(args):
    return subprocess.Popen([sys.executable, "-m", "cavmae.preprocess.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_shards(out: Path, n: int, proc, timeout=90):
    deadline = time.time() + timeout
    while len(list(out.glob("shard-*.tar"))) < n:
        assert proc.poll() is None, f"the job ended early:\n{proc.stdout.read()}"
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"no {n} shards after {timeout} s:\n{proc.communicate()[0][-3000:]}")
        time.sleep(0.05)
    return len(list(out.glob("shard-*.tar")))


def _wait_output(proc, text: str, timeout=120) -> str:
    """What `proc` (a _popen) has written once `text` is in it (its progress bar shows once it drives the job)."""
    seen, deadline = "", time.time() + timeout
    while text not in seen:
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"no {text!r} after {timeout} s:\n{seen[-3000:]}")
        if select.select([proc.stdout], [], [], 0.5)[0]:
            chunk = os.read(proc.stdout.fileno(), 65536).decode(errors="replace")
            assert chunk, f"the job ended early:\n{seen[-3000:]}"
            seen += chunk
    return seen


# Holds the argv[2] CPUs of the cluster at argv[1] (an idle actor on each) until its stdin closes, once its live
# nodes have that many (a node just killed counts until its missed heartbeats are noticed). A process of its own:
# ray.init in the process that started the cluster in-process (the `cluster` fixture) does not return.
HOLD_CPUS = """
import sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False)
cpus, deadline = int(sys.argv[2]), time.time() + 120
while sum(int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"]) != cpus:
    assert time.time() < deadline, ray.nodes()
    time.sleep(0.5)
Idle = ray.remote(num_cpus=1)(type("Idle", (), {"ready": lambda self: True}))
held = [Idle.remote() for _ in range(cpus)]
ray.get([h.ready.remote() for h in held], timeout=120)
print("held", cpus, flush=True)
sys.stdin.read()
"""


@contextmanager
def _cpus_held(c: Cluster):
    """Every CPU of the cluster `c` held by an idle actor (until the block ends)."""
    cpus = len(c.list_all_nodes()) * NODE["num_cpus"]
    holder = subprocess.Popen([sys.executable, "-c", HOLD_CPUS, c.address, str(cpus)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        with time_limit(300, "holding the cluster's CPUs"):
            while not (line := holder.stdout.readline()).startswith("held"):  # (Ray prints to it too)
                assert line, holder.communicate(timeout=60)[1][-3000:]
        yield
    finally:
        holder.stdin.close()  # the holder's driver ends, and its actors with it
        try:
            holder.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(holder.pid, signal.SIGKILL)
            holder.wait()


def _manifest(out):
    return sorted(pq.read_table(Path(out) / "manifest.parquet").to_pylist(), key=lambda r: r["video_id"])


def _assert_same(a: Path, b: Path):
    names = sorted(p.name for p in a.glob("shard-*.tar"))
    assert names == sorted(p.name for p in b.glob("shard-*.tar")) and len(names) == N
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ma, mb = _manifest(a), _manifest(b)
    assert ma == mb and len(ma) == N and all(r["status"] == "ok" for r in ma)
    assert len({r["key"] for r in ma}) == N and len({r["shard"] for r in ma}) == N
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())


def test_worker_node_killed_mid_job_and_driver_ctrl_c(cluster, many, tmp_path):
    c, workers = cluster
    common = ["ingest", str(many), "--no-progress", *sum((["--set", s] for s in SETS), [])]
    args = [*common, "--address", c.address]

    # 1. kill a worker node (its raylet and workers, SIGKILL) while the job runs
    killed = tmp_path / "node_killed"
    proc = _popen([*args, "--out", str(killed)])
    done_at_kill = _wait_shards(killed, 3, proc)
    c.remove_node(workers[0], allow_graceful=False)
    out, _ = proc.communicate(timeout=150)
    assert proc.returncode == 0, out
    assert done_at_kill < N, "the node must die mid-job"
    assert f"ok {N} samples, failed 0" in out

    # 2. Ctrl-C the driver mid-job, then re-run the same command: it resumes. Every CPU of the cluster is held
    #    while the job runs, so once its progress bar shows (it has planned, joined the cluster and submits) it
    #    waits for them and cannot have ended when the signal comes (a job left to run could end first on a loaded
    #    machine, and exit 0)
    interrupted = tmp_path / "interrupted"
    with _cpus_held(c):
        proc = _popen([*[a for a in args if a != "--no-progress"], "--out", str(interrupted)])
        out = _wait_output(proc, "ingest:")
        os.killpg(proc.pid, signal.SIGINT)
        out += proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out
    assert "re-run the same command to resume" in out
    assert (interrupted / "_plan.json").exists() and not (interrupted / "manifest.parquet").exists()
    assert not list(interrupted.glob("shard-*.tar"))  # nothing could run: the re-run does the whole plan
    res = _cli([*args, "--out", str(interrupted)])
    assert res.returncode == 0, res.stderr

    # 3. a clean run (local Ray, no failures) gives the very same bytes
    clean = tmp_path / "clean"
    res = _cli([*common, "--workers", "2", "--out", str(clean)])
    assert res.returncode == 0, res.stderr
    _assert_same(killed, clean)
    _assert_same(interrupted, clean)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, what: str, proc: subprocess.Popen | None = None, timeout: float = 180) -> None:
    """Until something listens on 127.0.0.1:`port` (`what`, started by `proc` if given, which must not end)."""
    deadline = time.time() + timeout
    while True:
        assert proc is None or proc.poll() is None, f"{what} ended"
        assert time.time() < deadline, f"{what} did not come up in {timeout} s"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)


def test_ray_job_submit_working_dir(many, tmp_path, monkeypatch):
    """`ray job submit --working-dir . -- cavmae-prep ingest ...` (the documented path) against a head with a
    dashboard (the job server). The head is started in-process, so teardown stops exactly its processes
    (`ray stop` would stop every Ray on the machine)."""
    ray_bin = Path(sys.executable).with_name("ray")
    if not ray_bin.exists():
        pytest.skip("no ray CLI next to the interpreter")
    dash_port, agent_port = _free_port(), _free_port()  # the agent's own: Ray's default may be another Ray's
    # the job's entrypoint runs in the head's environment: cavmae-prep must be on its PATH (as it is on a
    # cluster whose image has cavmae installed)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    head = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "node_ip_address": "127.0.0.1", "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": dash_port,
        "dashboard_agent_listen_port": agent_port})
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    try:
        out = tmp_path / "job_out"
        # The head's job agent may come up long after its dashboard on a loaded machine, when the dashboard answers
        # "No available agent" (after waiting 10 s for it) and makes no job: wait for the agent's port, and should
        # the dashboard not know the agent yet, submit again, for at most AGENT_WAIT_S in all.
        deadline = time.time() + AGENT_WAIT_S
        _wait_port(agent_port, "the head's job agent", timeout=AGENT_WAIT_S)
        while True:
            submit = subprocess.run(
                [str(ray_bin), "job", "submit", "--address", f"http://127.0.0.1:{dash_port}", "--working-dir", ".",
                 "--", "cavmae-prep", "ingest", str(many), "--out", str(out), "--no-progress",
                 *sum((["--set", s] for s in SETS), [])],
                capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
            if "No available agent" not in submit.stdout + submit.stderr or time.time() > deadline:
                break
            time.sleep(2)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert f"ok {N} samples, failed 0" in submit.stdout
        assert re.search(r"Job '.*' succeeded", submit.stdout)
        assert len(list(out.glob("shard-*.tar"))) == N and len(_manifest(out)) == N
    finally:
        head.shutdown()


@contextmanager
def _ray_start_head(env: dict[str, str]):
    """`ray start --head --block` in its own process group (ports free on 127.0.0.1, its own temp dir); at the
    end its group is stopped by id (`ray stop` would stop every Ray on the machine) and nothing may be left."""
    port, client_port = _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="cavmae-ray-", dir="/tmp")  # short: Ray's socket paths must fit
    head = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", f"--port={port}",
         "--node-ip-address=127.0.0.1", "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
         f"--ray-client-server-port={client_port}", f"--temp-dir={temp_dir}", "--block"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_port(port, "the head", head)
        yield port, client_port
    finally:
        try:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        for _ in range(5):  # its group, then anything of this head outside it (one forked during the kill)
            for pid in [head.pid, *_pids_of(temp_dir)]:
                try:
                    (os.killpg if pid == head.pid else os.kill)(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(1)
            if not _pids_of(temp_dir):
                break
        head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not _pids_of(temp_dir), "ray start left processes behind"


def _pids_of(temp_dir: str) -> list[int]:
    res = subprocess.run(["pgrep", "-f", temp_dir], capture_output=True, text=True)
    return [int(p) for p in res.stdout.split()]


def test_join_a_ray_start_head_with_token_auth(many, tmp_path):
    """A head started with `RAY_AUTH_MODE=token ray start --head`: without a token the join is one line that says
    what to set; with the token where Ray keeps it (~/.ray/auth_token) via --address, with RAY_AUTH_TOKEN via
    RAY_ADDRESS, and through the Ray client (ray://) the ingest runs, and all give the same bytes; stats over those
    shards joins the same head the same way."""
    token = "0123456789abcdef0123456789abcdef"
    (tmp_path / "token").write_text(token)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    head_env = {**clean, **LOOPBACK_ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "token")}
    home_with_token = tmp_path / "home"
    (home_with_token / ".ray").mkdir(parents=True)
    (home_with_token / ".ray" / "auth_token").write_text(token)
    clips = [str(p) for p in sorted(many.glob("*.mp4"))[:4]]
    common = ["ingest", *clips, "--no-progress", *sum((["--set", s] for s in SETS), [])]
    client = {**clean, **LOOPBACK_ENV}
    with _ray_start_head(head_env) as (port, client_port):
        address = f"127.0.0.1:{port}"
        res = _cli([*common, "--out", str(tmp_path / "no_token"), "--address", address],
                   env={**client, "HOME": str(tmp_path / "empty_home")})
        assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr[-2000:]
        assert "RAY_AUTH_MODE=token" in res.stderr and "ray get-auth-token" in res.stderr

        runs = {"address": ([*common, "--out", str(tmp_path / "address"), "--address", address],
                            {**client, "HOME": str(home_with_token)}),
                "env": ([*common, "--out", str(tmp_path / "env")],
                        {**client, "RAY_ADDRESS": address, "RAY_AUTH_TOKEN": token}),
                "client": ([*common, "--out", str(tmp_path / "client"), "--address", f"ray://127.0.0.1:{client_port}"],
                           {**client, "RAY_AUTH_TOKEN": token})}
        for name, (args, env) in runs.items():
            res = _cli(args, env=env)
            if name == "client" and "Starting Ray client server failed" in res.stderr:
                # the head spawns a client server per connection; on a loaded 2-core machine its start can time
                # out (Ray's own limit): the same command again resumes into the same --out
                res = _cli(args, env=env)
            assert res.returncode == 0, (name, res.stderr[-3000:])
            assert "ok 4 samples, failed 0" in res.stdout, name
        # every job joins the same way: stats and verify over the shards just written, on the same head
        res = _cli(["stats", str(tmp_path / "address"), "--out", str(tmp_path / "stats"), "--no-progress",
                    "--address", address], env={**client, "HOME": str(home_with_token)})
        assert res.returncode == 0, res.stderr[-3000:]
        assert "4 samples in 4 shard(s), 0 unreadable" in res.stdout
        assert json.loads((tmp_path / "stats" / "stats.json").read_text())["samples"] == 4
        res = _cli(["verify", str(tmp_path / "address"), "--no-progress", "--address", address],
                   env={**client, "HOME": str(home_with_token)})
        assert res.returncode == 0, res.stderr[-3000:]
        assert "verified 4 shard(s), 4 good sample(s), 0 problem(s)" in res.stdout
    ref = {p.name: p.read_bytes() for p in (tmp_path / "address").glob("shard-*.tar")}
    assert len(ref) == 4
    for name in ("env", "client"):
        assert {p.name: p.read_bytes() for p in (tmp_path / name).glob("shard-*.tar")} == ref, name


def test_a_ray_address_that_accepts_and_never_answers_is_one_line_within_the_join_limit(tmp_path):
    """RAY_ADDRESS naming a port that accepts connections and never answers (Ray alone waits on it for minutes):
    `ingest` and `stats` stop with one line naming the address and the limit, exit 2, when the join limit
    (`preprocess.cluster.JOIN_TIMEOUT_S`, shortened here) has passed, with nothing written."""
    videos = tmp_path / "videos"
    make_clip(videos, "v", seconds=1.0, size=(64, 48))
    shards = tmp_path / "shards"
    shards.mkdir()
    jpeg = io.BytesIO()
    Image.new("RGB", (32, 32)).save(jpeg, format="JPEG")
    write_shard(shards / "shard-000000.tar", sample_members("k", {"video_id": "k", "labels": []},
                                                            np.zeros((40, 128), np.float16), [jpeg.getvalue()]))
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # (the kernel completes the connections; nobody ever reads or writes)
    address = f"127.0.0.1:{silent.getsockname()[1]}"
    shim = ("import sys; from cavmae.preprocess import cluster, cli; cluster.JOIN_TIMEOUT_S = 5; "
            "sys.argv[0] = 'cavmae-prep'; cli.run()")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, **LOOPBACK_ENV,
           "RAY_ADDRESS": address, "PYTHONPATH": str(REPO)}
    try:
        for args in (["ingest", str(videos), "--out", str(tmp_path / "out")],
                     ["stats", str(shards), "--out", str(tmp_path / "stats")]):
            with time_limit(120, f"{args[0]} against a silent port"):
                res = subprocess.run([sys.executable, "-c", shim, *args, "--no-progress"], capture_output=True,
                                     text=True, cwd=REPO, env=env, timeout=110)
            assert res.returncode == 2, res.stderr[-2000:]
            *_, last = res.stderr.splitlines()  # (stats first warns that the folder has no pipeline.yaml)
            assert last == (f"cavmae-prep: error: {address} accepts connections but joining the Ray cluster there "
                            f"did not complete within 5 s; check that it is a Ray head's port"), res.stderr
            assert res.stderr.count("error") == 1 and "Traceback" not in res.stderr, res.stderr
    finally:
        silent.close()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("shard-*"))
    assert not (tmp_path / "stats" / "stats.json").exists()
