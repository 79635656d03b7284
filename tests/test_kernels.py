"""``icmlora.kernels``: the CPU's numeric code paths pinned before torch is imported, in every stage
process, unless the user says otherwise."""

import os
import subprocess
import sys

import pytest

from icmlora import kernels

PARAMS = "runtime:\n  threads: {threads}\n  portable_kernels: {portable}\n"


def _params(tmp_path, threads=0, portable="true"):
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS.format(threads=threads, portable=portable))
    return path


def test_pin_sets_every_variable_the_environment_leaves_unset(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "has_nvidia_gpu", lambda: False)
    env = {"MKL_CBWR": "COMPATIBLE"}  # the user's own choice: kept
    set_now = kernels.pin(["--params", str(_params(tmp_path))], environ=env)
    assert env == {"MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                   "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", kernels.PINNED_MARK: "2"}
    assert "MKL_CBWR" not in set_now and set_now["ATEN_CPU_CAPABILITY"] == "avx2"


def test_the_thread_count_is_runtime_threads_when_set(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "has_nvidia_gpu", lambda: False)
    env: dict = {}
    kernels.pin([f"--params={_params(tmp_path, threads=3)}"], environ=env)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3"


@pytest.mark.parametrize("portable, switch, pinned", [("true", None, True), ("false", None, False),
                                                      ("true", "0", False), ("false", "1", True)])
def test_params_switch_it_off_and_the_environment_wins_over_params(tmp_path, monkeypatch, portable, switch, pinned):
    monkeypatch.setattr(kernels, "has_nvidia_gpu", lambda: False)
    env = {} if switch is None else {kernels.SWITCH: switch}
    kernels.pin(["--params", str(_params(tmp_path, portable=portable))], environ=env)
    assert ("ATEN_CPU_CAPABILITY" in env) is pinned


def test_nothing_is_pinned_on_a_gpu_host(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "has_nvidia_gpu", lambda: True)
    env: dict = {}
    assert kernels.pin(["--params", str(_params(tmp_path))], environ=env) == {} and env == {}


def test_an_unreadable_params_file_pins_by_default(tmp_path, monkeypatch):
    """The stage's own parse reports a bad file (with its line) after this: the pin does not stop first."""
    monkeypatch.setattr(kernels, "has_nvidia_gpu", lambda: False)
    bad = tmp_path / "params.yaml"
    bad.write_text("runtime: [unclosed\n")
    env: dict = {}
    kernels.pin(["--params", str(bad)], environ=env)
    assert env["ATEN_CPU_CAPABILITY"] == "avx2"


def test_a_stage_process_runs_the_pinned_kernels(tmp_path):
    """Importing the stages package pins the process before torch: ATen reports AVX2 and the pinned
    thread count, whatever this host's own capability."""
    (tmp_path / "params.yaml").write_text(PARAMS.format(threads=0, portable="true"))
    env = {k: v for k, v in os.environ.items() if k not in kernels.portable_settings() and k != kernels.SWITCH}
    probe = ("import icmlora.stages, os, torch; print(torch.backends.cpu.get_cpu_capability(), torch.get_num_threads(), "
             "os.environ['MKL_CBWR'])")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    if kernels.has_nvidia_gpu():
        pytest.skip("a GPU host runs its native kernels")
    assert out.stdout.split() == ["AVX2", "2", "AVX2,STRICT"], out.stderr
