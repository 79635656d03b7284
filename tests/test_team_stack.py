"""The team stack's own pieces that need no server (tests/test_team.py runs the servers)."""

import json
import os
import stat

import pytest

from icmlora import team
from icmlora.errors import InputError


def test_a_recording_cut_by_a_crash_keeps_its_whole_requests(tmp_path):
    path = tmp_path / "s3-recording.jsonl"
    whole = "".join(json.dumps({"method": "PUT", "url": f"/b/{i}", "body": "QUJD"}) + "\n" for i in range(3))
    path.write_text(whole + '{"method": "PUT", "url": "/b/3", "bo')  # the endpoint died mid-write
    assert team._repair_recording(path)
    assert path.read_text() == whole
    path.write_text(whole + '{"method": "PUT"\n')  # a whole line that is not a whole request
    assert team._repair_recording(path) and path.read_text() == whole
    assert team._repair_recording(path) and path.read_text() == whole  # nothing more to cut
    lines = whole.splitlines()  # two threads appended at once: two requests on one line, then an empty one
    path.write_text(lines[0] + lines[1] + "\n\n" + lines[2] + "\n")
    assert team._repair_recording(path) and path.read_text() == whole
    path.write_text('{"method": "PU')
    assert not team._repair_recording(path) and path.read_text() == ""
    assert not team._repair_recording(tmp_path / "none.jsonl")


def test_credentials_are_generated_once_private_and_users_are_checked(tmp_path):
    stack = team.Stack(tmp_path / "t", team.Ports(1, 2, 3))
    creds = json.loads((tmp_path / "t" / "credentials.json").read_text())
    assert stat.S_IMODE(os.stat(tmp_path / "t" / "credentials.json").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "t").st_mode) == 0o700
    assert set(creds["users"]) == set(team.USERS) and len(set(creds["users"].values())) == len(team.USERS)
    again = team.Stack(tmp_path / "t")
    assert again.credentials == creds and again.state.ports == team.Ports(1, 2, 3)
    env = again.client_env("bob")
    assert env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:3" and env["MLFLOW_TRACKING_PASSWORD"] == creds["users"]["bob"]
    with pytest.raises(InputError, match="no MLflow user 'carol'"):
        again.client_env("carol")
    assert stack.exports("alice").splitlines()[0] == "export MLFLOW_TRACKING_URI=http://127.0.0.1:3"
