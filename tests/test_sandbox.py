"""The code sandbox against hostile programs, through code_reward (the way the trainer calls it).

Each hostile program must score 0, within its time limit, and leave this process (memory, open files, child
processes) and the machine (files outside the sandbox, processes of the sandbox uid) as they were. Every case
runs under both isolations: "kernel" (namespaces + uid nobody; needs root on Linux, skipped otherwise) and the
"audit" fallback. Elapsed seconds per case are printed (`pytest -s`).
"""
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

from fastrl.rewards import CodeReward, SandboxLimits, run_python, run_python_batch, sandbox_isolation
from fastrl.rewards.code import _split_to_fill
from fastrl.rewards.sandbox_child import NOBODY, _first_closed_ancestor

TIMEOUT = 1.5  # seconds per sandboxed run in these tests
MEMORY_MB = 256  # smaller than the default, so the memory bombs hit the limit sooner
SLACK = 1.5  # start-up, kill and reap on a loaded 2-core machine
ISOLATIONS = [
    pytest.param("kernel", marks=pytest.mark.skipif(sandbox_isolation() != "kernel",
                                                     reason="kernel isolation needs root on Linux")),
    "audit",
]


def fenced(code: str) -> str:
    return f"Here is my solution:\n```python\n{code}\n```\n"


def scored(isolation: str, code: str, tests="assert True") -> tuple[float, float]:
    """(reward, seconds) for one completion holding `code`."""
    reward = CodeReward(SandboxLimits(timeout=TIMEOUT, memory_mb=MEMORY_MB), isolation=isolation)
    start = time.perf_counter()
    (value,) = reward([fenced(code)], tests=[tests])
    seconds = time.perf_counter() - start
    print(f"[{isolation}] {seconds:.2f} s")
    return value, seconds


# ------------------------------------------------------------------------------------- what must not change

def rss_mb() -> float:
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def processes(match) -> list[int]:
    """PIDs of processes whose /proc/<pid>/status satisfies match(ppid, uid)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue  # exited meanwhile
        if match(int(fields["PPid"]), int(fields["Uid"].split()[0])):
            found.append(int(entry))
    return found


def leftovers() -> list[int]:
    """Children of this process, any process of the sandbox uid (no one else here runs as nobody), and any
    sandbox launcher or worker still running (in audit isolation they run as this user)."""
    me = os.getpid()
    return processes(lambda ppid, uid: ppid == me or uid == NOBODY) + sandbox_processes()


def sandbox_processes() -> list[int]:
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if b"sandbox_child.py" in f.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def warmed_up():
    """One run first, so imports and lazily made objects exist before anything is measured."""
    run_python(["pass"], SandboxLimits(timeout=30))


@pytest.fixture
def unharmed(warmed_up):
    """Fail the test if this process's memory or open files grew, or processes were left behind."""
    rss, fds = rss_mb(), open_fds()
    yield
    deadline = time.monotonic() + 2.0  # the kernel finishes tearing a namespace down asynchronously
    while leftovers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert leftovers() == []
    assert open_fds() == fds
    assert rss_mb() - rss < 20, f"RSS grew from {rss:.0f} MB to {rss_mb():.0f} MB"
    assert subprocess.run(["true"]).returncode == 0  # the machine still starts processes


# --------------------------------------------------------------------------------------- ordinary programs

SOLUTION = "def add(a, b):\n    return a + b"


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_correct_wrong_and_partial(isolation, unharmed):
    tests = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 5", "assert add('a', 'b') == 'ab'"]
    assert scored(isolation, SOLUTION, tests)[0] == 1.0 - 1 / 4  # three of four tests hold
    assert scored(isolation, SOLUTION, tests[:2])[0] == 1.0
    subtracts = "def add(a, b):\n    return a - b"
    assert scored(isolation, subtracts, ["assert add(1, 2) == 3", "assert add(2, 0) == 2"])[0] == 0.5  # 1-2, 2-0
    assert scored(isolation, "def add(a, b):\n    return a * b", "assert add(1, 2) == 3")[0] == 0.0
    assert scored(isolation, "def add(a, b) return a + b", "assert add(1, 2) == 3")[0] == 0.0  # syntax error


def test_batch_extraction_and_columns():
    reward = CodeReward(SandboxLimits(timeout=TIMEOUT, memory_mb=MEMORY_MB), isolation="audit")
    completions = [
        [{"role": "assistant", "content": fenced("def add(a, b):\n    return 0") + fenced(SOLUTION)}],  # last block
        "```js\nfunction add(a, b) { return a + b }\n```",  # not Python
        "```\n" + SOLUTION + "\n```",  # untagged block
        "no code at all",
        fenced(SOLUTION),
    ]
    tests = ["assert add(1, 2) == 3", "assert add(1, 2) == 3", ["assert add(1, 2) == 3"], "assert True", []]
    assert reward(completions, tests=tests) == [1.0, 0.0, 1.0, 0.0, None]
    with pytest.raises(ValueError, match="tests"):
        reward(completions, tests=tests[:2])
    with pytest.raises(ValueError, match=r"tests\[0\]"):
        reward(completions[:1], tests=[3])


def test_exit_before_the_tests_is_a_failure():
    for code in ("import sys\nsys.exit(0)", "import os\nos._exit(0)"):
        assert scored("audit", SOLUTION + "\n" + code, "assert add(1, 2) == 3")[0] == 0.0


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_no_trainer_environment(isolation, unharmed, monkeypatch):
    monkeypatch.setenv("FASTRL_FAKE_TOKEN", "s3cret")
    code = ("import os\n"
            "assert 'FASTRL_FAKE_TOKEN' not in os.environ\n"
            "assert os.getcwd() == os.environ['HOME']\n"
            "open('scratch.txt', 'w').write('its own directory is writable')")
    assert scored(isolation, code)[0] == 1.0


def test_kernel_isolation_hides_host_files_and_drops_root(tmp_path):
    if sandbox_isolation() != "kernel":
        pytest.skip("kernel isolation needs root on Linux")
    secret = tmp_path / "token.txt"
    secret.write_text("s3cret")
    assert scored("kernel", f"print(open({str(secret)!r}).read())")[0] == 0.0
    assert scored("kernel", "import os\nassert os.getuid() != 0 and os.geteuid() != 0")[0] == 1.0
    assert scored("kernel", "import os\nassert len([p for p in os.listdir('/proc') if p.isdigit()]) <= 3")[0] == 1.0


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_process_limit_is_in_force(isolation, unharmed):
    """Kernel: RLIMIT_NPROC binds (it would not for root, hence uid nobody); audit: no fork at all."""
    most = SandboxLimits().max_processes - 1 if isolation == "kernel" else 0
    code = ("import os, time\nn = 0\nwhile n < 100:\n    try:\n        pid = os.fork()\n    except OSError:\n"
            "        break\n    if pid == 0:\n        time.sleep(3600)\n    n += 1\n"
            f"assert n <= {most}, n")
    assert scored(isolation, code)[0] == 1.0


# ---------------------------------------------------------------------------------------- hostile programs

HOSTILE = {
    "infinite loop": "while True:\n    pass",
    "sleeps past the limit": "import time\ntime.sleep(3600)",
    "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
    "leaves the process group": "import os, time\nos.setsid()\ntime.sleep(3600)",
    "children leave the process group": ("import os, time\nfor _ in range(4):\n    if os.fork() == 0:\n"
                                          "        os.setsid()\n        time.sleep(3600)\ntime.sleep(3600)"),
    "memory bomb": "x = bytearray(16 * 2**30)",
    "memory grows until it fails": "chunks = []\nwhile True:\n    chunks.append(bytearray(2**24))",
    "writes a huge file": "with open('big', 'wb') as f:\n    while True:\n        f.write(bytes(2**20))",
}


@pytest.mark.parametrize("isolation", ISOLATIONS)
@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_program_scores_zero(isolation, case, unharmed):
    reward, seconds = scored(isolation, HOSTILE[case])
    assert reward == 0.0
    assert seconds < TIMEOUT + SLACK


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_socket_cannot_reach_a_server_on_this_machine(isolation, unharmed):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        code = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                "s.sendall(b'leak')")
        reward, seconds = scored(isolation, code)
        outside, _ = scored(isolation, "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)")
        server.settimeout(0.1)  # a connection that got through would be waiting in the backlog by now
        with pytest.raises(socket.timeout):
            server.accept()[0].close()
    assert (reward, outside) == (0.0, 0.0)
    assert seconds < TIMEOUT + SLACK


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_cannot_write_outside_its_directory(isolation, unharmed):
    name = f"fastrl-sandbox-escape-{uuid.uuid4().hex}"
    targets = [f"/tmp/{name}", f"/var/tmp/{name}", f"/dev/shm/{name}", os.path.join(os.getcwd(), name)]
    for target in targets:
        assert scored(isolation, f"open({target!r}, 'w').write('escaped')")[0] == 0.0
    assert scored(isolation, f"import os\nopen(os.path.join(os.getcwd(), '..', {name!r}), 'w').write('x')")[0] == 0.0
    assert scored(isolation, f"import os\nos.mkdir('/tmp/{name}-dir')")[0] == 0.0
    leaked = [t for t in targets + [f"/tmp/{name}-dir"] if os.path.exists(t)]
    for path in leaked:  # clean up before failing
        os.remove(path) if os.path.isfile(path) else os.rmdir(path)
    assert leaked == []


def test_parallel_batch_is_bounded_and_isolated(unharmed):
    """Four completions, one hanging: the batch takes about one timeout on two workers, not four."""
    reward = CodeReward(SandboxLimits(timeout=TIMEOUT, memory_mb=MEMORY_MB), max_workers=2)
    completions = [fenced(SOLUTION), fenced(HOSTILE["infinite loop"]), fenced(SOLUTION), fenced("add = max")]
    start = time.perf_counter()
    values = reward(completions, tests=["assert add(1, 2) == 3"] * 4)
    seconds = time.perf_counter() - start
    print(f"batch of 4 on 2 workers: {seconds:.2f} s")
    assert values == [1.0, 0.0, 1.0, 0.0]
    assert seconds < TIMEOUT + 2 * SLACK


def test_run_python_reports_isolation_and_rejects_bad_input():
    result = run_python(["x = 1", "assert x == 1"], SandboxLimits(timeout=10), isolation="audit")
    assert (result.passed, result.timed_out, result.exit_code, result.isolation) == (True, False, 0, "audit")
    result = run_python(["raise KeyError('boom')"], SandboxLimits(timeout=10), isolation="audit")
    assert not result.passed and "KeyError: 'boom'" in result.stderr
    with pytest.raises(ValueError, match="sources"):
        run_python("print(1)")
    with pytest.raises(ValueError, match="isolation"):
        run_python(["pass"], isolation="none")
    with pytest.raises(ValueError, match="timeout"):
        SandboxLimits(timeout=0)
    with pytest.raises(ValueError, match="memory_mb"):
        SandboxLimits(memory_mb=1)
    with pytest.raises(ValueError, match="max_workers"):
        CodeReward(max_workers=0)


def test_timeout_is_reported_and_kills_by_pid():
    result = run_python(["import os, time\nos.setsid()\ntime.sleep(3600)"], SandboxLimits(timeout=0.5), "audit")
    assert (result.passed, result.timed_out, result.exit_code, result.isolation) == (False, True, None, "audit")
    assert 0.5 <= result.seconds < 0.5 + SLACK
    assert sandbox_processes() == []


@pytest.mark.parametrize("isolation", ISOLATIONS)
@pytest.mark.parametrize("trick", ["floods the report pipe", "closes the report pipe and keeps running"])
def test_report_pipe_tricks_are_timeouts_or_failures(isolation, trick, unharmed):
    """The harness's report pipe is the one open fd above 2; abusing it must neither pass nor hang."""
    pipe_fd = ("max(int(fd) for fd in os.listdir('/proc/self/fd')"
               " if int(fd) > 2 and os.path.exists(f'/proc/self/fd/{fd}'))")  # the listing's own fd is gone
    action = {"floods the report pipe": "os.write(fd, bytes(65536))",
              "closes the report pipe and keeps running": "os.close(fd)\nwhile True:\n    pass"}[trick]
    reward, seconds = scored(isolation, f"import os\nfd = {pipe_fd}\n{action}")
    assert reward == 0.0 and seconds < TIMEOUT + SLACK


UNPRIVILEGED_RUN = """
import ctypes, os, sys
sys.path.insert(0, {repo!r})
from fastrl.rewards.sandbox_child import (CLONE_NEWNS, MNT_DETACH, MS_BIND, MS_PRIVATE, MS_REC, NOBODY,
                                         _first_closed_ancestor, _mount)
# a private mount namespace in which nobody can run this interpreter: hide the closed directory (pyenv's /root)
# and bind the interpreter's prefix back, then become nobody and call the sandbox as an ordinary user would
assert ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNS) == 0
_mount(None, "/", None, MS_REC | MS_PRIVATE)
closed = _first_closed_ancestor(sys.base_prefix)
if closed:
    stage = "/tmp/.fastrl-test-stage-" + str(os.getpid())
    os.mkdir(stage)
    _mount(sys.base_prefix, stage, None, MS_BIND | MS_REC)
    _mount("tmpfs", closed, "tmpfs", 0, "mode=755")
    os.makedirs(sys.base_prefix)
    _mount(stage, sys.base_prefix, None, MS_BIND | MS_REC)
    assert ctypes.CDLL(None).umount2(stage.encode(), MNT_DETACH) == 0
    os.rmdir(stage)  # the directory was made on the host's /tmp
os.setgroups([]); os.setgid(NOBODY); os.setuid(NOBODY)
from fastrl.rewards.sandbox import SandboxLimits, run_python
for code in {programs!r}:
    r = run_python([code], SandboxLimits(timeout=2))
    print(r.isolation, r.passed)
"""


def test_audit_isolation_as_an_unprivileged_user():
    """The fallback where it is meant to run: the caller is not root, so no namespaces and no uid change."""
    if sandbox_isolation() != "kernel":
        pytest.skip("setting up an unprivileged caller needs root")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if _first_closed_ancestor(repo):  # the unprivileged caller runs this checkout's .venv python
        pytest.skip(f"{_first_closed_ancestor(repo)} is closed to other users (e.g. a `mktemp -d` clone): "
                    "the unprivileged user (nobody) cannot run this checkout's interpreter")
    programs = ["assert 1 + 1 == 2", "import os\nos.fork()", "import socket\nsocket.socket()",
                "import ctypes\nctypes.CDLL(None).fork()", f"open('/tmp/fastrl-escape-{uuid.uuid4().hex}', 'w')"]
    script = UNPRIVILEGED_RUN.format(repo=repo, programs=programs)
    done = subprocess.run([sys.executable, "-I", "-S", "-c", script], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:5] == ["audit True"] + ["audit False"] * 4


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_runs_of_one_batch_are_isolated_from_each_other(isolation, unharmed):
    runs = [["secret = 1\nopen('left_behind', 'w').write('x')"],
            ["while True:\n    pass"],
            ["import os\nassert 'secret' not in globals() and not os.path.exists('left_behind')"],
            ["raise ValueError('third')"]]
    results = run_python_batch(runs, SandboxLimits(timeout=1.0, memory_mb=MEMORY_MB), isolation)
    assert [(r.passed, r.timed_out) for r in results] == [(True, False), (False, True), (True, False), (False, False)]
    assert "ValueError: third" in results[3].stderr
    assert 1.0 <= results[1].seconds < 1.0 + SLACK


def test_split_to_fill_keeps_every_run_once():
    batches = [(0, ["a", "b", "c", "d", "e"]), (1, ["f"])]
    split = _split_to_fill(batches, workers=4)
    assert len(split) == 4
    assert sorted((row, run) for row, runs in split for run in runs) == sorted(
        (row, run) for row, runs in batches for run in runs)
    assert _split_to_fill(batches, workers=1) == batches
    assert _split_to_fill([(0, ["a"])], workers=8) == [(0, ["a"])]
