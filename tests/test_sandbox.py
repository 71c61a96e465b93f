"""The sandbox for model-written code (issue 30): hostile programs end as they should, and touch nothing outside.

Each test runs a real program in the real sandbox, with small limits so the file stays fast. Which isolation the
machine gives (namespaces or the in-process checks alone) is in every Outcome; the tests hold on both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from corsa.sandbox import Limits, run, run_tests, running

SMALL = Limits(cpu_s=2, wall_s=5, memory_mb=512, processes=8, file_size_mb=4)


def assert_no_strays(before: set[int]) -> None:
    """SIGKILL is delivered asynchronously: give killed processes a moment to be gone."""
    deadline = time.monotonic() + 3
    while (left := running() - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"processes outlived the sandbox: {sorted(left)}"


def test_a_passing_program_passes_with_its_output():
    out = run("print('hello')", SMALL)
    assert (out.status, out.returncode, out.stdout) == ("passed", 0, "hello\n")
    assert out.network in ("namespace", "audit-hook")
    assert out.wall_s < SMALL.wall_s


def test_a_failing_assertion_fails_and_its_traceback_names_the_program():
    out = run_tests("def add(a, b):\n    return a - b", "assert add(1, 2) == 3, 'add is wrong'", SMALL)
    assert (out.status, out.returncode) == ("failed", 1)
    assert 'File "main.py", line 4' in out.stderr and "AssertionError: add is wrong" in out.stderr
    assert "sandbox.py" not in out.stderr  # the sandbox's own frames are left out


def test_ordinary_programs_work():
    """Files in its own folder, a temporary folder, a process pool, asyncio and numpy all stay allowed."""
    program = """
import asyncio, multiprocessing, os, tempfile
import numpy as np

open("data.txt", "w").write("42")
assert open("data.txt").read() == "42"
with tempfile.TemporaryDirectory() as d:
    open(os.path.join(d, "x"), "w").write("y")
asyncio.run(asyncio.sleep(0))

def square(x):
    return x * x

with multiprocessing.Pool(2) as pool:
    assert pool.map(square, [1, 2, 3]) == [1, 4, 9]
print(int(np.arange(4).sum()))
"""
    out = run(program, SMALL)
    assert out.status == "passed", out.stderr
    assert out.stdout == "6\n"


def test_environment_is_scrubbed_and_the_folder_removed(monkeypatch):
    monkeypatch.setenv("CORSA_SECRET_TOKEN", "hunter2")
    out = run("import os, json\nprint(json.dumps([os.getcwd(), os.environ['HOME'], sorted(os.environ)]))", SMALL)
    assert out.status == "passed", out.stderr
    cwd, home, names = json.loads(out.stdout)
    assert home == cwd and "corsa-sandbox-" in cwd
    assert "CORSA_SECRET_TOKEN" not in names and set(names) <= {
        "PATH", "HOME", "TMPDIR", "LANG", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"}
    assert not os.path.exists(cwd)


def test_an_infinite_loop_times_out():
    out = run("while True:\n    pass", Limits(cpu_s=1, wall_s=3, memory_mb=512))
    assert out.status == "timeout"
    assert out.wall_s < 3.5


def test_a_sleeping_program_is_stopped_by_the_clock():
    out = run("import time\ntime.sleep(60)", Limits(wall_s=1))
    assert (out.status, out.returncode) == ("timeout", None)
    assert out.wall_s < 2


def test_a_memory_bomb_runs_out_of_memory():
    out = run("hoard = []\nwhile True:\n    hoard.append(bytearray(10**7))", Limits(cpu_s=5, wall_s=8, memory_mb=256))
    assert out.status == "memory", (out.status, out.stderr)
    assert "MemoryError" in out.stderr


def test_a_fork_bomb_is_stopped_and_leaves_no_process_behind():
    before = running()
    out = run("import os\nwhile True:\n    os.fork()", SMALL)
    assert out.status in ("failed", "killed", "timeout")
    assert_no_strays(before)


def test_processes_left_running_are_killed_with_the_sandbox():
    before = running()
    out = run("import os, time\nif os.fork() == 0:\n    time.sleep(60)\nprint('parent done')", SMALL)
    assert out.status == "passed" and out.wall_s < 2
    assert_no_strays(before)


@pytest.mark.parametrize("attempt", [
    "open(TARGET, 'w').write('x')",
    "import os; os.open(TARGET, os.O_WRONLY | os.O_CREAT)",
    "import pathlib; pathlib.Path(TARGET).write_text('x')",
    "import os; os.mkdir(TARGET)",
    "import os; os.symlink(TARGET, 'link'); open('link', 'w').write('x')",
    "import os; fd = os.open(os.path.dirname(TARGET), os.O_RDONLY); os.open('x', os.O_WRONLY | os.O_CREAT, dir_fd=fd)",
    "import subprocess; subprocess.run(['sh', '-c', 'echo x > ' + TARGET])",
    "import os; os.system('echo x > ' + TARGET)",
])
def test_writing_outside_its_folder_is_refused(tmp_path, attempt):
    canary = tmp_path / "canary"
    canary.mkdir()
    out = run(f"TARGET = {str(canary / 'x')!r}\n{attempt}", SMALL)
    assert out.status == "refused", out.stderr
    assert list(canary.iterdir()) == []


@pytest.mark.parametrize("attempt", [
    "print(open(SECRET).read())",
    "import pathlib; print(pathlib.Path(SECRET).read_text())",
    "import shutil; shutil.copy(SECRET, 'copy'); print(open('copy').read())",
    "import os; print(os.listdir(os.path.dirname(SECRET)))",
    "import os; print(os.listdir(HOME))",
])
def test_reading_outside_its_folder_is_refused(tmp_path, attempt):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    out = run(f"SECRET = {str(secret)!r}\nHOME = {os.path.expanduser('~')!r}\n{attempt}", SMALL)
    assert out.status == "refused", out.stderr
    assert "TOPSECRET" not in out.stdout and "secret.txt" not in out.stdout


@pytest.mark.parametrize("attempt", [
    "import socket; socket.socket()",
    "import socket; socket.create_connection(('127.0.0.1', 9), timeout=1)",
    "import socket; socket.getaddrinfo('localhost', 80)",
    "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9', timeout=1)",
])
def test_network_access_is_refused(attempt):
    out = run(attempt, SMALL)
    assert out.status == "refused", out.stderr


def test_libraries_of_the_installation_load_and_no_other_native_code_runs():
    # torch loads its own libraries with ctypes when imported (CodeUpdateArena has torch updates).
    out = run("import torch\nassert torch.ones(2).sum().item() == 2.0", Limits(wall_s=60, cpu_s=30, memory_mb=4096))
    assert out.status == "passed", out.stderr
    for attempt in ("import ctypes; ctypes.CDLL('libc.so.6')",
                    "import ctypes; ctypes.CDLL(None).getpid()",
                    # A file of its own folder: refused before it is loaded (else: "failed", not a library).
                    "import ctypes\nopen('x.so', 'wb').write(b'0')\nctypes.CDLL('./x.so')"):
        out = run(attempt, SMALL)
        assert out.status == "refused", (attempt, out.stderr)


def test_it_cannot_kill_its_parent_or_the_caller():
    for target in ("os.getppid()", str(os.getpid())):
        out = run(f"import os, signal\nos.kill({target}, signal.SIGKILL)", SMALL)
        assert out.status == "refused", out.stderr
    # Still here: this test process survived both.


def test_limits_must_be_positive():
    with pytest.raises(ValueError, match="wall_s"):
        Limits(wall_s=0)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "corsa.sandbox", *args], capture_output=True, text=True, timeout=60,
                          check=False)


def test_cli_prints_one_json_line_whatever_the_program_does(tmp_path):
    good, bad = tmp_path / "good.py", tmp_path / "bad.py"
    good.write_text("print('hi')")
    bad.write_text("raise SystemExit(3)")
    for path, status in ((good, "passed"), (bad, "failed")):
        done = cli(str(path), "--wall-s", "5", "--memory-mb", "512")
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert len(lines) == 1 and json.loads(lines[0])["status"] == status


def test_cli_names_a_missing_file_in_one_line(tmp_path):
    missing = tmp_path / "nope.py"
    done = cli(str(missing))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and str(missing) in done.stderr and "Traceback" not in done.stderr
