"""The command-line tools' output folders (docs/reliability.md): every tool refuses a folder it does not own
and leaves it byte-identical; one run per folder (a stale lock after SIGKILL does not block); a resume of a
damaged folder rebuilds what it can and keeps the old summaries; a full disk leaves whole files only; no
construction worker outlives a killed parent; Ctrl-C while the summaries are written leaves them whole;
``--chunk`` does not change a result; ``real_data`` checks its flags before it runs."""

import errno
import importlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from _helpers import error_line

import lora_theory
import verification
from verification import outdir, sweep
from verification.models import TorchFNN
from verification.sweep import cli, driver, problems, training

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
TINY = ["--quick", "--width", "4", "--seeds", "1", "--iterations", "5", "--no-figure"]
EXPERIMENT_ARGS = {
    "linear": ["--ranks", "1"],
    "fnn": ["--ranks", "1"],
    "tfn": ["--ranks", "1", "--seq-len", "3"],
    "final_layers": ["--depth", "3", "--ranks", "1", "--layers", "1"],
    "biases": ["--ranks", "2"],
    "rank_schedule": ["--steps=1"],
    "depth_sweep": ["--depths", "2", "--ranks", "1"],
    "singular_values": ["--ranks", "1"],
}


def _tree(folder: Path) -> dict:
    """Every file and folder under ``folder`` with its bytes (folders as None): byte-identical or not."""
    return {str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes()) for p in sorted(folder.rglob("*"))}


def _checkpoints(tmp_path, tuned_depth):
    """A frozen 2-layer ReLU MLP and a tuned one of ``tuned_depth`` layers, as safetensors (for advise)."""
    from safetensors.torch import save_file

    paths = []
    for tag, seed, depth in (("base", 1, 2), ("tuned", 2, tuned_depth)):
        sd = TorchFNN.from_numpy(lora_theory.random_fnn(4, depth, seed=seed)).state_dict()
        path = tmp_path / f"{tag}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        paths.append(str(path))
    return paths


def _tool_command(tool, out, tmp_path):
    """``(main, argv)`` that writes into ``out``, the work it must not reach when refusing, as a (module,
    function name) to replace."""
    if tool in EXPERIMENT_ARGS:
        module = importlib.import_module(f"verification.{tool}")
        return module.main, TINY + EXPERIMENT_ARGS[tool] + ["--out", str(out)], (cli, "execute")
    if tool == "real_data":
        from verification import real_data

        return real_data.main, ["--quick", "--out", str(out)], (real_data, "run_experiment")
    if tool == "paper":
        from verification import paper

        return paper.main, ["--quick", "--only", "linear", "--out", str(out)], (paper, "_run_step")
    if tool == "pretraining":
        from verification import pretraining

        return pretraining.main, ["--quick", "--out", str(out)], (pretraining, "spectra")
    from verification import advise

    base, tuned = _checkpoints(tmp_path, 2 if tool == "advise" else 1)
    if tool == "advise":
        return advise.main, [base, tuned, "--out", str(out)], (advise, "advise_checkpoints")
    return advise.main, [base, tuned, "--fnn", "--out", str(out), "--input-radius", "1"], (advise, "advise_fnn")


TOOLS = sorted(EXPERIMENT_ARGS) + ["real_data", "pretraining", "paper", "advise", "advise --fnn"]


def test_the_list_covers_every_tool_that_writes():
    """Every experiment and every tool with an --out is in the refusal test (certify writes no file)."""
    assert set(verification.EXPERIMENTS) <= set(TOOLS)
    assert set(verification.TOOLS) - {"certify"} <= {t.split()[0] for t in TOOLS}


@pytest.mark.parametrize("owner", ["nobody", "another tool"])
@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_refuses_a_folder_it_does_not_own(tool, owner, tmp_path, monkeypatch, refused):
    """Data loss first: an --out folder of another tool, or of nobody, is refused with one line (status 2)
    before any work starts, and is left byte-identical (no lock file, no config.json, nothing removed)."""
    out = tmp_path / "theirs"
    (out / "sub").mkdir(parents=True)
    (out / "summary.json").write_text('{"mine": true}')
    (out / "figure.png").write_bytes(b"\x89PNG not ours")
    (out / "sub" / "runs.jsonl").write_text("{}\n")
    if owner == "another tool":
        other = "fnn" if tool != "fnn" else "linear"
        (out / "config.json").write_text(json.dumps({"experiment": other, "argv": []}))
    _, argv, (module, work) = _tool_command(tool, out, tmp_path)

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the folder was checked")

    monkeypatch.setattr(module, work, no_work)
    before = _tree(out)
    line = refused(tool.split()[0], argv, str(out))
    assert "not empty" in line if owner == "nobody" else "holds the files of" in line
    assert _tree(out) == before


@pytest.mark.parametrize("mode", ["advise", "advise --fnn"])
def test_advise_writes_into_a_new_folder_and_again_into_its_own(mode, tmp_path, capsys):
    out = tmp_path / "report"
    main, argv, _ = _tool_command(mode, out, tmp_path)
    assert main(argv) == 0
    assert outdir.folder_owner(out) == "advise"
    assert main(argv) == 0  # its own folder: written again


def test_an_empty_folder_and_a_lock_file_alone_are_free(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert outdir.check_folder(empty, "fnn") is False
    (empty / outdir.LOCK_FILE).write_text("")  # left by a run killed before it wrote anything
    assert outdir.check_folder(empty, "fnn") is False
    (empty / "x").write_text("")
    with pytest.raises(outdir.CLIError, match="not empty"):
        outdir.check_folder(empty, "fnn")
    with pytest.raises(outdir.CLIError, match="not a folder"):
        outdir.check_folder(empty / "x", "fnn")


# ------------------------------------------------------------------------------------------------- lock


def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding the folder's lock (as a running sweep does), until killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from verification.outdir import FolderLock
        lock = FolderLock({str(folder)!r}, "python -m verification.linear").acquire()
        print("locked", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_on_a_locked_folder_is_refused_and_a_killed_holders_lock_is_not(tmp_path, refused):
    """One sweep per folder: while another process holds the folder, a sweep (new or --resume) exits 2 with
    one line naming the folder and the holder (pid, host, start) and changes nothing; once the holder is
    killed by SIGKILL, its lock file left behind does not block the next --resume."""
    from verification import linear

    out = tmp_path / "lin"
    argv = TINY + ["--ranks", "1,2", "--frozen", "random", "--out", str(out)]
    assert linear.main(argv) == 0
    runs = (out / "runs.jsonl").read_text().splitlines()
    (out / "runs.jsonl").write_text("\n".join(runs[:1]) + "\n")  # an interrupted sweep: runs to do
    holder = _hold_lock(out)
    try:
        before = _tree(out)
        for command in (argv, ["--resume", str(out)]):
            line = refused("linear", command, "another run is writing")
            assert str(out) in line and f"pid {holder.pid}" in line
            assert _tree(out) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / outdir.LOCK_FILE).exists()  # left behind by the killed holder
    assert linear.main(["--resume", str(out)]) == 0
    ids = [json.loads(l)["id"] for l in (out / "runs.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids)) == len(runs)


def test_a_run_started_while_another_sets_the_folder_up_is_told_another_run_is_writing(tmp_path, refused):
    """Regression: the first run holds the lock and has created a file (its write probe) but not yet its
    ``config.json``; a second run started in that moment was refused with "not a linear folder", as if the
    folder were someone else's (CI, two sweeps started together). It must name the run that is writing,
    for every tool, and change nothing."""
    out = tmp_path / "lin"
    out.mkdir()
    holder = _hold_lock(out)
    try:
        (out / ".write-test").write_text("")  # the holder's probe, before its config.json
        before = _tree(out)
        for tool in ("linear", "fnn"):
            with pytest.raises(outdir.CLIError, match="another run is writing") as info:
                outdir.check_folder(out, tool)
            assert f"pid {holder.pid}" in str(info.value)
        line = refused("linear", TINY + ["--ranks", "1", "--frozen", "random", "--out", str(out)], "another run")
        assert str(out) in line and f"pid {holder.pid}" in line
        assert _tree(out) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with pytest.raises(outdir.CLIError, match="not empty and not a fnn folder"):  # no holder: a stranger's file
        outdir.check_folder(out, "fnn")


@pytest.mark.slow
def test_two_sweeps_started_together_on_one_folder(tmp_path):
    """Two processes start the same sweep on one new folder at once: one runs, the other exits 2 with one
    line naming the holder (or, where the first finished before the second reached the folder, finds every
    run done); the folder ends with every run once."""
    out = tmp_path / "lin"
    argv = [
        sys.executable,
        "-m",
        "verification.linear",
        "--width",
        "4",
        "--seeds",
        "1",
        "--iterations",
        "300",
        "--ranks",
        "1,2",
        "--frozen",
        "random",
        "--no-figure",
        "--workers",
        "1",
        "--out",
        str(out),
    ]
    procs = [
        subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    if codes == [0, 0]:  # the second reached the folder only after the first had finished: it had nothing to do
        assert any("(24 already done)" in e for _, e in results), results
    else:
        assert codes == [0, 2], results
        err = next(e for code, e in results if code == 2)
        assert str(out) in error_line("linear", err, "another run is writing")
    ids = [json.loads(l)["id"] for l in (out / "runs.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 2 * 3 * 4


# ------------------------------------------------------------------------------------------------ resume


@pytest.fixture
def finished(tmp_path):
    """A finished fnn sweep with pretrained models (a cache to damage), its figure and summaries."""
    from verification import fnn

    out = tmp_path / "fnn"
    argv = ["--quick", "--width", "4", "--seeds", "1", "--iterations", "5", "--ranks", "1,2", "--out", str(out)]
    assert fnn.main(argv) == 0
    return out


def _rows(out):
    s = json.loads((out / "summary.json").read_text())
    return [(r["rank"], r["gradient_test_mse"], r["construction_test_mse"]) for r in s["rows"] + s["pretrained_rows"]]


def test_every_line_of_runs_jsonl_is_a_run_record_with_its_documented_fields(finished):
    """The dataclass documents the file: each line has exactly RunRecord's fields (``config_hash`` beside
    ``id``; the optional ones only when set), its losses RunLosses's, and rebuilds to the same line."""
    import dataclasses

    from verification.sweep import RunLosses, RunRecord

    fields = {f.name for f in dataclasses.fields(RunRecord)}
    optional = {"best_step", "paired"}
    lines = [json.loads(l) for l in (finished / "runs.jsonl").read_text().splitlines()]
    assert lines
    for rec in lines:
        assert RunRecord.is_valid(rec)
        assert fields - optional <= set(rec) - {"config_hash"} <= fields
        assert rec["config_hash"] == rec["id"]
        assert set(rec["losses"]) == {f.name for f in dataclasses.fields(RunLosses)}
        kept = {k: v for k, v in rec.items() if k != "config_hash"}
        rebuilt = RunRecord(**{**kept, "losses": RunLosses(**rec["losses"])}).to_json()
        assert rebuilt == rec
    assert not RunRecord.is_valid({**lines[0], "losses": {**lines[0]["losses"], "test": True}})
    assert not RunRecord.is_valid({k: v for k, v in lines[0].items() if k != "experiment"})


@pytest.mark.parametrize(
    "damage",
    [
        "empty cache entry",
        "cut cache entry",
        "bad bytes in the log",
        "records that are not runs",
        "bad bytes in the constructions",
    ],
)
def test_resume_rebuilds_damaged_files_and_reports_them(damage, finished, capsys):
    """A 0-byte or cut pretrained model is pretrained again; non-UTF-8 bytes and lines that are not run
    records are reported and skipped (their runs run again); nothing raises, and the results are those of
    the undamaged sweep."""
    from verification import fnn

    out = finished
    rows = _rows(out)
    lines = (out / "runs.jsonl").read_bytes().splitlines(keepends=True)
    (cache,) = sorted((out / "pretrained").glob("*.npz"))
    if damage == "empty cache entry":
        cache.write_bytes(b"")
    elif damage == "cut cache entry":
        cache.write_bytes(cache.read_bytes()[:100])
    elif damage == "bad bytes in the log":
        (out / "runs.jsonl").write_bytes(lines[0][:20] + b"\xff\xfe\x80" + lines[0][20:] + b"".join(lines[1:]))
    elif damage == "records that are not runs":
        (out / "runs.jsonl").write_bytes(b"[1, 2]\n" + b'{"id": "x", "experiment": "fnn"}\n' + b"".join(lines[1:]))
    else:
        (out / "constructions.jsonl").write_bytes(b"\xff\xff\n")
    capsys.readouterr()
    assert fnn.main(["--resume", str(out)]) == 0
    err = capsys.readouterr().err
    if damage != "bad bytes in the constructions":  # that file is not used by this sweep (no deep block)
        assert "warning:" in err and ("damaged cache entry" in err if "cache" in damage else "skipped" in err)
    got = _rows(out)
    assert [r[0] for r in got] == [r[0] for r in rows]
    assert [x for r in got for x in r[1:]] == pytest.approx([x for r in rows for x in r[1:]], rel=1e-6)
    records = [
        json.loads(l)
        for l in (out / "runs.jsonl").read_bytes().splitlines()
        if l.startswith(b'{"id"') and b"\xff" not in l and b'"x"' not in l
    ]
    assert len({r["id"] for r in records}) == 2 * 2 * 2
    for npz in (out / "pretrained").glob("*.npz"):
        problems._load_model(npz, problems.make_random_frozen(("fnn", 4, 2, 1, "relu", True), 0))


@pytest.mark.parametrize(
    "edit",
    [
        {"argv": None},
        "no argv",
        {"argv": 5},
        {"argv": [1, 2]},
        {"argv": "--quick"},
        {"settings": [1]},
        "a list",
        "not JSON",
    ],
)
def test_resume_refuses_an_edited_config_and_keeps_everything(edit, finished, refused):
    """config.json with argv null (argparse would read the live command line: the default full sweep),
    missing, a number, a list of numbers, a string; settings not an object; not an object; not JSON:
    refused with one line, the folder (summaries, figure, runs) byte-identical."""

    out = finished
    cfg = json.loads((out / "config.json").read_text())
    if edit == "no argv":
        del cfg["argv"]
        text = json.dumps(cfg)
    elif edit == "a list":
        text = json.dumps([cfg])
    elif edit == "not JSON":
        text = "{argv: "
    else:
        text = json.dumps({**cfg, **edit})
    (out / "config.json").write_text(text)
    before = _tree(out)
    line = refused("fnn", ["--resume", str(out)], "config.json")
    assert str(out) in line
    assert _tree(out) == before


def test_an_interrupted_resume_keeps_the_old_summaries(finished, monkeypatch, capsys):
    """The summaries of a finished sweep stay as they were until new ones are written whole: a resume
    interrupted while it trains leaves summary.json, summary.csv and figure.png byte-identical."""
    from verification import fnn

    out = finished
    lines = (out / "runs.jsonl").read_text().splitlines()
    (out / "runs.jsonl").write_text("\n".join(lines[:2]) + "\n")
    kept = {name: (out / name).read_bytes() for name in ("summary.json", "summary.csv", "figure.png")}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(driver, "train_stack", interrupted)
    monkeypatch.setattr(training, "train_stack", interrupted)
    assert fnn.main(["--resume", str(out)]) == 130
    assert "--resume" in capsys.readouterr().err.strip().splitlines()[-1]
    assert {name: (out / name).read_bytes() for name in kept} == kept


# ---------------------------------------------------------------------------------------------- full disk


def _count_writes(monkeypatch):
    calls = []
    real = outdir._write_all

    def counting(f, data):
        calls.append(len(data))
        real(f, data)

    monkeypatch.setattr(outdir, "_write_all", counting)
    return calls


def _whole(out: Path):
    """No temporary file anywhere, and every file written whole (JSON, JSON Lines, CSV, PNG)."""
    assert not [p for p in out.rglob(".tmp-*")], list(out.rglob("*"))
    if not (out / "config.json").exists():  # the first write failed: nothing else was written
        assert [p.name for p in out.iterdir()] == [outdir.LOCK_FILE]
        return
    json.loads((out / "config.json").read_text())
    if (out / "runs.jsonl").exists():
        for line in (out / "runs.jsonl").read_text().splitlines():
            json.loads(line)
    if (out / "summary.json").exists():
        json.loads((out / "summary.json").read_text())
    if (out / "summary.csv").exists():
        assert (out / "summary.csv").read_text().endswith("\n")
    if (out / "figure.png").exists():
        assert (out / "figure.png").read_bytes()[:4] == b"\x89PNG"


def test_a_full_disk_at_every_write_leaves_whole_files_and_one_line(tmp_path, monkeypatch, capsys):
    """ENOSPC injected in turn at every write of a sweep (each time after half of the bytes went out, as a
    real full disk does): the sweep ends with one line naming the folder (status 1), no .tmp-* file is left,
    every file is whole, and a --resume then finishes the sweep with every run once."""
    from verification import fnn

    argv = ["--quick", "--width", "4", "--seeds", "1", "--iterations", "5", "--ranks", "1,2"]
    calls = _count_writes(monkeypatch)
    assert fnn.main(argv + ["--out", str(tmp_path / "count")]) == 0
    n_writes = len(calls)
    assert n_writes >= 6  # config, pretrained model, runs, two summaries, figure
    real = outdir._write_all
    for k in range(n_writes):
        out = tmp_path / f"full{k}"
        seen = []

        def full_disk(f, data, seen=seen, k=k):
            seen.append(1)
            if len(seen) == k + 1:
                real(f, bytes(data[: len(data) // 2]))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real(f, data)

        monkeypatch.setattr(outdir, "_write_all", full_disk)
        capsys.readouterr()
        code = fnn.main(argv + ["--out", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and "No space left on device" in err[-1] and str(out) in err[-1], (k, err)
        assert not any("Traceback" in l for l in err)
        _whole(out)
        monkeypatch.setattr(outdir, "_write_all", real)
        if (out / "config.json").exists():
            assert f"finish with --resume {out}" in err[-1]
            assert fnn.main(["--resume", str(out)]) == 0
        else:
            assert "run the command again" in err[-1]
            assert fnn.main(argv + ["--out", str(out)]) == 0
        _whole(out)
        ids = [json.loads(l)["id"] for l in (out / "runs.jsonl").read_text().splitlines()]
        assert len(ids) == len(set(ids)) == 2 * 2 * 2, k


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_real_full_disk_on_a_small_tmpfs(tmp_path, capsys):
    """The same on a real full file system: a 24 KiB tmpfs that the sweep's records overflow."""
    from verification import linear

    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24k", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        out = mount / "lin"
        argv = [
            "--width",
            "4",
            "--seeds",
            "1",
            "--iterations",
            "400",
            "--ranks",
            "1-4",
            "--frozen",
            "random",
            "--lr",
            "1e-2,1e-3,1e-4",
            "--weight-decay",
            "0,1e-3",
            "--no-figure",
            "--chunk",
            "2",
            "--out",
            str(out),
        ]
        capsys.readouterr()
        assert linear.main(argv) == 1
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert "No space left on device" in line and str(out) in line
        _whole(out)
        subprocess.run(["mount", "-o", "remount,size=4m", str(mount)], check=True)
        assert linear.main(["--resume", str(out)]) == 0
        _whole(out)
        ids = [json.loads(l)["id"] for l in (out / "runs.jsonl").read_text().splitlines()]
        assert len(ids) == len(set(ids)) == 4 * 3 * 2
    finally:
        subprocess.run(["umount", str(mount)])


def test_atomic_write_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    path.write_text("old")

    def full(f, data):
        f.write(bytes(data[:2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outdir, "_write_all", full)
    with pytest.raises(OSError):
        outdir.atomic_write(path, "new and longer")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


# ------------------------------------------------------------------------------------------------ file modes


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    """Run the test under this umask, and restore the old one after it."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path) -> int:
    return path.stat().st_mode & 0o777


def test_atomic_write_gives_a_new_file_the_mode_of_a_plain_open(umask, tmp_path):
    """A file written through a temporary file is 0666 less the umask (0644 under 022, 0600 under 077), as
    open() would leave it, not mkstemp's 0600; a replaced file keeps its mode."""
    assert outdir.current_umask() == umask
    assert outdir.fresh_mode() == {0o022: 0o644, 0o077: 0o600}[umask]
    assert outdir.fresh_mode(folder=True) == {0o022: 0o755, 0o077: 0o700}[umask]
    new = tmp_path / "summary.json"
    outdir.atomic_write(new, "{}")
    plain = tmp_path / "plain.json"
    plain.write_text("{}")
    assert _mode(new) == _mode(plain) == {0o022: 0o644, 0o077: 0o600}[umask]
    kept = tmp_path / "table.txt"
    kept.write_text("old")
    os.chmod(kept, 0o640)
    outdir.atomic_write(kept, "new")
    assert kept.read_text() == "new" and _mode(kept) == 0o640


def test_a_writer_that_sets_its_own_mode_is_brought_to_the_umask(umask, tmp_path):
    """write_as_open: a writer that creates 0600 files (as safetensors does) leaves a new file with open()'s
    mode under the umask and a replaced file with its old mode."""

    def private(f):
        os.close(os.open(f, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
        os.chmod(f, 0o600)

    outdir.write_as_open(tmp_path / "new.safetensors", private)
    assert _mode(tmp_path / "new.safetensors") == {0o022: 0o644, 0o077: 0o600}[umask]
    old = tmp_path / "old.safetensors"
    old.write_bytes(b"")
    os.chmod(old, 0o664)
    outdir.write_as_open(old, private)
    assert _mode(old) == 0o664


def test_advise_writes_its_report_and_adapter_with_the_umask(umask, tmp_path, capsys):
    """advise --fnn with an exported adapter: every file and folder it writes (the report, the PEFT adapter
    folder built in a temporary folder and renamed into place) has the mode open() and mkdir() give under the
    umask: 0644 files and 0755 folders under 022, 0600 and 0700 under 077."""
    pytest.importorskip("peft")
    out = tmp_path / "report"
    main, argv, _ = _tool_command("advise --fnn", out, tmp_path)
    assert main(argv) == 0
    assert (out / "peft_adapter" / "adapter_config.json").exists()
    files = {0o022: 0o644, 0o077: 0o600}[umask]
    folders = {0o022: 0o755, 0o077: 0o700}[umask]
    written = [out, *out.rglob("*")]
    assert len(written) > 4
    wrong = {
        str(p.relative_to(tmp_path)): oct(_mode(p)) for p in written if _mode(p) != (folders if p.is_dir() else files)
    }
    assert not wrong, wrong


def test_peft_export_folder_has_the_mode_of_mkdir(umask, tmp_path):
    """export_peft builds the adapter folder in a temporary folder (mkdtemp: 0700) and renames it: the folder
    ends with mkdir's mode under the umask, its files with open()'s."""
    pytest.importorskip("peft")
    from lora_theory.adapter import Adapter
    from verification.peft_export import export_peft

    rng = np.random.default_rng(0)
    export_peft([Adapter(rng.standard_normal((1, 3)), rng.standard_normal((3, 1)))], tmp_path / "adapter")
    folder = tmp_path / "adapter"
    assert _mode(folder) == {0o022: 0o755, 0o077: 0o700}[umask]
    assert {_mode(p) for p in folder.iterdir()} == {{0o022: 0o644, 0o077: 0o600}[umask]}


# ---------------------------------------------------------------------------------------------- processes


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie has ended (no init reaps it in some containers)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_no_construction_worker_outlives_a_killed_parent(tmp_path):
    """SIGKILL of the process that runs the raised-precision constructions: its pool's workers end too
    (they were left running, adopted by init, before)."""
    code = textwrap.dedent("""
        import os, time
        import numpy as np
        from verification.sweep import construction_pool
        pool = construction_pool(2, {"test": np.zeros((1, 2))})
        for _ in range(2):
            pool.submit(time.sleep, 600)                  # both workers busy, as with constructions
        while len(pool._processes) < 2:
            time.sleep(0.1)
        time.sleep(3)                                     # their initializers have run
        print(" ".join(map(str, sorted(pool._processes))), flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(p) for p in parent.stdout.readline().split()]
        assert len(workers) == 2 and all(_alive(p) for p in workers)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 60
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [p for p in workers if _alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, f"workers {left} outlived their parent"


def test_interrupt_while_the_summaries_are_written_leaves_them_whole(tmp_path, monkeypatch, capsys):
    """Ctrl-C (a real SIGINT) while the table and the summaries are written: no traceback, status 130, one
    line, and summary.csv, summary.json and figure.png whole (the interruption waits for them)."""
    from verification import linear

    real = driver.format_csv

    def interrupted_csv(summary):
        os.kill(os.getpid(), signal.SIGINT)
        return real(summary)

    monkeypatch.setattr(driver, "format_csv", interrupted_csv)
    out = tmp_path / "lin"
    code = linear.main(
        [
            "--quick",
            "--width",
            "4",
            "--seeds",
            "1",
            "--iterations",
            "5",
            "--ranks",
            "1,2",
            "--frozen",
            "random",
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130 and "interrupted" in err[-1]
    _whole(out)
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["rows"]) == 2 and (out / "summary.csv").read_text().count("\n") == 3
    assert (out / "figure.png").exists()


def test_cpu_budget_counts_the_cores_allowed_and_the_load(monkeypatch):
    """Threads: the cores this process may run on (affinity, not the machine's count) less the load of
    other processes, at least one."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    for load, free in ((0.0, 4), (1.7, 3), (3.2, 1), (9.0, 1)):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, 0.0, 0.0))
        assert sweep.cpu_budget() == {"cores": 4, "load": load, "free": free}


# ----------------------------------------------------------------------------------------------- --chunk


@pytest.mark.parametrize(
    "name,extra",
    [
        ("fnn", ["--width", "16", "--ranks", "2,5,16", "--select", "best", "--validate-every", "7"]),
        ("linear", ["--width", "16", "--ranks", "2,5,16"]),
        ("tfn", ["--width", "8", "--ranks", "1,3,8", "--seq-len", "3"]),
        ("final_layers", ["--width", "8", "--depth", "3", "--ranks", "1,8", "--layers", "1,2"]),
    ],
)
def test_results_do_not_depend_on_chunk(name, extra, tmp_path):
    """The same sweep with --chunk 1, 3 and the default: every run's numbers are bitwise equal. A run used to
    be padded to the largest rank of its stack, and the kernels then summed in another order: at these
    widths 4 of the 6 runs of each of the first three sweeps differed between --chunk 1 and the default.
    And a shared input (validation, test) went through a broadcast product whose last bits depended on
    the number of runs: the float64 test MSE of one run in six differed by one unit in the last place."""
    module = importlib.import_module(f"verification.{name}")
    results, stack_sizes = [], []
    for chunk in ([], ["--chunk", "1"], ["--chunk", "3"]):
        out = tmp_path / f"c{len(results)}"
        argv = ["--quick", "--seeds", "1", "--iterations", "30", "--frozen", "random", "--no-figure", "--out", str(out)]
        assert module.main(argv + extra + chunk) == 0
        results.append(
            {
                (r := json.loads(l))["id"]: (
                    r["losses"]["test"],
                    r["losses"]["val"],
                    r["losses"]["shifted"],
                    r["losses"]["train_final"],
                )
                for l in (out / "runs.jsonl").read_text().splitlines()
            }
        )
        stack_sizes.append({json.loads(l)["stack_size"] for l in (out / "runs.jsonl").read_text().splitlines()})
    assert results[0] == results[1] == results[2]
    # each record names the size of the stack it was trained in (on CUDA its rounding depends on it)
    assert stack_sizes[1] == {1} and max(stack_sizes[2]) <= 3 and max(stack_sizes[0]) > 1


def test_a_rank_padding_below_the_largest_rank_is_refused():
    from verification.trainer import FNNStack

    W, b = np.zeros((1, 2, 4, 4)), np.zeros((1, 2, 4))
    with pytest.raises(ValueError, match="rank_padding"):
        FNNStack(W, b, method="lora", ranks=[[3, 1]], init_seeds=[0], rank_padding=2)


# ---------------------------------------------------------------------------------------------- real_data


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--ranks=-1"], "--ranks"),
        (["--ranks", "a"], "--ranks"),
        (["--ranks", "0,21"], "--ranks"),
        (["--ranks", "1,1"], "--ranks"),
        (["--seeds", "0"], "--seeds"),
        (["--steps", "-3"], "--steps"),
        (["--depth", "0"], "--depth"),
        (["--threads", "0"], "--threads"),
        (["--datasets", "mnist"], "--datasets"),
        (["--from-runs", "missing.jsonl"], "--from-runs"),
        (["--checkpoints", "BLOCKER/sub"], "--checkpoints"),
        (["--out", "BLOCKER/sub"], "--out"),
        (["--steps", "x"], "--steps"),
    ],
)
def test_real_data_checks_its_flags_before_it_runs(argv, match, tmp_path, monkeypatch, refused):
    """Bad flags and unwritable folders: one line (status 2) before any training, no folder created
    (before, --ranks=-1 gave rows with -40 parameters, and an unwritable --out was found after the run)."""
    from verification import real_data

    blocker = tmp_path / "blocker"
    blocker.write_text("")
    argv = [a.replace("BLOCKER", str(blocker)) for a in argv]

    def no_work(*args, **kwargs):
        raise AssertionError("the experiment ran")

    monkeypatch.setattr(real_data, "run_experiment", no_work)
    out = tmp_path / "out"
    full = argv if "--out" in argv else argv + ["--out", str(out)]
    refused("real_data", full, match)
    assert not out.exists()


def test_real_data_widths_are_those_of_the_data():
    pytest.importorskip("sklearn")
    from verification.real_data import WIDTHS, load_tasks

    for dataset, width in WIDTHS.items():
        assert load_tasks(dataset)[2] == width


def test_pretraining_keeps_its_old_summary_when_the_disk_is_full(tmp_path, monkeypatch, capsys):
    """pretraining writes through the same functions: a rerun into its own folder whose summary.json
    write meets a full disk ends with one line naming the folder (status 1), the old summary.json
    byte-identical and no .tmp-* file."""
    from verification import pretraining

    out = tmp_path / "pre"
    argv = ["--quick", "--model", "linear", "--seeds", "2", "--no-figure", "--out", str(out)]
    assert pretraining.main(argv) == 0
    old = (out / "summary.json").read_bytes()

    def full(f, data):
        f.write(bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(outdir, "_write_all", full)
    capsys.readouterr()
    assert pretraining.main(argv) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "No space left on device" in line and str(out) in line and ": error: " in line
    assert (out / "summary.json").read_bytes() == old
    assert not list(out.rglob(".tmp-*"))
