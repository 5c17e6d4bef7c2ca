"""The shipped RayJob runs: its entrypoint, submitted through Ray's Jobs API to a real head with token
authentication, segments a sample archive and commits every case.

A Ray head of this test's own (`ray start --head --block` in a subprocess: its own temp dir, ports and
token; stopped through the PIDs it started, never `ray stop`, which would stop every Ray on the host).
The job is `ray job submit --working-dir <repo> -- <entrypoint>`, the entrypoint parsed from
infra/kuberay/base/rayjob.yaml, so the two cannot drift. Only these values differ from the manifest:
- the site's slots, which the manifest ships as placeholders: inputs.uris and outputs.uri (a local
  sample archive and a temporary OUT);
- what this machine lacks or shares: no GPU (resources.gpus=0 instead of the GPU pool's 4), no
  downloadable weights (tiny models), other engineers' jobs (a free metrics port instead of 9500,
  a private model cache).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from deltalake import DeltaTable

from mcs_batch.testdata.sample import build_sample_archive

REPO = Path(__file__).resolve().parents[1]
RAYJOB = REPO / "infra" / "kuberay" / "base" / "rayjob.yaml"
VENV_BIN = Path(sys.executable).parent  # the head runs this environment's python and `ray`
SITE_KEYS = ("inputs.uris", "outputs.uri")  # the entrypoint's site slots (ARCHIVE_URIS, RESULTS_URI in site.env)
START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shipped_entrypoint() -> list[str]:
    (rayjob,) = [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d and d.get("kind") == "RayJob"]
    return shlex.split(rayjob["spec"]["entrypoint"])


def sets_of(argv: list[str]) -> dict[str, str]:
    return dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--set")


def with_sets(argv: list[str], values: dict[str, str]) -> list[str]:
    """argv with each `--set KEY=...` given a new value in place; keys it lacks are appended."""
    out, done = list(argv), set()
    for i, a in enumerate(out[:-1]):
        if a == "--set":
            key = out[i + 1].split("=", 1)[0]
            if key in values:
                out[i + 1] = f"{key}={values[key]}"
                done.add(key)
    for key, value in values.items():
        if key not in done:
            out += ["--set", f"{key}={value}"]
    return out


def without_set(argv: list[str], key: str) -> list[str]:
    """argv without its `--set KEY=...` pair."""
    out = []
    for a in argv:
        if a.startswith(f"{key}=") and out and out[-1] == "--set":
            out.pop()
        else:
            out.append(a)
    return out


@dataclass
class Head:
    address: str  # the dashboard / Jobs API
    token: str
    env: dict[str, str]  # a client environment that holds the token
    log: Path


def _http(url: str, token: str | None = None, data: bytes | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (state, ppid, ..., starttime at [19]); None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _descendants(pid: int) -> list[tuple[int, str]]:
    """The processes below `pid`, as (pid, start time): a PID reused later is never taken for them."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))):
            children.setdefault(int(fields[1]), []).append((int(entry.name), fields[19]))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


def _alive(process: tuple[int, str]) -> bool:
    fields = _stat(process[0])
    return fields is not None and fields[19] == process[1] and fields[0] != "Z"


def _stop(proc: subprocess.Popen) -> None:
    """Stop the head through the processes it started: `ray start --block` and its descendants."""
    tree = _descendants(proc.pid)
    proc.terminate()  # --block: Ray's own processes share its fate
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 15
    while any(_alive(p) for p in tree) and time.monotonic() < deadline:
        time.sleep(0.5)
    for process in tree:  # only processes this head started
        if _alive(process):
            with contextlib.suppress(ProcessLookupError):
                os.kill(process[0], signal.SIGKILL)


@pytest.fixture(scope="module")
def ray_head():
    token = secrets.token_hex(32)
    # Ray's socket paths live under the temp dir and must stay short: not pytest's tmp_path.
    temp_dir = Path(tempfile.mkdtemp(prefix="mcsjob-"))
    log = temp_dir / "ray-start.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # `python` in the entrypoint: this venv
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # no node drain on SIGTERM: a test head stops at once
    }
    gcs, dashboard = _free_port(), _free_port()
    ports = {
        "--port": gcs,
        "--dashboard-port": dashboard,
        "--ray-client-server-port": _free_port(),
        "--dashboard-agent-listen-port": _free_port(),
        "--dashboard-agent-grpc-port": _free_port(),
        "--runtime-env-agent-port": _free_port(),
        "--metrics-export-port": _free_port(),
        "--node-manager-port": _free_port(),
        "--object-manager-port": _free_port(),
    }
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1"]
    cmd += [str(x) for kv in ports.items() for x in kv]
    cmd += ["--temp-dir", str(temp_dir), "--num-cpus", "2", "--object-store-memory", str(512 * 2**20)]
    cmd += ["--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--disable-usage-stats"]
    with log.open("wb") as sink:
        proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"ray start exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            try:
                if _http(f"{address}/api/version", token)[0] == 200 and _http(f"{address}/api/jobs/", token)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"no Jobs API after {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}"
            time.sleep(1)
        yield Head(address=address, token=token, env=env, log=log)
    finally:
        _stop(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ray_job(head: Head, *args: str, env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV_BIN / "ray"), "job", *args], env=env or head.env, capture_output=True, text=True, **kw
    )


def test_the_head_runs_with_token_authentication_and_refuses_a_job_without_the_token(ray_head, tmp_path):
    assert _http(f"{ray_head.address}/api/jobs/", ray_head.token)[0] == 200
    assert _http(f"{ray_head.address}/api/jobs/", None)[0] == 401  # reading needs the token too
    body = json.dumps({"entrypoint": "echo should-not-run"}).encode()
    assert _http(f"{ray_head.address}/api/jobs/", None, body)[0] == 401
    assert _http(f"{ray_head.address}/api/jobs/", "0" * 64, body)[0] in (401, 403)
    # The CLI without a token (no RAY_AUTH_TOKEN, an empty HOME: no ~/.ray/auth_token either).
    env = {k: v for k, v in ray_head.env.items() if k != "RAY_AUTH_TOKEN"} | {"HOME": str(tmp_path)}
    for mode in ("disabled", "token"):
        refused = _ray_job(
            ray_head, "submit", "--address", ray_head.address, "--", "echo", "should-not-run",
            env=env | {"RAY_AUTH_MODE": mode}, timeout=120,
        )  # fmt: skip
        assert refused.returncode != 0, refused.stdout
        assert "auth" in (refused.stdout + refused.stderr).lower()
    status, listing = _http(f"{ray_head.address}/api/jobs/", ray_head.token)
    assert status == 200 and "should-not-run" not in listing.decode()


def _mcs_batch_job(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "mcs-batch"), "job", *args], env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_mcs_batch_job_is_rays_client_with_auth_and_address_failures_in_one_line(ray_head, tmp_path):
    """`mcs-batch job ...` is `ray job ...` (same arguments, output, exit codes); what Ray's client shows as
    a traceback (no token, a wrong one: 401 / 403, an unreachable head, no such job) is one line, exit 2."""
    no_token = {k: v for k, v in ray_head.env.items() if k != "RAY_AUTH_TOKEN"} | {"HOME": str(tmp_path)}
    nowhere = f"http://127.0.0.1:{_free_port()}"
    cases = {
        "no token": (ray_head.address, no_token, "couldn't find an authentication token"),
        "no token, auth mode unset": (ray_head.address, no_token | {"RAY_AUTH_MODE": "disabled"}, "Unauthorized"),
        "a wrong token": (ray_head.address, ray_head.env | {"RAY_AUTH_TOKEN": "0" * 64}, "Forbidden"),
        "no head there": (nowhere, ray_head.env, "cannot reach the Ray dashboard"),
    }
    for name, (address, env, reason) in cases.items():
        said = _mcs_batch_job("submit", "--address", address, "--", "echo", "should-not-run", env=env)
        lines = (said.stdout + said.stderr).strip().splitlines()
        assert said.returncode == 2 and len(lines) == 1, (name, said.stdout + said.stderr)
        assert lines[0].startswith(f"mcs-batch: error: {address}: ") and reason in lines[0], (name, lines)
        assert "Traceback" not in said.stderr and ray_head.token not in lines[0]
    missing = _mcs_batch_job("status", "--address", ray_head.address, "no-such-job", env=ray_head.env)
    assert missing.returncode == 2 and "404: Job no-such-job does not exist" in missing.stderr.strip().splitlines()[-1]
    assert "Traceback" not in missing.stderr

    submission_id = f"mcs-batch-client-{secrets.token_hex(4)}"  # with the token: Ray's CLI as it is
    ran = _mcs_batch_job("submit", "--address", ray_head.address, "--submission-id", submission_id, "--",
                         "python", "-c", "print('hello from the head')", env=ray_head.env)  # fmt: skip
    assert ran.returncode == 0 and "hello from the head" in ran.stdout, ran.stdout + ran.stderr
    status = _mcs_batch_job("status", "--address", ray_head.address, submission_id, env=ray_head.env)
    assert status.returncode == 0 and f"Job '{submission_id}' succeeded" in status.stdout + status.stderr
    failed = _mcs_batch_job("submit", "--address", ray_head.address, "--", "python", "-c", "raise SystemExit(3)",
                            env=ray_head.env)  # fmt: skip
    assert failed.returncode == 1 and "failed with exit code 3" in failed.stdout + failed.stderr  # as `ray job`


def test_the_shipped_rayjob_entrypoint_runs_through_the_jobs_api(ray_head, tmp_path):
    shipped = shipped_entrypoint()
    assert shipped[:2] == ["python", "jobs/segment_cohort.py"]
    assert set(SITE_KEYS) <= set(sets_of(shipped)), "the RayJob names the slots a site fills in"
    archive = build_sample_archive(tmp_path / "archive")
    inputs = [str(archive / "ct_series"), str(archive / "phantom_ct")]
    out = tmp_path / "out"
    metrics_port = _free_port()
    argv = with_sets(
        shipped,
        {
            "inputs.uris": json.dumps(inputs),
            "outputs.uri": str(out),
            "resources.gpus": "0",
            "outputs.metrics_port": str(metrics_port),
            "outputs.metrics_linger_seconds": "8",  # the shipped 60 s, shortened: final values stay scrapeable
            "models.clip": "tiny",
            "models.sam": "tiny",
            "m2ib.layer": "4",
            "models.cache_dir": str(tmp_path / "model-cache"),
        },
    )
    assert [a for a in argv if a not in shipped and "=" not in a] == []  # only --set values changed

    submission_id = f"mcs-batch-test-{secrets.token_hex(4)}"
    started = time.monotonic()
    submit = subprocess.Popen(
        [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_head.address, "--submission-id", submission_id,
         "--working-dir", str(REPO), "--", *argv],
        env=ray_head.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    scraped, errors = [], set()  # the driver's metrics server, seen while the job runs
    while submit.poll() is None and time.monotonic() - started < JOB_TIMEOUT_S:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
                scraped.append(r.read().decode())
        except OSError as e:
            errors.add(str(e))
        time.sleep(0.5)
    if submit.poll() is None:
        submit.kill()
    logs = submit.communicate()[0]
    elapsed = time.monotonic() - started
    assert submit.returncode == 0, logs[-5000:]

    status, info = _http(f"{ray_head.address}/api/jobs/{submission_id}", ray_head.token)
    assert status == 200 and json.loads(info)["status"] == "SUCCEEDED", info
    said = _ray_job(ray_head, "status", "--address", ray_head.address, submission_id, timeout=120)  # README's
    assert said.returncode == 0 and f"Job '{submission_id}' succeeded" in said.stdout, said.stdout + said.stderr
    assert any("mcs_batch_slices_total" in text for text in scraped), f"no metrics while it ran: {errors}"
    assert any("mcs_batch_job_running 1.0" in text for text in scraped)
    ended = [text for text in scraped if "mcs_batch_job_running 0.0" in text]  # scraped during the linger
    assert ended and "mcs_batch_job_failed 0.0" in ended[-1], "the final values were not served after the job"

    ray_line = next((m.start() for m in re.finditer(r"\] core_worker\.cc:\d+: Actor with class name", logs)), -1)
    assert ray_line == -1 or -1 < logs.find("is expected and harmless: Ray Data hands") < ray_line, logs[-3000:]

    cases = DeltaTable(str(out / "catalog" / "cases")).to_pandas()  # as a curator reads it
    assert sorted(k.split("/")[0] for k in cases["source_keys"].map(lambda keys: keys[0])) == [
        "ct_series", "phantom_ct"]  # fmt: skip
    assert len(cases) == len(inputs) and set(cases["target"]) == {"lungs"}  # one row per (case, target)
    for row in cases.itertuples():
        assert row.status == "ok", (row.case_id, row.error_code, row.error_message)
        assert Path(urllib.parse.urlparse(row.mask_uri).path).is_file() and row.tiny_models
    (record,) = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    assert record["status"] == "succeeded" and record["counts"]["cases"] == len(inputs)
    print(f"job {submission_id}: {elapsed:.1f} s from submit to exit")


def test_the_shipped_entrypoint_without_the_site_values_stops_at_once_naming_the_key():
    """Before Ray starts: a RayJob whose SITE values were dropped fails in seconds, saying which."""
    shipped = shipped_entrypoint()
    for key in SITE_KEYS:
        argv = without_set(shipped, key)
        assert len(argv) == len(shipped) - 2
        started = time.monotonic()
        env = os.environ | {"PYTHONPATH": str(REPO)}  # this checkout's package, as the working_dir gives the job
        run = subprocess.run([sys.executable, *argv[1:]], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert run.returncode == 2, run.stderr
        (line,) = [x for x in run.stderr.splitlines() if x.startswith("mcs-batch: error:")]
        assert line.startswith(f"mcs-batch: error: {key}: ") and "Traceback" not in run.stderr
        assert time.monotonic() - started < 30
