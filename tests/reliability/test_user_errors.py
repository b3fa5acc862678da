"""User errors that do not fit the bad-input table (tests/reliability/test_bad_inputs.py): Ctrl-C while
prepare's worker processes run, a stdout that cannot be written (a full device, a closed pipe), several
accelerate processes each printing the artifact path, a chat template of the tokenizer's own that refuses a
row, rows of a CSV export that has every column, and a name too long for the filesystem met inside a stage.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FIXTURES, systematic_rows, write_jsonl

from rdro_cli import prepare
from rdro_cli.dataprep.rows import parse_row

REPO = Path(__file__).resolve().parent.parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
for _rank in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"):
    ENV.pop(_rank, None)
STRICT_TEMPLATE = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception("
    "'Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{{ '<|im_start|>' + "
    "m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _rdro(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rdro_cli", *map(str, args)], env=ENV, cwd=REPO, text=True,
                          timeout=300, **kwargs)


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), stderr[-3000:]
    return lines[-1]


# ------------------------------------------------------------------------------ chat templates, rows


def test_a_tokenizers_own_template_that_refuses_a_row_names_the_model_and_the_row(cli, tmp_path,
                                                                                   tiny_tokenizer_dir):
    strict = tmp_path / "strict-tokenizer"
    shutil.copytree(tiny_tokenizer_dir, strict)
    config = json.loads((strict / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (strict / "tokenizer_config.json").write_text(json.dumps(config))
    (strict / "chat_template.jinja").write_text(STRICT_TEMPLATE)
    rows = systematic_rows(6) + [{"prompt": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                                  "completion": [{"role": "assistant", "content": "c"}], "label": True}]
    source = write_jsonl(tmp_path / "d.jsonl", rows)
    code, stdout, stderr = cli("prepare", "--dataset", source, "--model", strict, "--out", tmp_path / "out")
    assert code == 2 and stdout == "", stderr
    assert stderr.strip() == (f"error: {source}:7: {strict}'s chat template raised an error on this row: "
                              f"Conversation roles must alternate user/assistant/user/assistant/...; fix the row "
                              f"or the template (--chat-template FILE)")
    assert not (tmp_path / "out").exists()


def test_empty_chosen_and_rejected_columns_do_not_make_a_row_paired():
    for empty in ("", None, [], "  "):
        row = {"prompt": "p", "completion": "c", "label": "yes", "chosen": empty, "rejected": empty}
        [example] = parse_row(row, "d.csv:2", pair_id=3)
        assert (example.completion, example.label, example.pair_id) == ("c", True, -1)
    [example] = parse_row({"prompt": "p", "completion": "c", "label": 0, "chosen": None}, "d.csv:2", pair_id=3)
    assert example.pair_id == -1 and example.label is False
    # a filled pair wins over empty unpaired columns, as before
    chosen, rejected = parse_row({"prompt": "p", "chosen": "a", "rejected": "b", "completion": "", "label": ""},
                                 "d.csv:3", pair_id=4)
    assert (chosen.label, rejected.label, chosen.pair_id) == (True, False, 4)
    with pytest.raises(prepare.UserError, match=r"^d.csv:4: completion is empty$"):
        parse_row({"prompt": "p", "completion": "", "label": True, "chosen": "", "rejected": ""}, "d.csv:4", 0)


def test_a_csv_export_with_every_column_prepares_its_unpaired_and_paired_rows(cli, tmp_path, tiny_llama):
    import csv

    path = tmp_path / "export.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["prompt", "completion", "label", "chosen", "rejected"])
        writer.writeheader()
        for i in range(12):
            writer.writerow({"prompt": f"question {i}", "completion": f"answer {i}", "label": i % 2 == 0,
                             "chosen": "", "rejected": ""})
        writer.writerow({"prompt": "question 99", "completion": "", "label": "", "chosen": "good",
                         "rejected": "bad"})
    code, stdout, stderr = cli("prepare", "--dataset", path, "--model", tiny_llama, "--out", tmp_path / "out",
                               "--test-fraction", "0.2")
    assert code == 0, stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    counts = manifest["counts"]
    assert sum(c["rows"] for c in counts.values()) == 14 and sum(c["pairs"] for c in counts.values()) == 1


# ------------------------------------------------------------------------------ a name too long


def test_a_name_too_long_met_inside_a_stage_is_one_line(cli, tmp_path, monkeypatch):
    long_path = str(tmp_path / ("n" * 300))

    def too_long(cfg, **kwargs):
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), long_path)

    monkeypatch.setattr(prepare, "run", too_long)
    code, stdout, stderr = cli("prepare", "--dataset", FIXTURES / "mix14k_sample.jsonl", "--model", "x",
                               "--out", tmp_path / "out")
    assert code == 2 and stdout == "", stderr
    assert stderr.strip().startswith(f"error: {long_path}: a name in this path is longer than the filesystem allows")
    assert len(stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------ Ctrl-C


@pytest.mark.slow
def _sigint_as_in_a_terminal() -> None:
    """A process started with SIGINT ignored keeps it ignored (Python then installs no KeyboardInterrupt handler,
    rightly: a background job is not to be interrupted by Ctrl-C). pytest-xdist's workers run with SIGINT
    ignored, so the child gets the disposition an interactive shell gives a foreground command."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_while_prepare_workers_run_is_one_line_and_exit_130(tmp_path, tiny_llama):
    """What a terminal does on Ctrl-C: SIGINT to the whole foreground process group, map's workers included."""
    with (tmp_path / "rows.jsonl").open("w") as handle:
        for i in range(80000):  # long enough that the map is still running when the signal lands
            handle.write(json.dumps({"prompt": f"question {i} " + "what is the answer " * 6,
                                     "completion": "yes good answer " * 8, "label": i % 2 == 0}) + "\n")
    out = tmp_path / "data"
    # a work dir a killed prepare left behind (its process is gone): the next run removes it
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"data.tmp-workdeadbeef-{dead.pid}"
    (stale / "source").mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-m", "rdro_cli", "prepare", "--dataset", tmp_path / "rows.jsonl",
                             "--model", tiny_llama, "--out", out, "--set", "data.num_proc=2"],
                            env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_sigint_as_in_a_terminal)
    try:
        deadline = time.monotonic() + 120
        # the workers are writing (datasets names each worker's file tmp* until its shard is done)
        while not list(tmp_path.glob("data.tmp-work*-[0-9]*/tmp*")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        time.sleep(0.2)
        assert proc.poll() is None, "prepare finished before the interrupt: make the dataset larger"
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # hung: take its whole group down, workers included
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, (stdout, stderr[-3000:])
    assert stdout == ""
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    messages = [line for line in stderr.splitlines() if not line.startswith(("tokenising ", "writing "))]
    assert messages == ["rdro prepare: interrupted"], stderr[-3000:]
    assert not (out / "manifest.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"], "left temporary files behind"


# ------------------------------------------------------------------------------ stdout that cannot be written


def test_stdout_on_a_full_device_is_one_line_and_exit_2(tmp_path):
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    for args in (["validate", "recipes/tiny-cpu.toml"], ["--version"], ["validate", "--help"]):
        with open("/dev/full", "w") as full:
            result = _rdro(*args, stdout=full, stderr=subprocess.PIPE)
        assert result.returncode == 2, (args, result.stderr[-3000:])
        line = _one_error_line(result.stderr)
        assert line.startswith("error: cannot write to stdout (No space left on device)"), line
        assert len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)


@pytest.mark.slow
def test_a_stage_printing_its_path_into_a_full_device_is_one_line(tmp_path, tiny_llama):
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    with open("/dev/full", "w") as full:
        result = _rdro("prepare", "--dataset", FIXTURES / "mix14k_sample.jsonl", "--model", tiny_llama,
                       "--out", tmp_path / "data", stdout=full, stderr=subprocess.PIPE)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "cannot write to stdout (No space left on device)" in _one_error_line(result.stderr)
    assert (tmp_path / "data" / "manifest.json").exists()  # the work itself was done


def test_a_closed_stdout_pipe_ends_quietly_with_141():
    """`rdro validate r.toml | head -0`: like `cat` there, no message; the status a shell shows for it (141)."""
    for args in (["validate", "recipes/tiny-cpu.toml"], ["--version"], ["prepare", "--help"]):
        read, write = os.pipe()
        os.close(read)
        try:
            result = _rdro(*args, stdout=write, stderr=subprocess.PIPE)
        finally:
            os.close(write)
        assert result.returncode == 141, (args, result.stderr[-3000:])
        assert "Traceback" not in result.stderr and "error" not in result.stderr, result.stderr
        assert "BrokenPipe" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr


# ------------------------------------------------------------------------------ several processes


@pytest.mark.parametrize("variable", ["RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK"])
def test_only_the_main_process_prints_to_stdout(cli, tmp_path, tiny_llama, monkeypatch, variable):
    source = write_jsonl(tmp_path / "rows.jsonl", systematic_rows(16))
    args = ["prepare", "--dataset", source, "--model", tiny_llama, "--test-fraction", "0.25"]
    monkeypatch.setenv(variable, "1")
    code, stdout, stderr = cli(*args, "--out", tmp_path / "rank1")
    assert code == 0 and stdout == "", stderr
    code, stdout, stderr = cli("validate", REPO / "recipes" / "tiny-cpu.toml")
    assert code == 0 and stdout == "", stderr
    monkeypatch.setenv(variable, "0")
    code, stdout, stderr = cli(*args, "--out", tmp_path / "rank0")
    assert code == 0 and stdout == f"{tmp_path / 'rank0'}\n", stderr


@pytest.mark.slow
def test_accelerate_launch_with_two_processes_prints_the_path_once(tmp_path, tiny_llama):
    accelerate = Path(sys.executable).parent / "accelerate"
    data = tmp_path / "data"
    result = _rdro("prepare", "--dataset", FIXTURES / "mix14k_sample.jsonl", "--model", tiny_llama, "--out", data,
                   "--test-fraction", "0.25", capture_output=True)
    assert result.returncode == 0, result.stderr[-3000:]
    launch = [str(accelerate), "launch", "--config_file", str(REPO / "recipes" / "accelerate" / "ddp-cpu-2.yaml"),
              str(Path(sys.executable).parent / "rdro")]
    result = subprocess.run([*launch, "logprobs", "--data", str(data), "--model", str(tiny_llama), "--out",
                             str(tmp_path / "logprobs")], env=ENV, cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == f"{tmp_path / 'logprobs'}\n"
    result = subprocess.run([*launch, "validate", "recipes/tiny-cpu.toml"], env=ENV, cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("[model]") == 1
