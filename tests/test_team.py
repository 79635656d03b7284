"""A team's stack, for real clients: a DVC remote on an S3 endpoint and a shared MLflow server
(PostgreSQL backend store, basic auth, artifacts proxied to the same S3), all on 127.0.0.1.

The servers are the ones `make team` starts (icmlora.team): PostgreSQL from Debian's package,
moto's standalone S3 server and `mlflow server --app-name basic-auth`. Everything on the client
side is the real stack: dvc-s3 / s3fs / aiobotocore for DVC, MLflow's REST client for the runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests

from e2e_helpers import DVC, GIT_ID, clone_sharing_cache, commit_all, file_hashes, free_port, run
from icmlora import team
from icmlora.config import load_params
from icmlora.profile import apply_profile
from icmlora.spool import public_uri
from icmlora.errors import InputError
from test_reproducibility import run_queue

pytestmark = [pytest.mark.slow, pytest.mark.long]
OUTS = ("data", "models", "metrics")
UP_TO_DATE = "Data and pipelines are up to date."


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    try:
        team._postgres_bin("pg_ctl")
    except InputError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and {exc}", pytrace=False)
        pytest.skip(f"{exc.summary}: install Debian's `postgresql` (.ci/run does)")
    stack = team.Stack(tmp_path_factory.mktemp("team"), team.Ports(free_port(), free_port(), free_port()))
    try:
        stack.up()
        yield stack
    finally:
        stack.down()
        if stack.state.pg_dir.startswith(os.path.join(os.path.realpath("/tmp"), "icmlora-team-pg-")):
            shutil.rmtree(stack.state.pg_dir, ignore_errors=True)


def client_env(env: dict, stack: team.Stack, aws: bool = True) -> dict:
    """A colleague's environment: the S3 keys in it (aws=True) or not (then only .dvc/config.local has them)."""
    out = {k: v for k, v in env.items() if not k.startswith(("AWS_", "MLFLOW_TRACKING_"))}
    if aws:
        out.update(stack.aws_env())
    return out


def add_s3_remote(repo: Path, stack: team.Stack, name: str, prefix: str, env: dict, default: bool = True) -> None:
    """The remote a team commits: bucket, endpoint and `verify` in .dvc/config; no key."""
    run([DVC, "remote", "add", *(["-d"] if default else []), name, f"s3://{team.DVC_BUCKET}/{prefix}"], repo, env)
    run([DVC, "remote", "modify", name, "endpointurl", stack.s3_endpoint], repo, env)
    run([DVC, "remote", "modify", name, "verify", "true"], repo, env)
    commit_all(repo, f"DVC remote {name}: s3://{team.DVC_BUCKET}/{prefix}")


def local_credentials(repo: Path, stack: team.Stack, name: str, env: dict) -> None:
    creds = stack.aws_env()
    run([DVC, "remote", "modify", "--local", name, "access_key_id", creds["AWS_ACCESS_KEY_ID"]], repo, env)
    run([DVC, "remote", "modify", "--local", name, "secret_access_key", creds["AWS_SECRET_ACCESS_KEY"]], repo, env)
    run([DVC, "remote", "modify", "--local", name, "region", creds["AWS_DEFAULT_REGION"]], repo, env)


def assert_no_secret_tracked(repo: Path, stack: team.Stack) -> None:
    secrets = [stack.credentials["aws_secret_access_key"], stack.credentials["postgres"], stack.credentials["admin"],
               *stack.credentials["users"].values()]
    for secret in secrets:
        found = run(["git", "grep", "-lF", secret], repo, ok=False).stdout
        assert found == "", f"a secret is in tracked files of {repo}: {found}"
        history = run(["git", "log", "-p", "--all", "-S", secret, "--format=%H"], repo).stdout
        assert history == "", f"a secret is in the git history of {repo}"


def remote_objects(stack: team.Stack, prefix: str) -> dict[str, bytes]:
    client = stack.s3_client()
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=team.DVC_BUCKET, Prefix=f"{prefix}/"):
        for item in page.get("Contents", []):
            out[item["Key"]] = client.get_object(Bucket=team.DVC_BUCKET, Key=item["Key"])["Body"].read()
    return out


def assert_objects_intact(objects: dict[str, bytes]) -> None:
    """Every object under files/md5/ hashes to its name (a directory's `.dir` object too)."""
    assert objects
    for key, data in objects.items():
        name = key.split("/files/md5/")[1].replace("/", "").removesuffix(".dir")
        assert hashlib.md5(data).hexdigest() == name, f"{key}: damaged object"


def assert_pulled(repo: Path, expected: dict, env: dict) -> None:
    assert file_hashes(repo, *OUTS) == expected
    assert UP_TO_DATE in run([DVC, "status"], repo, env).stdout
    repro = run([DVC, "repro"], repo, env).stdout
    assert UP_TO_DATE in repro and "Running stage" not in repro, repro
    assert run(["git", "status", "--porcelain"], repo).stdout == ""


def linked_clone(src: Path, dest: Path, env: dict) -> Path:
    """A git clone reading src's DVC cache (the reproduced outputs, nothing copied), checked out."""
    cache = run([DVC, "cache", "dir"], src, env).stdout.strip()
    run(["git", "clone", "-q", str(src), str(dest)], src.parent)
    run([DVC, "cache", "dir", "--local", cache], dest, env)
    run([DVC, "checkout"], dest, env)
    return dest


PUSHED: dict[str, set] = {}  # the object keys the first push wrote (later tests push experiments)


@pytest.fixture(scope="module")
def pusher(micro_pipeline, tmp_path_factory, stack, e2e_env) -> Path:
    """A clone of the reproduced micro pipeline (its outputs linked from its cache) with the S3
    remote `team` committed as default, pushed with the keys in the environment."""
    repo = clone_sharing_cache(micro_pipeline, tmp_path_factory.mktemp("pusher") / "repo", e2e_env)
    add_s3_remote(repo, stack, "team", "icmlora", e2e_env)
    out = run([DVC, "push"], repo, client_env(e2e_env, stack)).stdout
    assert "pushed" in out, out
    PUSHED["icmlora"] = set(remote_objects(stack, "icmlora"))
    return repo


def test_push_to_s3_then_a_clone_pulls_every_output_byte_for_byte(micro_pipeline, pusher, stack, tmp_path, e2e_env):
    expected = file_hashes(micro_pipeline, *OUTS)
    assert any(k.startswith("models/lora/") for k in expected) and any(k.startswith("models/cvae") for k in expected)
    synced = run([DVC, "status", "--cloud"], pusher, client_env(e2e_env, stack)).stdout
    assert "Cache and remote 'team' are in sync" in synced, synced
    assert_objects_intact(remote_objects(stack, "icmlora"))

    # The colleague: git clone, the keys in .dvc/config.local only (none in the environment), dvc pull.
    colleague = tmp_path / "colleague"
    run(["git", "clone", "-q", str(pusher), str(colleague)], tmp_path)
    bare_env = client_env(e2e_env, stack, aws=False)
    denied = run([DVC, "pull"], colleague, bare_env, ok=False)
    assert denied.returncode != 0, "pulled from S3 without any key"  # moto checks the key's presence
    local_credentials(colleague, stack, "team", bare_env)
    run([DVC, "pull"], colleague, bare_env)
    assert_pulled(colleague, expected, bare_env)
    assert "team" in (colleague / ".dvc" / "config").read_text()
    assert "secret_access_key" not in (colleague / ".dvc" / "config").read_text()
    assert "secret_access_key" in (colleague / ".dvc" / "config.local").read_text()
    assert_no_secret_tracked(pusher, stack)
    assert_no_secret_tracked(colleague, stack)


def test_an_experiment_travels_between_clones(pusher, stack, tmp_path, e2e_env):
    """`dvc exp push` of a queued experiment: its git refs through a bare git remote, its data
    through S3; the other clone's `dvc exp pull` gets both, then `dvc exp show` and `dvc exp apply`."""
    env = client_env(e2e_env, stack)
    origin = tmp_path / "origin.git"
    run(["git", "init", "-q", "--bare", str(origin)], tmp_path)
    first = tmp_path / "first"
    linked_clone(pusher, first, env)
    run(["git", "remote", "add", "origin-bare", str(origin)], first)
    run(["git", "push", "-q", "origin-bare", "HEAD:refs/heads/main"], first)
    run(["git", "symbolic-ref", "HEAD", "refs/heads/main"], origin)

    name = "noise-1"
    run([DVC, "exp", "run", "--queue", "-S", "evaluate.noise_seed=1", "-n", name], first, env)
    state = run_queue(first, env, name)
    assert state == "Success", run([DVC, "queue", "logs", name], first, env, ok=False).stdout[-3000:]
    run([DVC, "exp", "push", "origin-bare", name], first, env)

    second = tmp_path / "second"
    run(["git", "clone", "-q", str(origin), str(second)], tmp_path)
    run([DVC, "pull"], second, env)
    run([DVC, "exp", "pull", "origin", name], second, env)
    shown = json.loads(run([DVC, "exp", "show", "--json"], second, env).stdout)
    names = [exp.get("name") for row in shown for exp in (row.get("experiments") or [])]
    assert name in names, names
    run([DVC, "exp", "apply", name], second, env)
    run([DVC, "exp", "apply", name], first, env)
    assert "noise_seed: 1" in (second / "params.yaml").read_text()
    assert file_hashes(second, *OUTS) == file_hashes(first, *OUTS)
    import yaml

    lock = yaml.safe_load((second / "dvc.lock").read_text())
    assert lock["stages"]["evaluate"]["params"]["params.yaml"]["evaluate"]["noise_seed"] == 1  # the experiment's run
    assert UP_TO_DATE in run([DVC, "status"], second, env).stdout


def test_a_push_cut_by_the_s3_server_dying_completes_when_pushed_again(micro_pipeline, pusher, stack, tmp_path,
                                                                       e2e_env):
    env = client_env(e2e_env, stack)
    repo = tmp_path / "repo"
    linked_clone(pusher, repo, env)
    add_s3_remote(repo, stack, "cut", "cut", env, default=False)
    recording = stack.root / "s3-recording.jsonl"
    offset = recording.stat().st_size
    push = subprocess.Popen([DVC, "push", "-r", "cut", "-j", "1"], cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    uploads, deadline = 0, time.monotonic() + 120
    with recording.open() as handle:  # the endpoint's own record of each request, appended as it comes
        handle.seek(offset)
        while uploads < 5 and push.poll() is None and time.monotonic() < deadline:
            for line in handle.readlines():
                if '"method": "PUT"' in line and "/cut/files/md5/" in line:
                    uploads += 1
            time.sleep(0.01)
    stack.kill_s3()
    output, _ = push.communicate(timeout=600)
    assert uploads >= 5 and push.returncode != 0, f"the push was not cut ({uploads} uploads seen):\n{output[-2000:]}"

    stack.start_s3()  # back, with what it had stored
    stored = remote_objects(stack, "cut")
    assert 5 <= len(stored), len(stored)
    run([DVC, "push", "-r", "cut"], repo, env)
    assert "Cache and remote 'cut' are in sync" in run([DVC, "status", "--cloud", "-r", "cut"], repo, env).stdout
    complete = remote_objects(stack, "cut")
    assert len(complete) > len(stored)
    assert_objects_intact(complete)
    assert complete.keys() == {k.replace("icmlora/", "cut/", 1) for k in PUSHED["icmlora"]}

    fresh = tmp_path / "fresh"
    run(["git", "clone", "-q", str(repo), str(fresh)], tmp_path)
    run([DVC, "pull", "-r", "cut"], fresh, env)  # verify = true: every object rehashed on arrival
    assert_pulled(fresh, file_hashes(micro_pipeline, *OUTS), env)


# --- the shared tracking server ------------------------------------------------------------------

def run_key(run) -> tuple:
    t = run.data.tags
    return (run.info.run_name, t.get("stage"), t.get("task"), t.get("rank"), t.get("seed"), t.get("source"),
            t.get("sample"), t.get("role"))


def server_client(stack: team.Stack):
    """An MLflow client of the server as its admin (reads every user's runs)."""
    import mlflow

    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = stack.admin_auth()
    return mlflow.MlflowClient(tracking_uri=stack.tracking_uri)


def all_runs(client, filter_string: str = "") -> list:
    experiment = client.get_experiment_by_name("icmlora")
    return client.search_runs([experiment.experiment_id], filter_string=filter_string, max_results=5000)


@pytest.fixture(scope="module")
def on_the_server(micro_pipeline, stack, tmp_path_factory, e2e_env):
    """Two clones of the micro pipeline's unreproduced commit, run at the same time by two users
    (alice, bob) logging to the server; bob's clone is one commit ahead, so git_commit tells them apart."""
    first = run(["git", "rev-list", "--max-parents=0", "HEAD"], micro_pipeline).stdout.strip()
    root = tmp_path_factory.mktemp("server")
    clones, procs = {}, {}
    for user in team.USERS:
        clone = root / user
        run(["git", "clone", "-q", str(micro_pipeline), str(clone)], root)
        run(["git", "reset", "-q", "--hard", first], clone)
        if user == "bob":
            run(["git", *GIT_ID, "commit", "-q", "--allow-empty", "-m", "bob's commit"], clone)
        clones[user] = clone
    mlflow_env = {k: v for k, v in e2e_env.items() if not k.startswith("MLFLOW_TRACKING_")}
    try:
        for user, clone in clones.items():
            log = (root / f"{user}.log").open("w")
            procs[user] = (subprocess.Popen([DVC, "repro"], cwd=clone, env={**mlflow_env, **stack.client_env(user)},
                                            stdout=log, stderr=subprocess.STDOUT), log)
        for user, (proc, log) in procs.items():
            status = proc.wait(timeout=2400)
            log.close()
            assert status == 0, f"{user}'s dvc repro failed:\n{(root / f'{user}.log').read_text()[-4000:]}"
    finally:
        for proc, log in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    commits = {user: run(["git", "rev-parse", "HEAD"], clone).stdout.strip() for user, clone in clones.items()}
    return clones, commits


def test_two_clones_at_once_log_every_run_to_the_shared_server(micro_pipeline, on_the_server, stack, e2e_env):
    import mlflow

    clones, commits = on_the_server
    assert len(set(commits.values())) == 2
    for clone in clones.values():
        assert not (clone / "mlflow.db").exists()  # everything went to the server
    local = mlflow.MlflowClient(tracking_uri=f"sqlite:///{micro_pipeline / 'mlflow.db'}")
    expected = {run_key(r): r for r in local.search_runs([local.get_experiment_by_name("icmlora").experiment_id],
                                                         max_results=5000)}
    assert len(expected) > 20 and any(k[1] == "train_lora" for k in expected) and any(k[1] == "report" for k in expected)
    client = server_client(stack)
    for user, commit in commits.items():
        runs = all_runs(client, f"tags.git_commit = '{commit}'")
        got = {run_key(r): r for r in runs}
        assert len(got) == len(runs), f"{user}: a run logged twice"
        assert got.keys() == expected.keys(), (user, got.keys() ^ expected.keys())
        for key, run_ in got.items():
            assert run_.info.status == "FINISHED", (user, key)
            assert run_.data.params == expected[key].data.params, (user, key)
            assert run_.data.metrics.keys() == expected[key].data.metrics.keys(), (user, key)
            if key[1] == "evaluate":  # what a run decides is the same run for run (timings are not compared)
                assert run_.data.metrics == expected[key].data.metrics, (user, key)
            assert run_.info.artifact_uri.startswith("mlflow-artifacts:/"), run_.info.artifact_uri  # proxied

    # The README's compare filter: each clone's evaluated adapters of rank 2, every source.
    readme = 'tags.stage = "evaluate" and tags.rank = "2" and tags.dvc_exp = "workspace"'
    rows = lambda runs: sorted((r.data.tags["task"], r.data.tags["source"], r.data.tags.get("sample", ""))  # noqa: E731
                               for r in runs)
    want = rows(local.search_runs([local.get_experiment_by_name("icmlora").experiment_id], readme))
    assert {"trained", "generated"} <= {source for _, source, _ in want}
    found = all_runs(client, readme)
    for commit in commits.values():
        assert rows(r for r in found if r.data.tags["git_commit"] == commit) == want
    generated = all_runs(client, readme + ' and tags.source = "generated"')
    assert generated and {r.data.tags["source"] for r in generated} == {"generated"}


def test_artifacts_go_through_the_server_into_the_bucket(on_the_server, stack, tmp_path):
    import mlflow

    clones, commits = on_the_server
    client = server_client(stack)
    (cvae,) = all_runs(client, f"tags.git_commit = '{commits['bob']}' and tags.stage = 'train_cvae' "
                               "and tags.rank = '2'")
    folder = Path(client.download_artifacts(cvae.info.run_id, "generator", str(tmp_path)))
    written = clones["bob"] / "models" / "cvae" / "r2"
    assert file_hashes(folder, ".") == file_hashes(written, ".") and file_hashes(written, ".")
    (summary,) = all_runs(client, f"tags.git_commit = '{commits['alice']}' and tags.stage = 'report'")
    verdicts = Path(mlflow.artifacts.download_artifacts(run_id=summary.info.run_id, artifact_path="verdicts.txt",
                                                        tracking_uri=stack.tracking_uri, dst_path=str(tmp_path)))
    assert verdicts.read_bytes() == (clones["alice"] / "metrics" / "verdicts.txt").read_bytes()
    # Stored in the bucket under the run's id: the server proxies, clients never see the bucket.
    keys = [o["Key"] for page in stack.s3_client().get_paginator("list_objects_v2").paginate(Bucket=team.MLFLOW_BUCKET)
            for o in page.get("Contents", [])]
    assert any(f"/{cvae.info.run_id}/artifacts/generator/" in k for k in keys)
    assert any(k.endswith(f"/{summary.info.run_id}/artifacts/verdicts.txt") for k in keys)


def test_the_server_refuses_requests_without_valid_credentials(on_the_server, stack, e2e_env):
    url = f"{stack.tracking_uri}/api/2.0/mlflow/experiments/search"
    assert requests.get(url, params={"max_results": 1}, timeout=30).status_code == 401
    assert requests.get(url, params={"max_results": 1}, auth=("alice", "wrong"), timeout=30).status_code == 401
    assert requests.get(url, params={"max_results": 1}, auth=("alice", stack.credentials["users"]["alice"]),
                        timeout=30).status_code == 200
    # A stage with a wrong password stops before it trains, naming the fix; its outputs stay.
    clones, _ = on_the_server
    clone = clones["alice"]
    before = file_hashes(clone, *OUTS)
    env = {**{k: v for k, v in e2e_env.items() if not k.startswith("MLFLOW_TRACKING_")},
           **stack.client_env("alice"), "MLFLOW_TRACKING_PASSWORD": "wrong"}
    proc = run([str(Path(DVC).parent / "python"), "-m", "icmlora.stages.train_lora", "--task", "circle"], clone, env,
               ok=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "refused the request (401, user 'alice')" in proc.stderr and "MLFLOW_TRACKING_PASSWORD" in proc.stderr
    assert file_hashes(clone, *OUTS) == before


def test_no_password_reaches_a_tracked_file_or_a_run(on_the_server, stack):
    clones, _ = on_the_server
    for clone in clones.values():
        assert_no_secret_tracked(clone, stack)
    secrets = [stack.credentials["postgres"], stack.credentials["admin"], stack.credentials["aws_secret_access_key"],
               *stack.credentials["users"].values()]
    runs = all_runs(server_client(stack))
    assert len(runs) > 40
    for run_ in runs:
        values = [*run_.data.params.values(), *run_.data.tags.values()]
        assert not any(secret in value for secret in secrets for value in values), run_.info.run_id


# --- the server going away -------------------------------------------------------------------------

def _profile(folder: Path, epochs: int) -> Path:
    path = folder / "epochs.yaml"
    path.write_text(f"cvae:\n  train:\n    epochs: {epochs}\n    checkpoint_every: {epochs}\n")
    return path


def _cvae_run(clone: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([str(Path(DVC).parent / "python"), "-m", "icmlora.stages.train_cvae", "--rank", "2"],
                            cwd=clone, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_server_gone_mid_stage_costs_no_training_and_no_record(micro_pipeline, stack, tmp_path, e2e_env):
    """The MLflow server stopped while train_cvae@2 trains, for longer than the client's retry budget
    (made short here: no retry, 5 s timeouts), and started again after the stage ended. The stage
    finishes, exits 0 with one warning and writes what an undisturbed run writes; `icmlora tracking
    sync` then sends every epoch's metrics once; a sync replayed from halfway (what a cut sync leaves:
    records sent but not acknowledged) sends nothing twice."""
    import mlflow

    clone = clone_sharing_cache(micro_pipeline, tmp_path / "repo", e2e_env)
    epochs = 600  # the micro CVAE is tiny: long enough (some 10 s) to stop the server while it trains
    apply_profile(clone / "params.yaml", _profile(tmp_path, epochs))
    assert load_params(clone / "params.yaml").cvae.train.epochs == epochs
    env = {**{k: v for k, v in e2e_env.items() if not k.startswith("MLFLOW_TRACKING_")}, **stack.client_env("alice"),
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "ICMLORA_TRACKING_WAIT_S": "5"}
    undisturbed = _cvae_run(clone, env)
    out, err = undisturbed.communicate(timeout=600)
    assert undisturbed.returncode == 0, err[-3000:]
    expected = file_hashes(clone, "models/cvae/r2", "metrics/cvae")

    spools = clone / "state" / "tracking"
    stage = _cvae_run(clone, env)
    try:
        deadline = time.monotonic() + 300
        while not any(p.read_text().strip() for p in spools.glob("*.sent")):  # its run is on the server: it trains
            assert stage.poll() is None and time.monotonic() < deadline, stage.stderr.read()[-3000:]
            time.sleep(0.05)
        stack.stop("mlflow")
        out, err = stage.communicate(timeout=600)
    finally:
        if stage.poll() is None:
            stage.kill()
        stack.start_mlflow()
    assert stage.returncode == 0, err[-3000:]
    warnings = [line for line in err.splitlines() if "not sent" in line]
    assert len(warnings) == 1 and public_uri(stack.tracking_uri) in warnings[0] and "icmlora tracking sync" in warnings[0]
    assert file_hashes(clone, "models/cvae/r2", "metrics/cvae") == expected  # no training lost
    (waiting,) = spools.glob("*.jsonl")
    saved = tmp_path / "saved-spool"
    shutil.copytree(spools, saved)

    icmlora = [str(Path(DVC).parent / "icmlora"), "tracking"]
    assert "none wait" in run([*icmlora, "sync"], clone, env).stdout
    assert not list(spools.glob("*.jsonl"))
    client = server_client(stack)
    token = json.loads((saved / waiting.name).read_text().splitlines()[1])["run"]  # the run's create record

    def the_run():
        return all_runs(client, f"tags.`icmlora.run_token` = '{token}'")

    (logged,) = the_run()
    assert logged.info.status == "FINISHED"
    history = client.get_metric_history(logged.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, epochs + 1))  # every epoch, once

    # The spool as a sync cut halfway leaves it: the records after the first few sent, not acknowledged.
    shutil.copytree(saved, spools, dirs_exist_ok=True)
    (spools / waiting.with_suffix(".sent").name).write_text(json.dumps({"acked": 3}))
    assert "none wait" in run([*icmlora, "sync"], clone, env).stdout
    (again,) = the_run()
    assert again.info.run_id == logged.info.run_id
    history = client.get_metric_history(logged.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, epochs + 1))  # still every epoch, once
    assert client.get_run(logged.info.run_id).data.params == logged.data.params
