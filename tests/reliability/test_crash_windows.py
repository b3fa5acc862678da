"""Crash windows (issue 13.1): a stage killed (SIGKILL via `RDRO_FAULT`, `artifacts.fault_point`) inside
the publishing of an artifact, then a new run: the last good artifact is found and used, and nothing a
later stage needs is deleted.

    replace-between-renames   `final -> <name>.old-<pid>` done, `tmp -> final` not: no artifact under its
                              name, the old one complete beside it
    publish-before-dir-fsync  the new artifact renamed into place, its directory not yet fsynced (and,
                              when it replaced one, the old copy not yet removed)

5 cases: each point when `prepare` replaces data (the next reader, `logprobs`, restores / uses it), when
`logprobs` replaces its output (re-run: restored and up to date), and both points when `eval` replaces its
output (re-run: up to date, leftovers of the dead process cleaned away).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import systematic_rows, write_jsonl
from typer.testing import CliRunner

from rdro_cli import verify
from rdro_cli.cli import app
from rdro_cli.store import integrity

pytestmark = pytest.mark.slow

RDRO = str(Path(sys.executable).parent / "rdro")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _in_process(*args) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output[-3000:]
    return result.stderr + result.stdout


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("crash")
    source = write_jsonl(root / "rows.jsonl", systematic_rows(24))
    w = {"root": root, "run": root / "run"}
    w["prepare"] = ["prepare", "--dataset", source, "--model", tiny_llama]
    _in_process(*w["prepare"], "--out", w["run"] / "data")
    w["logprobs"] = ["logprobs", "--model", tiny_llama]
    _in_process(*w["logprobs"], "--data", w["run"] / "data", "--out", w["run"] / "logprobs")
    w["eval"] = ["eval", "--model", tiny_llama, "--tasks", "preference"]
    _in_process(*w["eval"], "--data", w["run"] / "data", "--logprobs", w["run"] / "logprobs",
                "--out", w["run"] / "eval")
    return w


def _crash(args: list, point: str) -> int:
    """Runs a command that SIGKILLs itself at `point`; returns its pid."""
    proc = subprocess.Popen([RDRO, *map(str, args)], env={**ENV, "RDRO_FAULT": point}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == -9, (proc.returncode, stderr[-3000:])  # killed at the point, not before
    return proc.pid


def _bytes(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_prepare_killed_between_the_renames_the_next_reader_restores_and_uses_the_old_data(good, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(good["run"] / "data", run / "data")
    before = _bytes(run / "data")
    pid = _crash([*good["prepare"], "--out", run / "data", "--force"], "replace-between-renames")
    assert not (run / "data").exists()
    old = run / f"data.old-{pid}"
    assert integrity.artifact_problem(old) is None and _bytes(old) == before  # complete beside its name
    _in_process(*good["logprobs"], "--data", run / "data", "--out", run / "logprobs")
    assert _bytes(run / "data") == before and not old.exists()
    assert _bytes(run / "logprobs")["train.safetensors"] == _bytes(good["run"] / "logprobs")["train.safetensors"]
    assert {r[2] for r in verify.check_run(run) if r[0] != "temporary"} == {"ok"}


def test_prepare_killed_before_the_dir_fsync_leaves_a_complete_artifact_the_reader_uses(good, tmp_path):
    run = tmp_path / "run"
    _crash([*good["prepare"], "--out", run / "data"], "publish-before-dir-fsync")
    assert integrity.artifact_problem(run / "data") is None
    assert json.loads((run / "data" / "manifest.json").read_text())["fingerprint"] == \
        json.loads((good["run"] / "data" / "manifest.json").read_text())["fingerprint"]
    _in_process(*good["logprobs"], "--data", run / "data", "--out", run / "logprobs")
    assert _bytes(run / "logprobs")["train.safetensors"] == _bytes(good["run"] / "logprobs")["train.safetensors"]


def test_logprobs_killed_between_the_renames_the_rerun_restores_it_and_is_up_to_date(good, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(good["run"] / "data", run / "data")
    shutil.copytree(good["run"] / "logprobs", run / "logprobs")
    before = _bytes(run / "logprobs")
    args = [*good["logprobs"], "--data", run / "data", "--out", run / "logprobs"]
    pid = _crash([*args, "--force"], "replace-between-renames")
    assert not (run / "logprobs").exists() and (run / f"logprobs.old-{pid}").is_dir()
    output = _in_process(*args)
    assert "up to date" in output  # found and used, not recomputed
    assert _bytes(run / "logprobs") == before
    assert not list(run.glob("logprobs.old-*")) and not list(run.glob("logprobs.tmp-*"))


@pytest.mark.parametrize("point", ["replace-between-renames", "publish-before-dir-fsync"])
def test_eval_killed_while_replacing_its_output_the_rerun_is_up_to_date_and_cleans_up(good, tmp_path, point):
    run = tmp_path / "run"
    for name in ("data", "logprobs", "eval"):
        shutil.copytree(good["run"] / name, run / name)
    reference = json.loads((good["run"] / "eval" / "eval.json").read_text())["tasks"]
    args = [*good["eval"], "--data", run / "data", "--logprobs", run / "logprobs", "--out", run / "eval"]
    pid = _crash([*args, "--force"], point)
    if point == "replace-between-renames":
        assert not (run / "eval").exists() and (run / f"eval.old-{pid}").is_dir()
    else:  # the new copy is in place and complete; the old one was not removed yet
        assert integrity.artifact_problem(run / "eval") is None and (run / f"eval.old-{pid}").is_dir()
    output = _in_process(*args)
    assert "up to date" in output
    assert json.loads((run / "eval" / "eval.json").read_text())["tasks"] == reference
    assert not list(run.glob("eval.old-*")) and not list(run.glob("eval.tmp-*"))
    assert [r[2] for r in verify.check_run(run)] == ["ok", "ok", "ok"]
