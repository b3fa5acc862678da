"""Integrity (issue 13.3): manifests seal the digests of every published file; consumers and `rdro verify`
notice any change.

Unit tests use hand-worked values (published digest test vectors, sizes counted by hand). The corruption
suite builds one tiny run (prepare -> logprobs -> LoRA train with checkpoints -> merge -> eval) per module
and damages, in a copy, one file of each kind with one flipped byte and with a truncation: 7 kinds x 2 =
14 cases, each refused in one line by the stage that reads it AND reported DAMAGED by `rdro verify`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import systematic_rows, write_jsonl
from typer.testing import CliRunner

from rdro_cli import verify
from rdro_cli.cli import app
from rdro_cli.errors import UserError
from rdro_cli.store import digests, diskspace, integrity, manifests

# ------------------------------------------------------------------------------------------- digests


def test_digest_file_matches_published_test_vectors(tmp_path):
    empty, abc = tmp_path / "empty", tmp_path / "abc"
    empty.write_bytes(b"")
    abc.write_bytes(b"abc")
    # FIPS 180-2 appendix B.1, and the xxHash reference's XXH3_128bits("") vector
    assert digests.digest_file(abc, "sha256") == \
        "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert digests.digest_file(empty, "sha256") == \
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert digests.digest_file(empty) == "xxh3_128:99aa06d3014798d86001c324468d497f"


def test_digest_reads_in_blocks_like_one_pass(tmp_path):
    import hashlib

    big = tmp_path / "big"
    payload = os.urandom((8 << 20) + 12345)  # more than one 8 MiB block
    big.write_bytes(payload)
    assert digests.digest_file(big, "sha256") == "sha256:" + hashlib.sha256(payload).hexdigest()


def test_cache_survives_a_rename_and_notices_an_in_place_write(tmp_path, monkeypatch):
    monkeypatch.setenv("RDRO_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    real = digests.digest_file
    monkeypatch.setattr(digests, "digest_file", lambda p, a=digests.ALGORITHM: calls.append(p) or real(p, a))
    first = tmp_path / "a.bin"
    first.write_bytes(b"x" * 1000)
    digest = digests.digest_cached(first)
    moved = tmp_path / "moved.bin"
    os.replace(first, moved)  # how artifacts are published: same inode, size and mtime
    digests._memo.clear()  # the on-disk cache alone must answer
    assert digests.digest_cached(moved) == digest and len(calls) == 1
    with open(moved, "r+b") as handle:  # in place: same size, new mtime
        handle.seek(500)
        handle.write(b"y")
    os.utime(moved, ns=(os.stat(moved).st_atime_ns, os.stat(moved).st_mtime_ns + 1000))
    assert digests.digest_cached(moved) != digest and len(calls) == 2


def test_tree_digests_lists_every_file_with_its_size(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "a.txt").write_bytes(b"12345")
    (tmp_path / "sub" / "b.bin").write_bytes(b"")
    (tmp_path / "sub" / "deeper" / "c").write_bytes(b"xy")
    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / "skipme").mkdir()
    (tmp_path / "skipme" / "d").write_text("d")
    found = integrity.tree_digests(tmp_path, exclude=("manifest.json", "skipme"))
    assert list(found) == ["a.txt", "sub/b.bin", "sub/deeper/c"]
    assert [e["size"] for e in found.values()] == [5, 0, 2]
    assert found["sub/b.bin"]["digest"] == "xxh3_128:99aa06d3014798d86001c324468d497f"


def _sealed_artifact(directory: Path, stage: str = "prepare") -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "rows.bin").write_bytes(bytes(range(256)) * 4)
    (directory / "nested").mkdir(exist_ok=True)
    (directory / "nested" / "more.txt").write_text("hello\n")
    return manifests.write_manifest(directory, stage=stage, fingerprint="f" * 64, inputs={"x": "y"},
                                    config={"a": 1.5, "b": [1, 2], "path": Path("/p")}, counts={"rows": 3},
                                    started=0.0)


def test_manifest_records_files_and_seals_itself(tmp_path):
    manifest = _sealed_artifact(tmp_path / "art")
    assert set(manifest["files"]) == {"rows.bin", "nested/more.txt"}
    assert manifest["files"]["rows.bin"]["size"] == 1024
    text = (tmp_path / "art" / "manifest.json").read_text()
    body = json.loads(text)
    digest = body.pop("manifest_digest")
    import hashlib

    assert digest == hashlib.sha256((json.dumps(body, indent=2) + "\n").encode()).hexdigest()
    assert integrity.artifact_problem(tmp_path / "art") is None
    assert manifests.require_input(tmp_path / "art", "prepare")["counts"] == {"rows": 3}


def test_every_single_byte_flip_and_every_truncation_of_a_manifest_is_noticed(tmp_path):
    _sealed_artifact(tmp_path / "art")
    path = tmp_path / "art" / "manifest.json"
    original = path.read_bytes()
    missed = []
    for i in range(len(original)):
        for mask in (0x01, 0x20):  # a low bit, and the bit that flips letter case / space <-> NUL
            damaged = bytearray(original)
            damaged[i] ^= mask
            path.write_bytes(bytes(damaged))
            if integrity.manifest_problem(tmp_path / "art") is None:
                missed.append((i, mask))
    for length in range(len(original)):
        path.write_bytes(original[:length])
        if integrity.manifest_problem(tmp_path / "art") is None:
            missed.append(("truncated", length))
    path.write_bytes(original)
    assert integrity.manifest_problem(tmp_path / "art") is None
    assert missed == [], missed[:10]


def test_a_manifest_from_before_digests_is_accepted_unverified(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "manifest.json").write_text(json.dumps({"stage": "prepare", "schema_version": 1}))
    assert integrity.artifact_problem(tmp_path / "old") is None
    rows = verify.check_run(tmp_path / "old")
    assert [r[2] for r in rows] == ["unsealed"]


@pytest.mark.parametrize("damage, expected", [
    ("flip", "content differs from its recorded digest"),
    ("truncate", "1023 bytes, 1024 recorded"),
    ("delete", "missing"),
])
def test_file_damage_is_one_line_naming_the_file_and_the_stage(tmp_path, damage, expected):
    _sealed_artifact(tmp_path / "art", stage="logprobs")
    target = tmp_path / "art" / "rows.bin"
    data = bytearray(target.read_bytes())
    if damage == "flip":
        data[100] ^= 0x04
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(bytes(data[:-1]))
    else:
        target.unlink()
    with pytest.raises(UserError) as err:
        manifests.require_input(tmp_path / "art", "logprobs")
    message = str(err.value)
    assert "\n" not in message and str(target) in message and expected in message
    assert "re-run `rdro logprobs` with --force" in message
    assert not manifests.is_done(tmp_path / "art", "f" * 64)  # a damaged output is rebuilt, not "up to date"


def test_reseal_records_a_deliberate_change(tmp_path):
    _sealed_artifact(tmp_path / "art")
    (tmp_path / "art" / "rows.bin").write_bytes(b"new")
    assert integrity.artifact_problem(tmp_path / "art") is not None
    integrity.reseal(tmp_path / "art")
    assert integrity.artifact_problem(tmp_path / "art") is None


# ------------------------------------------------------------------------------------------- disk full errors


def test_disk_full_is_recognised_in_every_shape_libraries_raise_it():
    assert diskspace.disk_errno(OSError(errno.ENOSPC, "No space left on device")) == errno.ENOSPC
    assert diskspace.disk_errno(OSError(errno.EFBIG, "File too large")) == errno.EFBIG
    assert diskspace.disk_errno(Exception("Error while serializing: I/O error: File too large (os error 27)")) \
        == errno.EFBIG
    try:  # torch.save through a file object: a RuntimeError raised while handling the OSError
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("unexpected pos 576 vs 534")  # noqa: B904 - the implicit context is the point
    except RuntimeError as err:
        assert diskspace.disk_errno(err) == errno.ENOSPC
    assert diskspace.disk_errno(ValueError("bad value")) is None
    assert diskspace.disk_errno(OSError(errno.EACCES, "Permission denied")) is None


def test_writing_turns_a_full_disk_into_one_line_with_the_space_needed(tmp_path):
    with pytest.raises(UserError) as err, diskspace.writing(tmp_path / "out", 3 * 1024 * 1024):
        raise OSError(errno.ENOSPC, "No space left on device")
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "out") in message
    assert "no space left on device" in message and "about 3.0 MiB needed" in message and "free there" in message
    with pytest.raises(ValueError), diskspace.writing(tmp_path / "out", 1):
        raise ValueError("not a disk problem")


# ------------------------------------------------------------------------------------------- the corruption suite


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("integrity")
    source = write_jsonl(root / "rows.jsonl", systematic_rows(24))
    common = ["--set", f"output.dir={json.dumps(str(root / 'run'))}", "--set", f"model.name={json.dumps(str(tiny_llama))}"]
    for args in (["prepare", "--dataset", str(source)], ["logprobs"],
                 ["train", "--set", "lora.enabled=true", "--set", "train.max_steps=4", "--set", "train.save_every=2",
                  "--set", "train.batch_size=4"],
                 ["merge"], ["eval", "--tasks", "preference"]):
        result = CliRunner().invoke(app, [*args, *common], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    run = root / "run"
    assert [r[2] for r in verify.check_run(run)] == ["ok"] * 7  # 5 stages + 2 checkpoints
    return run, tiny_llama


def _cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stderr


# kind -> (file inside the run, command reading it; {run} {model} {tmp} are filled in)
KINDS = {
    "data-arrow": ("data/train/data-00000-of-00001.arrow", "prepare",
                   ["logprobs", "--data", "{run}/data", "--model", "{model}", "--out", "{tmp}/lp"]),
    "logprobs-safetensors": ("logprobs/train.safetensors", "logprobs",
                             ["train", "--data", "{run}/data", "--logprobs", "{run}/logprobs", "--model", "{model}",
                              "--out", "{tmp}/train"]),
    "checkpoint-weights": ("train/checkpoints/step-0000004/model/adapter_model.safetensors", "checkpoint",
                           ["train", "--data", "{run}/data", "--logprobs", "{run}/logprobs", "--model", "{model}",
                            "--out", "{run}/train", "--resume", "--set", "lora.enabled=true", "--set",
                            "train.max_steps=4", "--set", "train.save_every=2", "--set", "train.batch_size=4"]),
    "optimizer-state": ("train/checkpoints/step-0000004/optimizer.pt", "checkpoint",
                        ["train", "--data", "{run}/data", "--logprobs", "{run}/logprobs", "--model", "{model}",
                         "--out", "{run}/train", "--resume", "--set", "lora.enabled=true", "--set",
                         "train.max_steps=4", "--set", "train.save_every=2", "--set", "train.batch_size=4"]),
    "final-adapter": ("train/final/adapter_model.safetensors", "train",
                      ["merge", "--adapter", "{run}/train/final", "--out", "{tmp}/merged"]),
    "merged-shard": ("merged/model.safetensors", "merge",
                     ["eval", "--model", "{run}/merged", "--tasks", "preference", "--data", "{run}/data",
                      "--logprobs", "{run}/logprobs", "--out", "{tmp}/eval"]),
    "manifest-json": ("logprobs/manifest.json", "logprobs",
                      ["train", "--data", "{run}/data", "--logprobs", "{run}/logprobs", "--model", "{model}",
                       "--out", "{tmp}/train"]),
}


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))
    else:
        path.write_bytes(bytes(data[: len(data) // 2]))


@pytest.mark.parametrize("how", ["flip", "truncate"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_damage_is_refused_by_the_consumer_and_reported_by_verify(tiny_run, tmp_path, kind, how):
    source_run, model = tiny_run
    run = tmp_path / "run"
    shutil.copytree(source_run, run)
    relative, producer, command = KINDS[kind]
    target = run / relative
    _damage(target, how)

    # rdro verify: exit 1, the damaged artifact's row says DAMAGED and names the file
    code, stdout_err = _verify(run)
    assert code == 1, stdout_err
    damaged_rows = [line for line in stdout_err.splitlines() if "DAMAGED" in line]
    assert len(damaged_rows) == 1 and (str(target) in damaged_rows[0] or kind == "manifest-json"), stdout_err
    assert str(target.parent if kind != "manifest-json" else target) in damaged_rows[0]

    # the stage that reads it: exit 2, one line naming the file and what to re-run, no traceback
    if producer == "checkpoint":
        (run / "train" / "manifest.json").unlink()  # an unfinished run, so --resume reads the checkpoint
    args = [a.format(run=run, model=model, tmp=tmp_path) for a in command]
    code, stderr = _cli(*args)
    assert code == 2, stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr, stderr
    flat = " ".join(stderr.split())  # rich may wrap long paths in a narrow test console
    assert str(target) in flat.replace(" ", "") or str(target) in flat, stderr
    assert "damaged" in flat or "missing" in flat, stderr
    if producer == "checkpoint":
        assert "delete" in flat and "--force" in flat
    else:
        assert f"rdro {producer}" in flat and "--force" in flat


def _verify(run: Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["verify", str(run)], catch_exceptions=False)
    return result.exit_code, result.stdout + result.stderr


def test_verify_prints_every_stage_and_exits_0_on_an_intact_run(tiny_run):
    run, _ = tiny_run
    code, output = _verify(run)
    assert code == 0, output
    for name in ("data", "logprobs", "train", "merged", "eval", "step-0000002", "step-0000004"):
        assert any(name in line and " ok " in f" {line} " for line in output.splitlines()), (name, output)
    assert "7 artifacts intact" in output
    result = CliRunner().invoke(app, ["verify", "--set", f"output.dir={json.dumps(str(run))}"])
    assert result.exit_code == 0 and "7 artifacts intact" in result.stderr  # RUN_DIR defaults to output.dir


def test_verify_on_a_missing_dir_is_one_line(tmp_path):
    code, output = _verify(tmp_path / "nope")
    assert code == 2 and "not a directory" in output
