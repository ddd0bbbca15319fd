"""Atomic outputs: a writer killed with SIGKILL half-way leaves nothing that looks like an output."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nnunet_compress.errors import CompressError
from nnunet_compress.nnunet.model_folder import atomic_output_folder, atomic_write_file

WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from nnunet_compress.nnunet.model_folder import atomic_output_folder
    with atomic_output_folder(Path(sys.argv[1])) as tmp:
        (tmp / "plans.json").write_text("{}")
        (tmp / "fold_0").mkdir()
        print("half-way", flush=True)
        time.sleep(60)
        (tmp / "fold_0" / "checkpoint_final.pth").write_text("done")
""")


def kill_half_way(output: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(output)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "half-way"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def test_sigkill_leaves_no_output_and_the_next_run_cleans_up(tmp_path):
    output = tmp_path / "compressed_model"
    kill_half_way(output)
    assert not output.exists(), "a killed writer left a (partial) output folder"
    leftovers = list(tmp_path.glob(".compressed_model.partial-*"))
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".")  # hidden; nnU-Net never reads it
    with atomic_output_folder(output) as tmp:
        (tmp / "plans.json").write_text("{}")
    assert (output / "plans.json").is_file()
    assert not list(tmp_path.glob(".compressed_model.partial-*")), "the abandoned partial folder was not removed"


def test_a_live_writers_partial_folder_is_left_alone(tmp_path):
    live = tmp_path / f".out.partial-{os.getppid()}-abc"  # our parent process is alive
    live.mkdir()
    with atomic_output_folder(tmp_path / "out") as tmp:
        (tmp / "x").write_text("1")
    assert live.is_dir()


def test_failure_inside_leaves_previous_output_untouched(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output_folder(output, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("boom")
    assert sorted(p.name for p in output.iterdir()) == ["old.txt"]
    assert not list(tmp_path.glob(".out.*"))
    with pytest.raises(CompressError, match="already exists"):
        with atomic_output_folder(output):
            pass


def test_atomic_file_write(tmp_path):
    target = tmp_path / "report.json"
    with pytest.raises(ValueError):
        atomic_write_file(target, lambda tmp: (tmp.write_text("partial"), (_ for _ in ()).throw(ValueError()))[1])
    assert not target.exists() and not list(tmp_path.iterdir())
    atomic_write_file(target, lambda tmp: tmp.write_text("ok"))
    assert target.read_text() == "ok"


def test_unwritable_output_location_is_a_clear_error():
    # /proc refuses new folders even for root, unlike chmod-protected folders
    with pytest.raises(CompressError, match="cannot write to /proc/nnunet_compress_test"):
        with atomic_output_folder(Path("/proc/nnunet_compress_test/out")):
            pass
