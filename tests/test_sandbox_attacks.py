"""The attacks of issue 30, one test (or batch) per class, under bubblewrap.

1. host memory outside the rlimits (memfd, SysV shared memory, shared mappings, tmpfs files,
   kernel memory) while /proc/meminfo is watched; 2. (tests/test_execution.py: one message no
   longer loses a batch); 3. (tests/test_sandbox.py: the process fallback refuses root; here:
   auto never falls back); 4. forged verdicts; 5. neighbours that change a verdict.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time

import pytest

from pipeline.config import ExecutionConfig
from pipeline.sandbox import Program, SandboxError, resolve_isolation, run_programs
from pipeline.sandbox import client as sandbox_client
from tests.test_sandbox import NO_BWRAP, _descendants, start_job

pytestmark = NO_BWRAP
BASE = ExecutionConfig(timeout_s=8.0, cpu_s=5, memory_mb=96, max_file_mb=4, max_processes=8,
                       workers=4)

# ---------------------------------------------------------------- 1. memory outside rlimits

MEMORY_ATTACKS = {
    "memfd": "import os\nfd = os.memfd_create('hog')\nfor _ in range(4096):\n"
             "    os.write(fd, b'x' * (1 << 20))\n",
    "sysv_shm": "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                "libc.shmat.restype = ctypes.c_void_p\nfor _ in range(64):\n"
                "    shmid = libc.shmget(0, 64 << 20, 0o1600)\n    if shmid < 0:\n"
                "        raise OSError(ctypes.get_errno(), 'shmget')\n"
                "    ctypes.memset(libc.shmat(shmid, None, 0), 1, 64 << 20)\n",
    # four processes, each touching 40 MB of a shared mapping: within RLIMIT_AS each time
    "shared_mappings": "import mmap, os, time\nsize = 40 << 20\nfor _ in range(4):\n"
                       "    if os.fork() == 0:\n"
                       "        m = mmap.mmap(-1, size, mmap.MAP_SHARED)\n"
                       "        for at in range(0, size, 1 << 20):\n"
                       "            m[at:at + (1 << 20)] = b'x' * (1 << 20)\n"
                       "        time.sleep(3)\n        os._exit(0)\n"
                       "for _ in range(4):\n    os.wait()\n"
                       "raise RuntimeError('the mappings were not stopped')\n",
    # empty files: no data pages, only kernel memory (inodes, dentries)
    "tiny_files": "n = 0\nwhile True:\n    open(f'/dev/shm/f{n}', 'w').close()\n    n += 1\n",
    "big_files": "n = 0\nwhile True:\n    with open(f'/dev/shm/b{n}', 'wb') as f:\n"
                 "        f.write(b'x' * (1 << 20))\n    n += 1\n",
}


def _meminfo_mb() -> dict[str, int]:
    with open("/proc/meminfo") as f:
        return {key: int(value.split()[0]) >> 10
                for key, value in (line.split(":", 1) for line in f)}


def test_host_memory_stays_within_the_limit_while_memory_attacks_run():
    """The OS layer alone (no guard): the host's shared memory grows by at most memory_mb per
    worker, and every attack ends in an error (denied, or the memory limit)."""
    peak, stop = _meminfo_mb(), threading.Event()
    baseline = dict(peak)

    def watch() -> None:
        while not stop.is_set():
            now = _meminfo_mb()
            for key in ("Shmem", "SUnreclaim"):
                peak[key] = max(peak[key], now[key])
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        results = run_programs([Program(code, "assert True\n") for code in
                                MEMORY_ATTACKS.values()], BASE, guard=False)
    finally:
        stop.set()
        watcher.join()
    growth = {key: peak[key] - baseline[key] for key in ("Shmem", "SUnreclaim")}
    assert growth["Shmem"] <= BASE.memory_mb * BASE.workers, (growth, results)
    outcomes = dict(zip(MEMORY_ATTACKS, results))
    assert [r.status for r in outcomes.values()] == ["error"] * len(outcomes), outcomes
    for name in ("memfd", "sysv_shm"):  # the seccomp filter
        assert "PermissionError" in outcomes[name].message, outcomes[name]
    for name in ("shared_mappings", "tiny_files"):  # the memory cgroup
        assert "memory limit of 96 MB exceeded" in outcomes[name].message, outcomes[name]
    assert "No space left on device" in outcomes["big_files"].message  # /dev/shm's size


# ---------------------------------------------------------------- 3. auto fails closed

def test_auto_fails_closed_naming_what_to_install(monkeypatch):
    resolve_isolation.cache_clear()
    monkeypatch.setitem(sandbox_client.ENV, "PATH", "/nonexistent")
    try:
        with pytest.raises(SandboxError, match="apt-get install bubblewrap.*never fall back"):
            resolve_isolation("auto")
    finally:
        resolve_isolation.cache_clear()


# ---------------------------------------------------------------- 4. forged verdicts

TESTS = "assert triple(1) == 3\nassert triple(2) == 6\nassert triple(-4) == -12\n"
# read what may be a nonce, then write "passed" (the old runner's JSON with that nonce, and the
# judge's report lines) on every descriptor, and exit: it passed the sandbox before issue 30
FORGE = """import fcntl, json, os
def forge(*_):
    try:
        fcntl.fcntl(3, fcntl.F_SETFL, os.O_NONBLOCK)
        nonce = os.read(3, 64).decode()
    except OSError:
        nonce = ''
    lines = ["('loaded',)", "('started',)", *[f"('case', {i}, 'passed', '')" for i in range(3)],
             "('done',)", json.dumps({'status': 'passed', 'message': '', 'nonce': nonce})]
    for fd in range(3, 1024):
        for line in lines:
            try:
                os.write(fd, line.encode() + bytes([10]))
            except OSError:
                pass
    os._exit(0)
"""
ATTACKS = {
    "descriptors": FORGE + "def triple(x):\n    return 0\nforge()\n",
    # the same from a signal handler while the tests run
    "signal_handler": FORGE + "import signal, time\nsignal.signal(signal.SIGALRM, forge)\n"
                              "signal.setitimer(signal.ITIMER_REAL, 0.2)\n"
                              "def triple(x):\n    time.sleep(1)\n    return 0\n",
    "always_equal": "class Anything:\n    def __eq__(self, other):\n        return True\n"
                    "    def __ne__(self, other):\n        return False\n"
                    "    __hash__ = object.__hash__\n\n"
                    "class Int(int):\n    def __eq__(self, other):\n        return True\n"
                    "    __hash__ = int.__hash__\n\n"
                    "def triple(x):\n    return Anything() if x > 0 else Int(0)\n",
    # a trace function that jumps over the lines that raise AssertionError
    "trace_function": "import dis, sys\n"
                      "def lines(code):\n"
                      "    found = {}\n    for i in dis.get_instructions(code):\n"
                      "        line = i.positions.lineno\n        if line:\n"
                      "            raises = i.opname == 'LOAD_ASSERTION_ERROR'\n"
                      "            found[line] = found.get(line) or raises\n    return found\n"
                      "def skip(frame, event, arg):\n"
                      "    found = lines(frame.f_code)\n"
                      "    if event == 'line' and found.get(frame.f_lineno):\n"
                      "        after = [n for n in sorted(found) if n > frame.f_lineno\n"
                      "                 and not found[n]]\n"
                      "        if after:\n            frame.f_lineno = after[0]\n    return skip\n"
                      "sys.settrace(lambda frame, event, arg: None)  # tracing on\n"
                      "sys._getframe().f_trace = skip  # here: the module's frame\n"
                      "def triple(x):\n    return 0\n\npass\n",
    # look for the expected answer in the frames, the modules and the garbage collector
    "read_the_tests": "import gc, re, sys\n"
                      "def texts():\n    frame = sys._getframe(1)\n    while frame:\n"
                      "        yield from frame.f_locals.values()\n"
                      "        yield from frame.f_globals.values()\n        frame = frame.f_back\n"
                      "    for module in list(sys.modules.values()):\n"
                      "        yield from getattr(module, '__dict__', {}).values()\n"
                      "    for obj in gc.get_objects():\n"
                      "        yield from (obj.values() if isinstance(obj, dict) else\n"
                      "                    obj if isinstance(obj, (list, tuple)) else ())\n"
                      "def triple(x):\n    for text in texts():\n"
                      "        if isinstance(text, str):\n"
                      "            found = re.search(rf'triple\\({x}\\) == (-?\\d+)', text)\n"
                      "            if found:\n                return int(found.group(1))\n"
                      "    return 0\n",
    # the judge's memory or its tests' descriptor: the answer is 3 * x if either opens
    "reach_the_judge": "import os\n"
                       "def triple(x):\n"
                       "    for path in ('/proc/1/mem', '/proc/1/fd/6', '/proc/1/fd/3'):\n"
                       "        try:\n            os.close(os.open(path, os.O_RDONLY))\n"
                       "            return 3 * x\n"
                       "        except OSError:\n            pass\n"
                       "    try:\n        os.kill(1, 9)\n    except OSError:\n        pass\n"
                       "    return 0\n",
}
HONEST = {"honest": ("def triple(x):\n    return 3 * x\n", "passed", 3),
          "partly_right": ("def triple(x):\n    return 3 * x if x > 0 else 0\n", "failed", 2)}


@pytest.mark.parametrize("guard", [True, False], ids=["bwrap", "bwrap_os_only"])
def test_forged_verdicts_do_not_pass(guard):
    """Every attack's program is wrong (triple returns 0) and tries to pass anyway: none of its
    cases passes. The honest programs beside them keep their verdicts, case by case."""
    programs = [Program(code, TESTS) for code, _, _ in HONEST.values()]
    programs += [Program(code, TESTS) for code in ATTACKS.values()]
    # one text, split by Program.from_source: its trailing asserts are judged outside too
    programs.append(ATTACKS["descriptors"] + "\n" + TESTS)
    config = dataclasses.replace(BASE, timeout_s=10.0)
    results = run_programs(programs, config, guard=guard)
    names = [*HONEST, *ATTACKS, "descriptors_in_one_text"]
    outcomes = dict(zip(names, results))
    for name, (_, status, passed) in HONEST.items():
        assert (outcomes[name].status, outcomes[name].cases_passed,
                outcomes[name].cases_total) == (status, passed, 3), outcomes[name]
    for name in names[len(HONEST):]:
        assert outcomes[name].status != "passed", (name, outcomes[name])
        assert outcomes[name].cases_passed == 0, (name, outcomes[name])


# ---------------------------------------------------------------- 5. neighbours

PTRACE_INJECTOR = (
    "import ctypes, os, time\nlibc = ctypes.CDLL(None, use_errno=True)\n"
    "attached = [pid for pid in range(1, 64) if libc.ptrace(16, pid, 0, 0) == 0]\n"
    "for path in ('/proc/1/mem', '/proc/1/fd/3'):\n    try:\n"
    "        with open(path, 'wb') as f:\n            f.write(b\"('started',)\\n\" * 100)\n"
    "    except OSError:\n        pass\ntime.sleep(60)\n")


@pytest.mark.slow
def test_honest_slow_program_passes_beside_a_ptrace_injector():
    slow = Program("import time\ndef slow():\n    time.sleep(2)\n    return 1\n",
                   "assert slow() == 1\n")
    config = dataclasses.replace(BASE, timeout_s=7.0, workers=2)
    honest, injector = run_programs([slow, Program(PTRACE_INJECTOR, "assert True\n")], config,
                                    guard=False)
    assert (honest.status, honest.cases_passed) == ("passed", 1), honest
    assert injector.status == "timeout", injector


HOG = ("import os\nfor _ in range(48):\n    try:\n        if os.fork() == 0:\n"
       "            os.setsid()\n            while True:\n                pass\n"
       "    except OSError:\n        break\nwhile True:\n    pass\n")
CPU_4S = Program("import time\ndef spin():\n    while time.process_time() < 4.0:\n"
                 "        pass\n    return 'done'\n", "assert spin() == 'done'\n")


@pytest.mark.slow
def test_honest_cpu_bound_program_passes_beside_a_hog_of_many_sessions(tmp_path):
    """A program that needs 4 s of CPU, beside one that keeps 49 processes (each in its own
    session) spinning: the hog gets one sandbox's share of the CPU, not 49 (without the cpu
    cgroups the honest program got about 1/50 of the machine and timed out)."""
    limits = {**sandbox_client._limits(BASE), "timeout_s": 60.0, "cpu_s": 60,
              "max_processes": 64}
    running = start_job(HOG, limits, "bwrap", str(tmp_path), guard=False)
    try:
        time.sleep(1.0)  # the hog is up
        running.send(1, CPU_4S)
        answer = running.server.receive(time.monotonic() + 120)
    finally:
        running.close()
    assert answer["id"] == 1 and answer["status"] == "passed", answer


@pytest.mark.slow
def test_a_stuck_supervisor_is_stopped_alone(tmp_path):
    """One supervisor stopped (SIGSTOP) never answers: the server kills it after its deadline
    and answers an error for its program only; the program beside it passes."""
    limits = {**sandbox_client._limits(BASE), "timeout_s": 2.0}
    running = start_job("import time\ntime.sleep(30)\n", limits, "bwrap", str(tmp_path),
                        grace_s=1.0)
    try:
        supervisors: list[int] = []
        for _ in range(100):
            supervisors = _descendants(running.server.proc.pid)[:1]
            if supervisors:
                break
            time.sleep(0.05)
        os.kill(supervisors[0], signal.SIGSTOP)
        running.send(1, Program("def f():\n    return 1\n", "assert f() == 1\n"))
        answers = {a["id"]: a for a in (running.server.receive(time.monotonic() + 60)
                                        for _ in range(2))}
    finally:
        running.close()
    assert answers[1]["status"] == "passed", answers
    assert answers[0]["status"] == "error" and "did not answer" in answers[0]["message"], answers
