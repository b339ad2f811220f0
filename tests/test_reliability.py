"""Issue 15, "nothing lost, nothing overwritten, never a traceback": a test per failure class of the fault campaign.

1 one lock per output · 2 the output guard · 3 --resume checks a finished store · 4 a full disk · 5 unwritable
outputs · 6 damaged shards · 7 swapped bundle models · 8 workers die with their parent · 9 progress saved every
few seconds · 10 one-line usage errors · then the campaign's smaller cases. Second writers and kills are real
processes; a full disk is a small tmpfs (in a private mount namespace) or an injected ``OSError(ENOSPC)``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import types
import warnings
import zlib
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.conftest import interrupt_embedding, write_png_folder
from xsel.bundle import ENCODER_FILE, MANIFEST, Bundle
from xsel.embed import embed
from xsel.errors import InputError
from xsel.store import read_store

XSEL = [sys.executable, "-m", "xsel"]


def one_line_error(result) -> str:
    """The single red line a failure prints (CliRunner result or finished process) after any notes, never a
    traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), result.stderr
    assert all(line.startswith(("note: ", "warning: ")) for line in lines[:-1]), result.stderr
    return lines[-1]


def run_xsel(*args, **options) -> subprocess.CompletedProcess:
    return subprocess.run([*XSEL, *map(str, args)], capture_output=True, text=True, timeout=300, **options)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """An image CSV, its pixels store, a second store and an encoder-only bundle, shared read-only by the tests."""
    folder = tmp_path_factory.mktemp("work")
    csv = write_png_folder(folder / "data", 20)
    embed(csv, folder / "pool.h5", encoder="pixels", workers=0, show_progress=False)
    shutil.copy(folder / "pool.h5", folder / "copy.h5")
    from xsel.train.export import export_bundle

    export_bundle(folder / "bundle", encoder="pixels", image_size=32)
    return types.SimpleNamespace(
        folder=folder, csv=csv, store=folder / "pool.h5", copy=folder / "copy.h5", bundle=folder / "bundle"
    )


def snapshot(*paths: Path) -> dict:
    return {path: path.read_bytes() for path in paths}


# 1 ── one lock per output ─────────────────────────────────────────────────────────────────────────────────────────

HOLDER = """
import sys
from contextlib import ExitStack
from xsel.io.outputs import output_lock
with ExitStack() as stack:
    for path in sys.argv[1:]:
        stack.enter_context(output_lock(path))
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_second_writer_of_any_output_is_refused_before_work(work, tmp_path, cli):
    """Another process writes each output (it holds the lock); every command that writes one is refused at once,
    in one line, and creates nothing."""
    out = {
        name: tmp_path / name
        for name in (
            "embed.h5",
            "sel.csv",
            "merged.h5",
            "scan.csv",
            "labels",
            "eval",
            "sel-run",
            "clf-run",
            "bundle",
            "cams",
            "demo",
            "site.h5",
        )
    }
    cases = [
        ("embed", work.csv, "--out", out["embed.h5"], "--encoder", "pixels"),
        ("select", work.store, "--k", "3", "--out", out["sel.csv"]),
        ("store", "merge", work.store, work.copy, "--out", out["merged.h5"]),
        ("scan", work.csv.parent, "--out", out["scan.csv"]),
        ("export-labels", work.csv, "--out", out["labels"]),
        ("evaluate", work.store, "--conditions", "Label", "--out", out["eval"]),
        ("train", "selector", work.store, "--conditions", "A", "--val-conditions", "B", "--out", out["sel-run"]),
        ("train", "classifier", work.csv, "--labels", "Label", "--store", work.store, "--out", out["clf-run"]),
        ("export", "--encoder", "pixels", "--out", out["bundle"]),
        ("explain", work.csv, work.csv, "--label", "Label", "--out", out["cams"]),
        ("demo", "--out", out["demo"]),
        (
            "select",
            work.csv,
            "--bundle",
            work.bundle,
            "--selector",
            "typiclust",
            "--k",
            "3",
            "--out",
            tmp_path / "s.csv",
            "--store",
            out["site.h5"],
        ),
    ]
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, *map(str, out.values())],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        for args in cases:
            result = cli(*args)
            assert result.exit_code == 2, (args, result.output)
            assert f"is being written by another xsel process (PID {holder.pid}" in one_line_error(result), args
        assert not any(path.exists() for path in out.values())
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert not list(tmp_path.glob("*.lock")), "the holder removes its lock files when it is done"


def test_two_embeds_of_one_store_never_mix(tmp_path):
    """Two real processes embed different CSVs into one store at once: each finishes or is refused in one line, and
    the store holds one CSV's paths with that CSV's own embeddings (the campaign saw A's paths, B's embeddings)."""
    csvs = [write_png_folder(tmp_path / name, 30, seed=seed) for name, seed in (("a", 1), ("b", 2))]
    out = tmp_path / "out" / "pool.h5"
    runs = [
        subprocess.Popen(
            [*XSEL, "embed", csv, "--out", out, "--encoder", "pixels", "--overwrite", "--workers", "0", "-q"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for csv in csvs
    ]
    finished = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    for code, stderr in finished:
        assert "Traceback" not in stderr and code in (0, 2), stderr
        if code == 2:
            assert "is being written by another xsel process" in stderr
    assert 0 in [code for code, _ in finished]
    store = read_store(out)
    references = [
        read_store(embed(csv, tmp_path / f"ref{i}.h5", encoder="pixels", workers=0, show_progress=False).store)
        for i, csv in enumerate(csvs)
    ]
    assert any(
        store.paths == reference.paths and np.array_equal(store.embeddings, reference.embeddings)
        for reference in references
    ), "the store mixes the two runs"
    assert not (tmp_path / "out" / "pool.h5.lock").exists()


# 2 ── the output guard ────────────────────────────────────────────────────────────────────────────────────────────


def test_outputs_never_replace_inputs_or_files_xsel_did_not_write(work, tmp_path, cli):
    image = work.csv.parent / "img" / "0000.png"
    selection = tmp_path / "round1.csv"
    pd.DataFrame({"rank": [1], "Path": ["img/0001.png"], "score": [0.5], "selector": ["random"]}).to_csv(
        selection, index=False
    )
    run = tmp_path / "run"
    run.mkdir()
    (run / "selector.pt").write_bytes(b"trained selector")
    (run / "metrics.csv").write_text("step,auroc\n1,0.7\n")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.docx").write_text("years of work")
    store = tmp_path / "pool.h5"
    shutil.copy(work.store, store)
    kept = snapshot(work.csv, image, selection, store, run / "selector.pt", run / "metrics.csv", mine / "thesis.docx")
    cases = [
        (("embed", work.csv, "--out", work.csv, "--encoder", "pixels", "--overwrite"), "is an input of this command"),
        (("embed", work.csv, "--out", image, "--encoder", "pixels", "--overwrite"), "is not an xsel embedding store"),
        (("select", store, "--k", "3", "--out", store), "is an input of this command"),
        (("select", store, "--k", "3", "--exclude", selection, "--out", selection, "--overwrite"), "is an input"),
        (
            (
                "select",
                work.csv,
                "--bundle",
                work.bundle,
                "--selector",
                "typiclust",
                "--k",
                "3",
                "--out",
                work.csv,
                "--overwrite",
            ),
            "is an input",
        ),
        (("export", "--selector", run / "selector.pt", "--out", run, "--overwrite"), "contains an input"),
        (("export", "--encoder", "pixels", "--out", mine, "--overwrite"), "is not an xsel bundle"),
        (("store", "merge", store, work.copy, "--out", work.csv, "--overwrite"), "is not an xsel embedding store"),
        (("export-labels", selection, "--out", mine, "--overwrite"), "holds files that are not xsel's (thesis.docx)"),
        (("scan", work.csv.parent, "--out", work.csv), "is not a CSV written by xsel"),
        (("select", store, "--k", "3", "--out", mine), "is a folder; give the name of a file"),
        (("evaluate", store, "--conditions", "Label", "--out", selection), "is a file; give the name of a folder"),
    ]
    for args, message in cases:
        result = cli(*args)
        assert result.exit_code == 2, (args, result.output)
        assert message in one_line_error(result), args
    assert snapshot(*kept) == kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "pool.h5", "round1.csv", "run"]


def test_select_replaces_an_earlier_selection_only_with_overwrite(work, tmp_path, cli):
    out = tmp_path / "picks.csv"
    assert cli("select", work.store, "--k", "3", "--out", out).exit_code == 0
    again = cli("select", work.store, "--k", "4", "--out", out)
    assert again.exit_code == 2 and "already exists; pass --overwrite" in one_line_error(again)
    assert len(pd.read_csv(out)) == 3
    assert cli("select", work.store, "--k", "4", "--out", out, "--overwrite").exit_code == 0
    assert len(pd.read_csv(out)) == 4


# 3 ── --resume checks a finished store ────────────────────────────────────────────────────────────────────────────


def test_resume_on_a_finished_store_of_another_csv_or_encoder_is_refused(tmp_path, cli):
    csv = write_png_folder(tmp_path / "data", 10)
    out = tmp_path / "pool.h5"
    embed(csv, out, encoder="pixels", workers=0, show_progress=False)
    grown = pd.concat([pd.read_csv(csv), pd.read_csv(write_png_folder(tmp_path / "more", 2, seed=5))])
    grown.assign(Path=[*pd.read_csv(csv)["Path"], "../more/img/0000.png", "../more/img/0001.png"]).to_csv(
        csv, index=False
    )
    result = cli("embed", csv, "--out", out, "--encoder", "pixels", "--resume")
    line = one_line_error(result)
    assert (
        result.exit_code == 2 and "has changed since" in line and "the CSV lists 12" in line and "--overwrite" in line
    )
    other = cli("embed", csv, "--out", out, "--encoder", "resnet18", "--weights", "none", "--resume")
    assert other.exit_code == 2 and "this run encodes with resnet18" in one_line_error(other)
    assert len(read_store(out)) == 10, "the finished store is left as it was"


# 4 ── a full disk ─────────────────────────────────────────────────────────────────────────────────────────────────


def test_a_full_disk_while_saving_progress_is_one_line_and_resumable(tmp_path, monkeypatch, cli):
    csv = write_png_folder(tmp_path / "data", 20)
    out = tmp_path / "pool.h5"
    real, calls = np.savez, []

    def fills_the_disk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(*args, **kwargs)

    monkeypatch.setattr(np, "savez", fills_the_disk)
    with pytest.raises(InputError, match=r"no space left on device while writing .*rows-0000000008-0000000011\.npz"):
        embed(csv, out, encoder="pixels", batch_size=4, flush_seconds=0, workers=0, show_progress=False)
    monkeypatch.undo()
    partial = tmp_path / "pool.h5.partial"
    assert sorted(p.name for p in partial.iterdir()) == [
        "job.json",
        "rows-0000000000-0000000003.npz",
        "rows-0000000004-0000000007.npz",
    ], "the half-written shard is gone, the whole ones stay"
    result = cli("embed", csv, "--out", out, "--encoder", "pixels", "--resume", "-q")
    assert result.exit_code == 0 and "8 from the interrupted run" in result.stdout, result.output
    fresh = embed(csv, tmp_path / "fresh.h5", encoder="pixels", workers=0, show_progress=False)
    assert np.array_equal(read_store(out).embeddings, read_store(fresh.store).embeddings)


def test_a_full_disk_while_writing_a_selection_is_one_line(work, tmp_path, monkeypatch, cli):
    def fills_the_disk(self, path, *args, **kwargs):
        Path(path).write_text("rank,Path\n")  # a partial file, as a full disk leaves it
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(pd.DataFrame, "to_csv", fills_the_disk)
    result = cli("select", work.store, "--k", "3", "--out", tmp_path / "picks.csv")
    assert result.exit_code == 2
    assert "no space left on device while writing" in one_line_error(result) and "picks.csv" in result.stderr
    assert list(tmp_path.iterdir()) == [], "neither the selection nor its temporary is left"


NAMESPACE_RUN = """
import json, subprocess, sys
folder, csv, xsel = sys.argv[1], sys.argv[2], sys.argv[3:]
def run(*args):
    done = subprocess.run([*xsel, *args], capture_output=True, text=True)
    return {"code": done.returncode, "stderr": done.stderr}
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", folder], check=True)
report = {"full": run("embed", csv, "--out", folder + "/pool.h5", "--encoder", "pixels", "--workers", "0", "-q")}
report["left"] = sorted(__import__("os").listdir(folder))
subprocess.run(["mount", "-o", "remount,size=64m", folder], check=True)
report["resumed"] = run("embed", csv, "--out", folder + "/pool.h5", "--encoder", "pixels", "--workers", "0", "-q",
                        "--resume")
subprocess.run(["mount", "-o", "remount,ro", folder], check=True)
report["read_only"] = run("select", folder + "/pool.h5", "--k", "3", "--out", folder + "/picks.csv")
print(json.dumps(report))
"""


@pytest.mark.slow
def test_a_really_full_disk_while_assembling_the_store(tmp_path):
    """A 400 KB tmpfs holds the shard of 60 embeddings (240 KB) but not the store beside it: the campaign saw a
    segmentation fault (HDF5's cache flush); now one line naming the store and the space it needs, no temporary
    left, and --resume finishes once there is room. A read-only folder is refused before any work."""
    csv = write_png_folder(tmp_path / "data", 60, size=32)
    mount = tmp_path / "disk"
    mount.mkdir()
    namespace = ["unshare", "--user", "--map-root-user", "--mount"]
    if shutil.which("unshare") is None or subprocess.run([*namespace, "true"], capture_output=True).returncode:
        pytest.skip("no private mount namespace here (unshare --user --mount) for a small tmpfs")
    done = subprocess.run(
        [*namespace, sys.executable, "-c", NAMESPACE_RUN, str(mount), str(csv), *XSEL],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    full = report["full"]
    assert full["code"] == 2, full
    line = one_line_error(types.SimpleNamespace(stderr=full["stderr"]))
    assert "no space left on device while writing" in line and "pool.h5 (it needs about 240.7 KB" in line
    assert report["left"] == ["pool.h5.partial"], "no temporary store, no lock file"
    assert report["resumed"]["code"] == 0, report["resumed"]
    read_only = report["read_only"]
    assert read_only["code"] == 2 and "permission denied or read-only" in read_only["stderr"], read_only


# 5 ── unwritable outputs ─────────────────────────────────────────────────────────────────────────────────────────


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_output_folder_is_refused_before_work(work, tmp_path, cli):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        for args in (
            ("embed", work.csv, "--out", locked / "pool.h5", "--encoder", "pixels"),
            ("select", work.store, "--k", "3", "--out", locked / "picks.csv"),
            ("evaluate", work.store, "--conditions", "Label", "--out", locked / "results"),
            ("export", "--encoder", "pixels", "--out", locked / "bundle"),
        ):
            result = cli(*args)
            assert result.exit_code == 2 and "cannot write in" in one_line_error(result), args
    finally:
        locked.chmod(0o700)


def test_site_store_in_a_new_folder_and_no_empty_folder_after_a_failure(work, tmp_path, cli):
    store = tmp_path / "new" / "deeper" / "site.h5"
    out = tmp_path / "picks.csv"
    result = cli(
        "select",
        work.csv,
        "--bundle",
        work.bundle,
        "--selector",
        "typiclust",
        "--k",
        "3",
        "--out",
        out,
        "--store",
        store,
        "-q",
    )
    assert result.exit_code == 0, result.output
    assert len(read_store(store)) == 20
    failed = cli("evaluate", work.store, "--conditions", "NoSuchLabel", "--out", tmp_path / "a" / "b" / "results")
    assert failed.exit_code == 2 and "NoSuchLabel" in one_line_error(failed)
    assert not (tmp_path / "a").exists(), "a failed run leaves no empty output folder"


# 6 ── a damaged shard ────────────────────────────────────────────────────────────────────────────────────────────


def test_a_damaged_shard_is_embedded_again_with_a_notice(tmp_path, monkeypatch, capsys):
    csv = write_png_folder(tmp_path / "data", 20)
    out = tmp_path / "pool.h5"

    def run(**options):
        return embed(
            csv, out, encoder="pixels", batch_size=4, flush_seconds=0, workers=0, show_progress=False, **options
        )

    assert interrupt_embedding(monkeypatch, 3, run) == [0, 4, 8]
    shard = tmp_path / "pool.h5.partial" / "rows-0000000004-0000000007.npz"
    shard.write_bytes(shard.read_bytes()[:300])  # truncated, as a full disk or a copy cut short leaves it
    capsys.readouterr()
    resumed = run(resume=True)
    assert "rows-0000000004-0000000007.npz" in capsys.readouterr().err and resumed.resumed_rows == 8
    fresh = embed(csv, tmp_path / "fresh.h5", encoder="pixels", workers=0, show_progress=False)
    assert np.array_equal(read_store(out).embeddings, read_store(fresh.store).embeddings)


# 7 ── a swapped bundle model ─────────────────────────────────────────────────────────────────────────────────────


def test_a_bundle_whose_encoder_was_swapped_and_rehashed_is_refused(work, tmp_path, capsys):
    from xsel.train.export import export_bundle

    other = export_bundle(tmp_path / "other", encoder="pixels", image_size=64)
    swapped = tmp_path / "swapped"
    shutil.copytree(work.bundle, swapped)
    shutil.copy(tmp_path / "other" / ENCODER_FILE, swapped / ENCODER_FILE)
    manifest = json.loads((swapped / MANIFEST).read_text())
    manifest["sha256"][ENCODER_FILE] = other["sha256"][ENCODER_FILE]
    (swapped / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(
        InputError, match=r"encoder\.onnx: input 'images' is tensor\(float\) \[.*64, 64\], the manifest"
    ):
        Bundle.load(swapped)
    (tmp_path / "other" / "notes.txt").write_text("mine")
    Bundle.load(tmp_path / "other")
    assert "notes.txt" in capsys.readouterr().err, "extra files are noticed, not accepted silently"


# 8 ── workers die with their parent ──────────────────────────────────────────────────────────────────────────────

SLOW_DECODE = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as from a terminal, also under nohup or `cmd &`
import {module} as module
real = module.{function}
def slow(*args):
    if os.environ.get("DECODING_MARKER"):  # tells a test that decoding is under way
        open(os.environ["DECODING_MARKER"], "a").close()
    time.sleep({delay})
    return real(*args)
module.{function} = slow
sys.argv = ["xsel", *sys.argv[1:]]
from xsel.cli import main
main()
"""


def children(pid: int) -> list[int]:
    """The live Python child processes of ``pid`` (its decode workers), not programs it runs (ldconfig, …)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            same_program = (entry / "exe").resolve() == Path(f"/proc/{pid}/exe").resolve()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z" and same_program:
            found.append(int(entry.name))
    return found


def alive(pids: list[int]) -> list[int]:
    living = []
    for pid in pids:
        try:
            if (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                living.append(pid)
        except OSError:
            pass
    return living


def kill_and_watch_workers(code: str, args: list, within: float) -> None:
    process = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stderr=subprocess.DEVNULL)
    deadline, workers = time.time() + 120, []
    while not workers and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
        workers = children(process.pid)
    assert workers, "the command finished before its workers could be seen"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.time() + within
    while alive(workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(workers), f"decode workers {alive(workers)} outlived their parent"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_kill_9_of_a_site_selection_takes_its_decode_workers_along(work, tmp_path):
    code = SLOW_DECODE.format(module="xsel.io.decoding", function="decode_or_error", delay=0.2)
    args = [
        "select",
        work.csv,
        "--bundle",
        work.bundle,
        "--selector",
        "typiclust",
        "--k",
        "3",
        "--out",
        tmp_path / "o.csv",
        "--workers",
        "2",
    ]
    kill_and_watch_workers(code, args, within=3)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_kill_9_of_an_embedding_takes_its_decode_workers_along(work, tmp_path):
    code = SLOW_DECODE.format(module="xsel.io.decoding", function="decode_or_error", delay=0.2)
    args = ["embed", work.csv, "--out", tmp_path / "s.h5", "--encoder", "pixels", "--workers", "2", "--batch-size", "2"]
    kill_and_watch_workers(code, args, within=3)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_ctrl_c_of_an_embedding_with_decode_workers_is_one_line_and_exit_130(work, tmp_path):
    """A terminal's Ctrl-C reaches the whole process group, decode workers included."""
    code = SLOW_DECODE.format(module="xsel.io.decoding", function="decode_or_error", delay=0.5)  # 5 s
    args = ["embed", work.csv, "--out", tmp_path / "s.h5", "--encoder", "pixels", "--workers", "2", "--batch-size", "2"]
    marker = tmp_path / "decoding"
    process = subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "DECODING_MARKER": str(marker)},
    )
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # every worker busy decoding
    assert children(process.pid) and process.poll() is None, "the command finished before it could be interrupted"
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].startswith("error: interrupted"), stderr
    assert not (tmp_path / "s.h5").exists()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [("--batch-size", "0", "--batch-size 0: use 1 or more"), ("--workers", "-1", "--workers -1: use 0")],
)
def test_a_site_selection_refuses_decode_options_it_cannot_use(work, tmp_path, cli, option, value, message):
    out, store = tmp_path / "o.csv", tmp_path / "site.h5"
    args = ["select", work.csv, "--bundle", work.bundle, "--selector", "random", "--k", "2", "--out", out]
    result = cli(*args, "--store", store, option, value)
    assert result.exit_code == 2 and message in one_line_error(result), result.stderr
    assert not out.exists() and not store.exists() and list(tmp_path.iterdir()) == []


class _Marked:
    """Garbage that says which process collected it (an onnxruntime session must never be collected in a worker)."""

    def __init__(self, folder: Path):
        self.folder, self.cycle = folder, self

    def __del__(self):
        (self.folder / str(os.getpid())).touch()


def _collect_garbage() -> int:
    import gc

    gc.collect()
    return os.getpid()


def test_forked_workers_never_collect_garbage_they_inherit(tmp_path):
    import gc

    from xsel.io.workers import worker_pool

    gc.disable()  # the cycle stays uncollected until the workers are forked
    try:
        _Marked(tmp_path)
        with worker_pool(2, int, ()) as pool:
            workers = {pool.submit(_collect_garbage).result() for _ in range(4)}
    finally:
        gc.enable()
    gc.collect()
    assert {path.name for path in tmp_path.iterdir()} == {str(os.getpid())}, "collected here, in no worker"
    assert str(os.getpid()) not in workers


# 9 ── progress saved every few seconds ───────────────────────────────────────────────────────────────────────────


def test_a_run_killed_at_60_percent_resumes_with_only_the_rest(tmp_path, monkeypatch):
    import xsel.embed as module

    csv = write_png_folder(tmp_path / "data", 20)
    out = tmp_path / "pool.h5"

    def run(**options):
        return embed(
            csv, out, encoder="pixels", batch_size=2, flush_seconds=0, workers=0, show_progress=False, **options
        )

    assert len(interrupt_embedding(monkeypatch, 6, run)) == 6  # 6 of 10 batches saved: 12 of 20 rows
    embedded, real_add = [], module.ShardWriter.add
    monkeypatch.setattr(
        module.ShardWriter, "add", lambda self, rows, *rest: embedded.extend(rows) or real_add(self, rows, *rest)
    )
    resumed = run(resume=True)
    assert sorted(embedded) == list(range(12, 20)) and resumed.resumed_rows == 12
    fresh = embed(csv, tmp_path / "fresh.h5", encoder="pixels", workers=0, show_progress=False)
    assert np.array_equal(read_store(out).embeddings, read_store(fresh.store).embeddings)


def test_progress_is_saved_after_flush_seconds_of_work(tmp_path, monkeypatch):
    """A shard every 5 s of work, not every 1,024 rows: the clock advances 2 s per batch of 2 rows."""
    import xsel.embed as module

    ticks = iter(range(0, 1000, 2))
    monkeypatch.setattr(module, "time", types.SimpleNamespace(monotonic=lambda: next(ticks)))
    writer = module.ShardWriter(tmp_path, 3, chunk_rows=1024, flush_seconds=5)
    for first in range(0, 12, 2):
        rows = np.arange(first, first + 2)
        writer.add(rows, np.zeros((2, 3), np.float32), [])
    assert sorted(p.name for p in tmp_path.glob("rows-*.npz")) == [
        "rows-0000000000-0000000005.npz",
        "rows-0000000006-0000000011.npz",
    ]


# 10 ── one-line usage errors ─────────────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("select", "pool.h5", "--k", "abc", "--out", "o.csv"), "Invalid value for '--k'"),
        (("embed", "pool.csv"), "Missing option '--out'"),
        (("select", "pool.h5", "--bogus"), "No such option: --bogus"),
        (("frobnicate",), "No such command 'frobnicate'"),
    ],
)
def test_usage_errors_are_one_line(cli, args, message):
    result = cli(*args)
    line = one_line_error(result)
    assert result.exit_code == 2 and message in line and line.endswith(" --help'."), line


# the campaign's smaller cases ───────────────────────────────────────────────────────────────────────────────────


def test_ctrl_c_exits_130_and_says_how_to_go_on(work, tmp_path, monkeypatch, cli):
    import xsel.embed
    import xsel.selection
    import xsel.train.selector

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(xsel.embed, "_write_shard", interrupt)
    monkeypatch.setattr(xsel.selection, "select", interrupt)
    monkeypatch.setattr(xsel.train.selector, "train_selector", interrupt)
    for args, message in (
        (
            ("embed", work.csv, "--out", tmp_path / "s.h5", "--encoder", "pixels", "-q"),
            "interrupted; rerun with --resume",
        ),
        (
            ("train", "selector", work.store, "--conditions", "A", "--val-conditions", "B", "--out", tmp_path / "run"),
            "interrupted; rerun with --resume",
        ),
        (("select", work.store, "--k", "3", "--out", tmp_path / "o.csv"), "interrupted"),
    ):
        result = cli(*args)
        assert result.exit_code == 130 and one_line_error(result) == f"error: {message}", (args, result.stderr)


def test_a_learned_selector_without_checkpoint_names_selects_option(work, tmp_path, cli):
    result = cli("select", work.store, "--k", "3", "--out", tmp_path / "o.csv", "--selector", "medselect")
    assert result.exit_code == 2 and "add --checkpoint RUN/selector.pt" in one_line_error(result)


def test_a_legacy_pickle_is_refused_without_a_warning_and_never_run(tmp_path):
    import pickle

    from xsel.train.checkpoints import read_checkpoint

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    (tmp_path / "selector.pt").write_bytes(pickle.dumps({"format": "x", "run": Payload()}, protocol=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(InputError, match="not a readable selector checkpoint"):
            read_checkpoint(tmp_path / "selector.pt", file_format="x", kind="selector", made_by="xsel train selector")
    assert caught == [] and not (tmp_path / "pwned").exists()


def test_a_huge_image_is_that_images_error_not_a_raw_warning(tmp_path):
    from xsel.io.images import decode_or_error

    path = tmp_path / "huge.png"
    Image.new("L", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    header = struct.pack(">II", 12000, 12000) + data[24:29]  # IHDR: width, height, then depth, colour, …
    data[16:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    path.write_bytes(bytes(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        array, error = decode_or_error(path, {"image_size": 32, "channels": 1, "mean": [0.0], "std": [1.0]})
    assert array is None and error.startswith("image too large to decode safely") and caught == []


def test_windows_and_padded_paths_find_their_files_and_stay_verbatim(tmp_path):
    csv = write_png_folder(tmp_path / "data", 4)
    frame = pd.read_csv(csv)
    frame["Path"] = ["img\\0000.png", "  img/0001.png ", "img/0002.png", "img\\0003.png "]
    frame.to_csv(csv, index=False)
    result = embed(csv, tmp_path / "s.h5", encoder="pixels", workers=0, show_progress=False)
    assert (result.embedded, result.failed) == (4, 0)
    assert read_store(tmp_path / "s.h5").paths == frame["Path"].tolist()


def test_a_store_listing_an_image_twice_is_refused_by_select(tmp_path, cli):
    with h5py.File(tmp_path / "twice.h5", "w") as handle:
        handle["embeddings"] = np.eye(3, dtype=np.float32)
        handle.create_dataset("paths", data=["a.png", "b.png", "a.png"], dtype=h5py.string_dtype())
        handle.attrs["schema_version"] = 1
    result = cli("select", tmp_path / "twice.h5", "--k", "2", "--out", tmp_path / "o.csv")
    assert result.exit_code == 2 and "rows 0 and 2 hold the same path 'a.png'" in one_line_error(result)
