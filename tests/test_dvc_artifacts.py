"""dvc.yaml's `artifacts:`: what a colleague fetches with `dvc artifacts get <repo-url> <name>`, running nothing.

The artifacts section is checked as declared (paths the pipeline writes, type model, a desc), then
used for real in a small repository: the section copied verbatim from dvc.yaml, stages that write a
few bytes at each artifact's path (one output where dvc.yaml's path is one output, two where it is a
folder of per-rank outputs), a DVC remote in a local folder, an annotated version tag per artifact,
and a bare git "server". `dvc artifacts get` from a third folder must bring every file byte for byte
from the remote alone (the source's cache is gone by then).
"""

from __future__ import annotations

import os
import shutil

import pytest
import yaml

from e2e_helpers import BIN, GIT_ID, commit_all, file_hashes, run

DVC = str(BIN / "dvc")
UP_TO_DATE = "Data and pipelines are up to date."


def declared_artifacts(repo) -> dict[str, dict]:
    return yaml.safe_load((repo / "dvc.yaml").read_text())["artifacts"]


def single_outputs(repo) -> set[str]:
    """dvc.yaml's outputs that are not templated (one path, whatever the params)."""
    outs = set()
    for spec in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"].values():
        for entry in spec.get("do", spec).get("outs", []):
            path = next(iter(entry)) if isinstance(entry, dict) else entry
            if "${" not in path:
                outs.add(path)
    return outs


def test_the_artifacts_are_the_pipelines_models_with_a_description(repo):
    import icmlora.artifacts as a

    artifacts = declared_artifacts(repo)
    assert {name: spec["path"] for name, spec in artifacts.items()} == {
        "base-model": a.BASE_MODEL_DIR.as_posix(), "generators": a.CVAE_DIR.as_posix()}
    for name, spec in artifacts.items():
        assert spec["type"] == "model" and len(spec["desc"]) > 40, name
    # the base model is one output; the generators are a folder of one output per rank
    assert "models/base" in single_outputs(repo) and "models/cvae" not in single_outputs(repo)


@pytest.mark.slow
@pytest.mark.long
def test_dvc_artifacts_get_fetches_each_artifact_from_the_remote(repo, tmp_path):
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", DVC_NO_ANALYTICS="1")
    env.pop("DVC_STUDIO_TOKEN", None)  # the remote, not DVC Studio
    artifacts = declared_artifacts(repo)
    src, remote = tmp_path / "src", tmp_path / "remote"
    src.mkdir()
    run(["git", "init", "-q"], src)
    run([DVC, "init", "-q"], src, env)
    # An absolute remote: a colleague's clone resolves a relative one against its own temporary folder.
    run([DVC, "remote", "add", "-d", "shared", str(remote)], src, env)
    stages, singles = {}, single_outputs(repo)
    for i, (name, spec) in enumerate(artifacts.items()):
        outs = [spec["path"]] if spec["path"] in singles else [f"{spec['path']}/r1", f"{spec['path']}/r2"]
        writes = "; ".join(
            f"p = pathlib.Path('{out}'); (p / 'sub').mkdir(parents=True, exist_ok=True); "
            f"(p / 'weights.bin').write_bytes(bytes(range(256)) * {i + j + 2}); "
            f"(p / 'sub' / 'config.json').write_text('{{\"n\": {i * 10 + j}}}')" for j, out in enumerate(outs))
        stages[f"make-{name}"] = {"cmd": f'python -c "import pathlib; {writes}"', "outs": outs}
    (src / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages, "artifacts": artifacts}, sort_keys=False))
    run([DVC, "repro"], src, env)
    status = run([DVC, "status"], src, env).stdout
    assert UP_TO_DATE in status, status  # the artifacts section adds nothing to run
    commit_all(src, "micro artifacts")
    for name in artifacts:
        run(["git", *GIT_ID, "tag", "-a", f"{name}@v0.1.0", "-m", f"Registering artifact {name} version v0.1.0"], src)
    run([DVC, "push"], src, env)
    origin = tmp_path / "origin.git"
    run(["git", "clone", "-q", "--bare", str(src), str(origin)], tmp_path)
    shutil.rmtree(src / ".dvc" / "cache")  # only the remote holds the data now

    colleague = tmp_path / "colleague"
    colleague.mkdir()
    for name, spec in artifacts.items():
        out = run([DVC, "artifacts", "get", origin.as_uri(), name, "-o", name], colleague, env)
        expected = {k.removeprefix(spec["path"] + "/"): v for k, v in file_hashes(src, spec["path"]).items()}
        got = {k.removeprefix(name + "/"): v for k, v in file_hashes(colleague, name).items()}
        assert len(expected) >= 2 and got == expected, (name, out.stdout, out.stderr)
