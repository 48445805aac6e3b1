"""The `code_tests` reward and its sandbox: scoring, input formats, errors, and a battery of hostile programs.

Every hostile program is the "solution" to a test whose expected output is 42, and prints 42 only
if its attack worked: a score of 0 means the attack failed (or the program was killed). After each
one we check that it ended within its limit, that nothing it started is still running, that nothing
appeared on disk outside its directory, and (by still being here) that this process survived.
"""
from __future__ import annotations

import json
import os
import pwd
import socket
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from groupwise.rewards import REWARDS, RewardError, RewardRunner, load_reward_function
from groupwise.rewards import sandbox as sb
from groupwise.rewards import sandbox_child
from groupwise.rewards.code import extract_code, outputs_match, parse_tests

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox needs Linux")

TIMEOUT = 1.5      # seconds per test in the hostile battery
MEMORY = 256       # MB
MARGIN = 2.5       # seconds of slack on a loaded 2-core machine
REPO = Path(__file__).resolve().parents[1]
TAG = uuid.uuid4().hex[:10]  # in the names of everything the hostile programs try to create
TAG_DIGITS = str(int(TAG, 16) % 10 ** 8)  # the same, for `sleep 59.<digits>`


def score(code: str, tests, **options) -> float | None:
    options = {"timeout_s": TIMEOUT, "memory_mb": MEMORY, **options}
    fn = load_reward_function("code_tests", options)
    return fn(prompts=["p"], completions=[code], completion_ids=[[1]], tests=[tests])[0]


def scores(codes: list[str], tests: list, **options) -> list[float | None]:
    options = {"timeout_s": TIMEOUT, "memory_mb": MEMORY, **options}
    fn = load_reward_function("code_tests", options)
    return fn(prompts=["p"] * len(codes), completions=codes, completion_ids=[[1]] * len(codes), tests=tests)


# ----------------------------------------------------------------------------- normal behaviour

DOUBLE_TESTS = {"inputs": ["1\n", "2\n", "3\n", "10\n"], "outputs": ["2\n", "4\n", "6\n", "20\n"]}


def test_correct_program_passes_all_stdio_tests():
    code = "```python\nn = int(input())\nprint(n * 2)\n```"
    assert score(code, DOUBLE_TESTS) == 1.0


def test_wrong_program_scores_the_fraction_of_tests_passed():
    code = "n = int(input())\nprint(n * 2 if n < 3 else n)\n"  # right for 1 and 2 only: 2 of 4
    assert score(code, DOUBLE_TESTS) == pytest.approx(0.5)
    assert score(code, DOUBLE_TESTS, mode="all") == 0.0
    assert score("n = int(input())\nprint(2 * n)", DOUBLE_TESTS, mode="all") == 1.0


def test_hand_computed_fractions_for_a_batch():
    tests = [
        [{"input": "1 2\n", "output": "3"}, {"input": "5 5\n", "output": "10"}, {"input": "0 7\n", "output": "7"}],
        ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(-1, 1) == 0"],
        ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(-1, 1) == 0"],
        None,
    ]
    codes = [
        "a, b = map(int, input().split())\nprint(a + b if a else 0)",   # 2 of 3 (0 7 → 0)
        "def add(a, b):\n    return a + b",                            # 3 of 3
        "def add(a, b):\n    return a * b if a < 0 else a + b",        # 2 of 3
        "print('not applicable')",
    ]
    fraction = scores(codes, tests)
    assert fraction[:3] == pytest.approx([2 / 3, 1.0, 2 / 3]) and fraction[3] is None
    assert scores(codes, tests, mode="all") == [0.0, 1.0, 0.0, None]


def test_output_lines_are_compared_stripped():
    assert outputs_match("  1 2 \n3\t\n\n", "1 2\n3")
    assert not outputs_match("1\n2", "1 2")
    code = "print('  yes  ')\nprint()\nprint('no ')\n"
    assert score(code, [{"input": "", "output": "yes\n\nno"}]) == 1.0
    assert score(code, [{"input": "", "output": "yes\nno"}]) == 0.0  # the blank line inside counts


def test_stdin_stdout_formats_apps_codecontests_and_json():
    code = "import sys\nprint(sum(map(int, sys.stdin.read().split())))"
    apps = {"inputs": ["1 2\n", "3\n4\n"], "outputs": ["3\n", "7\n"]}
    assert score(code, json.dumps(apps)) == 1.0  # APPS/TACO `input_output` as a JSON string
    assert score(code, {"input": ["1 2\n", "3\n4\n"], "output": ["3\n", "8\n"]}) == 0.5  # CodeContests
    assert score(code, {"input": "5 5", "output": "10"}) == 1.0  # one case
    assert score(code, {"inputs": [["1", "2"]], "outputs": [["3"]]}) == 1.0  # lists of lines


def test_call_based_apps_tests():
    tests = json.dumps({"fn_name": "two_sum", "inputs": [[[1, 2, 3], 5], [[1, 1], 2]], "outputs": [[[1, 2]], [[0, 1]]]})
    code = ("def two_sum(nums, target):\n    seen = {}\n    for i, x in enumerate(nums):\n"
            "        if target - x in seen:\n            return [seen[target - x], i]\n        seen[x] = i\n")
    assert score(code, tests) == 1.0
    leetcode = "class Solution:\n    def two_sum(self, nums, target):\n        return [0, 1]\n"
    assert score(leetcode, tests) == 0.5


def test_assert_style_mbpp_and_humaneval():
    mbpp = {"test_list": ["assert sq(2) == 4", "assert sq(3) == 9", "assert sq(4) == 15"],
            "test_setup_code": "import math"}
    assert score("def sq(x):\n    return x * x", mbpp) == pytest.approx(2 / 3)
    humaneval = "def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(3) == 9\n\ncheck(sq)\n"
    assert score("def sq(x):\n    return x * x", humaneval) == 1.0
    assert score("def sq(x):\n    return x + x", humaneval) == 0.0  # one test: both asserts


def test_an_early_exit_cannot_pass_assert_tests():
    for escape in ("import sys\nsys.exit(0)", "import os\nos._exit(0)", "raise SystemExit",
                   "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)"):
        assert score(f"def add(a, b):\n    return 0\n{escape}\n", ["assert add(1, 2) == 3"]) == 0.0, escape


def test_code_extraction():
    assert extract_code("text\n```python\na = 1\n```\nmore\n```python\nb = 2\n```\nend") == "b = 2\n"
    assert extract_code("```py\nx = 1\n```") == "x = 1\n"
    assert extract_code("just code\nprint(1)") == "just code\nprint(1)"
    assert extract_code("```python\nprint(1)\n# truncated") == "print(1)\n# truncated"
    messages = [{"role": "assistant", "content": "```python\nprint(42)\n```"}]
    fn = load_reward_function("code_tests", {"timeout_s": TIMEOUT})
    assert fn(prompts=["p"], completions=[messages], completion_ids=[[1]], tests=[[{"input": "", "output": "42"}]]) == [1.0]


def test_runtime_error_timeout_and_metrics():
    fn = load_reward_function("code_tests", {"timeout_s": 1, "memory_mb": MEMORY, "workers": 2})
    out = fn(prompts=["p"] * 3, completions=["1/0", "while True: pass", "print(42)"], completion_ids=[[1]] * 3,
             tests=[[{"input": "", "output": "42"}]] * 3)
    assert out == [0.0, 0.0, 1.0]
    m = fn.last_metrics
    assert m["code_tests/executions"] == 3 and m["code_tests/timeouts"] == 1 and m["code_tests/runtime_errors"] == 1
    iso = sb.isolation()
    assert m["sandbox/network_namespace"] == float(iso.network == "netns")
    assert fn.isolation() == iso


def test_registered_and_usable_through_the_runner():
    assert "code_tests" in REWARDS

    class Spec:
        name, weight, kwargs = "code_tests", 1.0, {"timeout_s": TIMEOUT, "memory_mb": MEMORY}

    runner = RewardRunner([Spec()])
    result = runner.score(["p", "p"], ["print(42)", "print(41)"], [[1], [1]],
                          columns={"tests": [[{"input": "", "output": "42"}]] * 2})
    assert result.values[:, 0].tolist() == [1.0, 0.0]


@pytest.mark.parametrize("value, reason", [
    ("{not json", "not valid JSON"),
    ({"inputs": ["1"], "outputs": []}, "1 inputs for 0 outputs"),
    ({"foo": 1}, "not inputs/outputs"),
    ([], "no test case"),
    ([3], "item 0"),
    (17, "int"),
    ({"inputs": [1], "outputs": ["1"]}, "not text"),
    ({"fn_name": "not an identifier", "inputs": [[1]], "outputs": [1]}, "identifier"),
])
def test_malformed_tests_raise_reward_error_naming_function_column_and_sample(value, reason):
    fn = load_reward_function("code_tests", {"tests_column": "cases"})
    good = [{"input": "", "output": "1"}]
    with pytest.raises(RewardError) as e:
        fn(prompts=["p", "p"], completions=["print(1)"] * 2, completion_ids=[[1]] * 2, cases=[good, value])
    message = str(e.value)
    assert "code_tests" in message and "'cases'" in message and "sample 1" in message and reason in message


def test_missing_column_and_bad_options():
    fn = load_reward_function("code_tests", {})
    with pytest.raises(RewardError, match=r"code_tests.*'tests'.*sample 0.*answer"):
        fn(prompts=["p"], completions=["x"], completion_ids=[[1]], answer=["1"])
    for options in ({"mode": "some"}, {"workers": 0}, {"timeout_s": -1}, {"memory_mb": 0}, {"nonsense": 1}):
        with pytest.raises(RewardError):
            load_reward_function("code_tests", options)
    assert parse_tests(None) is None


def test_large_input_and_output_round_trip():
    data = "x" * 300_000 + "\n"
    assert score("import sys\nsys.stdout.write(sys.stdin.read())", [{"input": data, "output": data}]) == 1.0


def test_output_is_capped():
    box = sb.Sandbox(timeout_s=5, memory_mb=MEMORY, max_output_bytes=10_000)
    start = time.monotonic()
    result = box.run("while True:\n    print('x' * 1000)")
    assert result.status == "output_limit" and len(result.stdout) <= 10_000 and result.output_truncated
    assert time.monotonic() - start < 3


def test_process_limit_binds():
    box = sb.Sandbox(timeout_s=5, memory_mb=MEMORY, max_processes=8)
    code = ("import os, time\nn = 0\nfor _ in range(50):\n    try:\n        pid = os.fork()\n    except OSError:\n"
            "        break\n    if pid == 0:\n        time.sleep(3)\n        os._exit(0)\n    n += 1\nprint(n)\n")
    result = box.run(code)
    assert result.ok, result
    assert int(result.stdout) < 8
    assert not _leftover_processes()


def test_socket_prelude_fallback_blocks_the_network(listener):
    try:
        iso = sb._force_plan(netns=False, mountns=True, uid=os.geteuid() == 0)
        assert iso.network == "prelude"
        result = sb.Sandbox(timeout_s=5, memory_mb=MEMORY).run(
            f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {listener.port}), timeout=1)\n    print('open')\n"
            "except PermissionError:\n    print('blocked')\n")
        assert result.stdout.strip() == "blocked"
    finally:
        sb._reset_for_tests()
    assert sb.isolation().network in ("netns", "prelude")
    assert listener.connections == []


def test_isolation_in_force_is_reported():
    iso = sb.isolation()
    assert iso.network in ("netns", "prelude")
    assert set(iso.as_metrics()) == {"sandbox/network_namespace", "sandbox/readonly_filesystem", "sandbox/separate_uid",
                                     "sandbox/process_containment"}
    if os.geteuid() == 0 and sys.platform == "linux":
        assert iso.processes == "uid"  # root is exempt from RLIMIT_NPROC: a separate uid is required


# ----------------------------------------------------------------------------- the hostile battery


class Listener:
    """A TCP server on 127.0.0.1 in this process; records every connection it accepts."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.connections: list = []
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while not self._stop:
            try:
                conn, addr = self.sock.accept()
            except OSError:
                continue
            self.connections.append(addr)
            conn.close()

    def close(self):
        self._stop = True
        self._thread.join()
        self.sock.close()


@pytest.fixture
def listener():
    server = Listener()
    yield server
    server.close()


def _cmdline(pid: str) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _uid_of(pid: str) -> int | None:
    """The real uid of a live process (None for a zombie: dead, waiting for init to reap it)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return None
    if status.get("State", "").split()[:1] == ["Z"]:
        return None
    return int(status["Uid"].split()[0])


def _leftover_processes() -> list[str]:
    """Processes still running that a sandboxed program started: by marker in the command line,
    or (with a separate uid) by uid."""
    slots = sb._uid_slots
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        cmd = _cmdline(pid)
        if TAG.encode() in cmd or TAG_DIGITS.encode() in cmd or sb.RUNNER_FILE.encode() in cmd:
            found.append(f"{pid}: {cmd!r}")
            continue
        uid = _uid_of(pid)
        if slots is not None and uid is not None and slots.base <= uid < slots.base + slots.size:
            found.append(f"{pid}: uid {uid} {cmd!r}")
    return found


def _sandbox_dirs() -> set[str]:
    return {name for name in os.listdir(tempfile.gettempdir()) if name.startswith("gw-sandbox-")}


OUTSIDE_TMP = Path(tempfile.gettempdir()) / f"gw-hostile-{TAG}"
OUTSIDE_REPO = REPO / f"gw-hostile-{TAG}"
SECRET = f"s3cret-{TAG}"
HOME = pwd.getpwuid(os.getuid()).pw_dir

# name → (program, extra check after the run or None). `{...}` fields are filled in by the test.
HOSTILE = {
    "infinite loop": "while True:\n    pass\n",
    "sleep past the limit": "import time\ntime.sleep(60)\nprint(42)\n",
    "ignore signals + busy loop": ("import signal\nfor s in (signal.SIGTERM, signal.SIGXCPU, signal.SIGINT, signal.SIGHUP):\n"
                                   "    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    pass\n"),
    "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
    "threads bomb": ("import threading, time\nwhile True:\n    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"),
    "memory bomb (one block)": "x = bytearray(8 * 1024 ** 3)\nprint(42)\n",
    "memory bomb (growing)": "blocks = []\nwhile True:\n    blocks.append(bytearray(16 * 1024 ** 2))\n",
    "huge file in cwd": "with open('big', 'wb') as f:\n    for _ in range(1024):\n        f.write(b'x' * 1024 ** 2)\nprint(42)\n",
    "fill the disk with files": ("i = 0\nwhile True:\n    with open(f'f{{i}}', 'wb') as f:\n        f.write(b'x' * 8 * 1024 ** 2)\n"
                                 "    i += 1\n"),
    "write to /tmp": "open({outside_tmp!r}, 'w').write('pwned')\nprint(42)\n",
    "write to /dev/shm": "open('/dev/shm/gw-hostile-{tag}', 'w').write('pwned')\nprint(42)\n",
    "write into the repo": "open({outside_repo!r}, 'w').write('pwned')\nprint(42)\n",
    "delete a canary file": "import os\nos.remove({canary!r})\nprint(42)\n",
    "delete a canary tree": "import shutil\nshutil.rmtree({canary_dir!r})\nprint(42)\n",
    "read a 0600 secret file": "print(42 if 'secret' in open({secret_file!r}).read() else 0)\n",
    "read parent's env vars": "import os\nprint(42 if 'GW_TEST_SECRET' in os.environ or {secret!r} in str(os.environ) else 0)\n",
    "read parent's /proc/<ppid>/environ": "import os\nopen(f'/proc/{{os.getppid()}}/environ', 'rb').read()\nprint(42)\n",
    "read home directory": ("import os\nnames = set(os.listdir({home!r})) - {{{hidden_ok}}}\n"
                            "print(42 if names else 0)\n"),
    "connect to a local listener": ("import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                                    "s.sendall(b'pwned')\nprint(42)\n"),
    "connect to the internet": "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)\nprint(42)\n",
    "kill the parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nprint(42)\n",
    "kill the parent's group": "import os, signal\nos.killpg(os.getpgid(os.getppid()), signal.SIGKILL)\nprint(42)\n",
    "daemon (double fork + setsid)": ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                                      "        os.execv('/bin/sleep', ['sleep', '59.{tag_digits}'])\n    os._exit(0)\n"),
    "daemon (python, outlives the run)": ("import os, sys, time\nif os.fork() == 0:\n    os.setsid()\n"
                                          "    os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)  # {tag}'])\n"
                                          "time.sleep(0.2)\n"),
    "shell via subprocess": ("import subprocess\nsubprocess.Popen('sleep 58.{tag_digits} &', shell=True)\n"
                             "subprocess.run('echo pwned > {outside_tmp}', shell=True, check=True)\nprint(42)\n"),
    "print gigabytes": "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n",
    "print gigabytes to stderr": "import sys\nwhile True:\n    sys.stderr.write('x' * 65536)\n",
    "recursion bomb": "import sys\nsys.setrecursionlimit(10 ** 8)\ndef f(n):\n    return f(n + 1)\nf(0)\n",
    "ctypes segfault": "import ctypes\nctypes.string_at(0)\n",
    "os._exit(0) silently": "import os\nos._exit(0)\n",
    "exhaust file descriptors": "fs = []\nwhile True:\n    fs.append(open('/dev/null'))\n",
    "remount / read-write": ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                             "assert libc.mount(b'none', b'/', None, 32 | 4096, None) == 0\n"
                             "open({outside_tmp!r}, 'w').write('pwned')\nprint(42)\n"),
    "user namespace escape": ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                              "assert libc.unshare(0x10000000 | 0x00020000) == 0\n"
                              "assert libc.mount(b'none', b'/tmp', None, 32 | 4096, None) == 0\n"
                              "open({outside_tmp!r}, 'w').write('pwned')\nprint(42)\n"),
}

RESULTS: list[tuple[str, float | None, float]] = []


@pytest.fixture(scope="module")
def battery_report():
    yield RESULTS
    if RESULTS:
        width = max(len(name) for name, _, _ in RESULTS)
        lines = [f"\n{'program'.ljust(width)}  score  seconds"]
        lines += [f"{name.ljust(width)}  {s!s:5}  {t:7.2f}" for name, s, t in RESULTS]
        print("\n".join(lines))


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_program_is_contained(name, tmp_path, listener, monkeypatch, battery_report):
    if name == "read home directory" and os.stat(HOME).st_mode & 0o005:
        pytest.skip(f"{HOME} is readable by everyone here")
    monkeypatch.setenv("GW_TEST_SECRET", SECRET)
    canary_dir = tmp_path / "canary"
    canary_dir.mkdir()
    canary = canary_dir / "canary.txt"
    canary.write_text("still here")
    secret_file = tmp_path / "secret.txt"
    secret_file.write_text("secret")
    secret_file.chmod(0o600)
    hidden_ok = ", ".join(repr(p.split("/")[2]) for p in sum(sandbox_child._hidden_interpreter_paths().values(), [])
                          if p.startswith(HOME.rstrip("/") + "/"))
    code = HOSTILE[name].format(outside_tmp=str(OUTSIDE_TMP), outside_repo=str(OUTSIDE_REPO), canary=str(canary),
                                canary_dir=str(canary_dir), secret_file=str(secret_file), secret=SECRET,
                                home=HOME, hidden_ok=hidden_ok or "''", port=listener.port, tag=TAG,
                                tag_digits=TAG_DIGITS)
    dirs_before = _sandbox_dirs()
    ppid_check = os.getpid()

    start = time.monotonic()
    value = score(code, [{"input": "", "output": "42"}])
    elapsed = time.monotonic() - start
    RESULTS.append((name, value, elapsed))

    assert value == 0.0, f"{name}: the attack worked"
    assert elapsed < TIMEOUT + MARGIN, f"{name}: took {elapsed:.1f} s"
    time.sleep(0.05)
    assert _leftover_processes() == [], f"{name}: processes left running"
    assert not OUTSIDE_TMP.exists() and not OUTSIDE_REPO.exists()
    assert not Path(f"/dev/shm/gw-hostile-{TAG}").exists()
    assert canary.read_text() == "still here"
    assert _sandbox_dirs() - dirs_before == set(), "a working directory was left behind"
    assert listener.connections == []
    assert os.getpid() == ppid_check  # and we are still running


def test_secret_environment_is_not_visible(monkeypatch):
    monkeypatch.setenv("GW_TEST_SECRET", SECRET)
    result = sb.Sandbox(timeout_s=5, memory_mb=MEMORY).run(
        "import os\nprint(dict(os.environ))\nprint(open('/proc/self/environ').read())\n")
    assert result.ok and SECRET not in result.stdout and "GW_TEST_SECRET" not in result.stdout
    env = eval(result.stdout.splitlines()[0])  # noqa: S307 - our own output
    assert set(env) <= {"PATH", "LANG", "HOME", "PYTHONDONTWRITEBYTECODE", "PYTHONHASHSEED", "LC_CTYPE"}
    assert env["HOME"].startswith(tempfile.gettempdir())
