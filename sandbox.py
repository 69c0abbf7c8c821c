"""Run model-written code against its tests without trusting it (issue 8 §3; SPEC §7: MBPP and
HumanEval pass@1).

Threat model: the code is hostile until proven otherwise, and these machines run everything as root.
It may loop forever, fork-bomb, allocate or print without end, write or delete files anywhere, read
the evaluator's secrets (its environment, also through /proc/<pid>/environ), open sockets (also to a
listener on this machine's loopback), or kill its parent (os.kill(os.getppid()), `kill -9 -1`).
Every such program must come back as a failure within its time budget, change nothing outside its
directory, leave no process behind, and let the evaluation go on to the next problem.

Layers, in the order a run meets them:
1. A separate process: `python -I -S -c BOOTSTRAP`, in a new session (its own process group), with
   a scrubbed environment (PATH, LANG, HOME, TMPDIR only), no inherited file descriptors, the program
   on stdin and stdin then replaced by /dev/null.
2. While the bootstrap is still root it imports the stdlib modules such code uses (PREIMPORT): the
   interpreter lives in /root (mode 700) and cannot be read once privileges are dropped. Anything else
   fails to import, which is a failure of that program, not of the sandbox.
3. Namespaces (unshare): a network namespace with only a downed loopback, so no connection reaches
   any listener, this machine's loopback included; a mount namespace (made private first, so nothing
   propagates back) in which every world-writable directory (/tmp, /var/tmp, /dev/shm, /run/lock) is
   replaced by an empty root-owned tmpfs and the working directory is a fresh size-capped tmpfs owned
   by the sandbox user; a PID namespace, so the code sees no outside process (a fresh /proc), cannot
   address its parent, and when its first process dies the kernel kills and reaps everything it forked.
4. rlimits: CPU seconds, address space (MEMORY_MB), processes (NPROC), file size (FSIZE_MB), open
   files, no core dumps.
5. Privileges dropped to a uid of its own (UID_BASE + slot, a slot per concurrent run, taken with an
   flock so that parallel runs, even from other processes, never share one): RLIMIT_NPROC binds,
   files outside the working directory are read-only or unreadable, root processes (the evaluator)
   cannot be signalled, /proc/<pid>/environ of other users is unreadable; no_new_privs (no setuid
   binaries); parent-death signal so that the code dies with the bootstrap.
6. The parent reads stdout/stderr through pipes up to OUTPUT_CAP bytes in all (more kills the run),
   kills the process group at the wall-clock timeout, then sweeps the uid: `kill -9 -1` run as that
   uid kills every process it still owns (a grandchild that called setsid() included), and a /proc
   scan confirms none is left. The working directory is removed afterwards.

A program passes when `setup + code + tests` ran to its end and exited 0: the bootstrap reports
completion on a separate pipe, so sys.exit(0) or os._exit(0) before the tests ran is a failure (a
program that forges that report on purpose could fake a pass: pass@1 is a measurement, the layers
above are the security boundary).

Degraded platforms: without root there is no uid to drop to; the bootstrap then tries a user
namespace to get the others. If the network cannot be isolated the run is refused unless the caller
passes allow_network=True; any other missing layer is named in `detail` ("passed (degraded: ...)").
Not covered: the total memory of a fork+memory bomb is NPROC * MEMORY_MB (no cgroups here);
world-writable places other than those listed are writable when they exist.
"""
import fcntl
import json
import math
import os
import pwd
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager

from tqdm import tqdm

UID_BASE, UID_SLOTS = 60000, 256     # sandbox uids: no passwd entry needed, below nobody (65534)
LOCK_DIR = "/run/softsrv-sandbox" if os.path.isdir("/run") else "/tmp/softsrv-sandbox-uids"
MEMORY_MB, NPROC, FSIZE_MB, NOFILE, WORKDIR_MB = 512, 16, 16, 64, 64
OUTPUT_CAP = 64 * 1024               # bytes of stdout + stderr kept; more kills the run
WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
PREIMPORT = ("math", "cmath", "re", "string", "collections", "collections.abc", "itertools",
             "functools", "operator", "heapq", "bisect", "array", "copy", "typing", "random",
             "statistics", "fractions", "decimal", "numbers", "datetime", "time", "calendar", "json",
             "hashlib", "struct", "textwrap", "unicodedata", "dataclasses", "enum", "abc", "io",
             "contextlib", "pprint", "socket", "encodings.idna", "traceback", "linecache")
_KILL = shutil.which("kill")

# Runs as root in the child until it drops privileges. Reports on fd `marker`: "note: <missing
# layer>", "refused: <why>", and "ok" once the program has run to its end.
_BOOTSTRAP = r'''
import ctypes, json, os, resource, signal, sys, types
cfg = json.loads(sys.argv[1])
src = sys.stdin.buffer.read().decode("utf-8", "replace")
fd = os.open("/dev/null", os.O_RDONLY); os.dup2(fd, 0); os.close(fd)
marker = cfg["marker"]
def report(line): os.write(marker, (line + "\n").encode())
for m in cfg["preimport"]:
    try: __import__(m)
    except Exception: pass
import linecache, traceback
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
def mount(src, dst, fs, flags, data):
    return libc.mount(src and src.encode(), dst.encode(), fs and fs.encode(), flags, data and data.encode()) == 0
uid, work = cfg["uid"], cfg["work"]
libc.prctl(1, signal.SIGKILL, 0, 0, 0)   # PR_SET_PDEATHSIG: if the evaluator dies, so does this run
if os.getppid() != cfg["parent"]:
    os._exit(1)
if os.geteuid() != 0:   # no root: a user namespace may still grant the namespaces below
    ids = os.geteuid(), os.getegid()
    try:
        assert libc.unshare(0x10000000) == 0
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {ids[0]} 1"), ("gid_map", f"0 {ids[1]} 1")):
            with open(f"/proc/self/{name}", "w") as f: f.write(text)
    except (AssertionError, OSError):
        report("note: no user namespace")
missing = [name for flag, name in ((0x40000000, "network"), (0x00020000, "mount"), (0x20000000, "pid"))
           if libc.unshare(flag) != 0]
if "network" in missing and not cfg["allow_network"]:
    report("refused: cannot isolate the network (no network namespace); allow_network=True runs anyway")
    os._exit(3)
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
if "pid" not in missing:   # the next child is pid 1 of the new namespace; this root half only waits
    child = os.fork()
    if child:
        status = os.waitpid(child, 0)[1]
        code = os.waitstatus_to_exitcode(status)
        if code < 0:
            signal.signal(-code, signal.SIG_DFL); os.kill(os.getpid(), -code)
        os._exit(code if code >= 0 else 1)
if "mount" not in missing and mount(None, "/", None, 16384 | 262144, None):   # MS_REC|MS_PRIVATE
    for d in cfg["writable_dirs"]:
        if os.path.isdir(d) and os.stat(d).st_mode & 0o002:
            if not mount("tmpfs", d, "tmpfs", 2 | 4 | 8, "size=64k,mode=0755"):   # nosuid,nodev,noexec
                report(f"note: {d} writable")
    if "pid" not in missing and not mount("proc", "/proc", "proc", 2 | 4 | 8, None):
        report("note: outer /proc visible")
    os.makedirs(work, exist_ok=True)
    owner = f",uid={uid},gid={uid}" if uid is not None else ""
    if not mount("tmpfs", work, "tmpfs", 2 | 4, f"size={cfg['workdir_mb']}m,mode=0700{owner}"):
        report("note: working directory not size-capped")
elif "mount" not in missing:
    missing.append("mount")
for name in missing:
    report(f"note: no {name} namespace")
os.chdir(work)
cpu = cfg["cpu_s"]
for res, value in ((resource.RLIMIT_CPU, (cpu, cpu + 1)), (resource.RLIMIT_AS, (cfg["memory"],) * 2),
                   (resource.RLIMIT_NPROC, (cfg["nproc"],) * 2), (resource.RLIMIT_FSIZE, (cfg["fsize"],) * 2),
                   (resource.RLIMIT_NOFILE, (cfg["nofile"],) * 2)):
    resource.setrlimit(res, value)
libc.prctl(38, 1, 0, 0, 0)   # PR_SET_NO_NEW_PRIVS: setuid binaries cannot give root back
if uid is not None:
    os.setgroups([]); os.setresgid(uid, uid, uid); os.setresuid(uid, uid, uid)
libc.prctl(1, signal.SIGKILL, 0, 0, 0)   # again: setresuid cleared it
mod = types.ModuleType("__sandbox__")   # not __main__: `if __name__ == "__main__"` blocks stay off
sys.modules["__sandbox__"] = mod
linecache.cache["<sandbox>"] = (len(src), None, src.splitlines(True), "<sandbox>")
try:
    exec(compile(src, "<sandbox>", "exec"), mod.__dict__)
except MemoryError:   # report without allocating: the program's objects may still hold the limit
    os.write(2, b"MemoryError: memory limit\n"); os._exit(1)
except SystemExit as e:
    os.write(2, f"SystemExit({e.code!r}) before the tests finished\n".encode()); os._exit(1)
except BaseException:
    traceback.print_exc(); sys.stderr.flush(); os._exit(1)
sys.stdout.flush()
report("ok")
os._exit(0)
'''

_SIGNALS = {signal.SIGXCPU: "killed: CPU time limit", signal.SIGXFSZ: "killed: file size limit",
            signal.SIGKILL: "killed (SIGKILL)", signal.SIGSEGV: "crashed: SIGSEGV (memory limit?)"}


def _pids_of(uid: int) -> list[int]:
    """Live processes (not zombies) with `uid` among their real/effective/saved/fs uids."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                fields = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
        except (OSError, ValueError):
            continue
        if str(uid) in fields.get("Uid", "").split() and not fields.get("State", "").strip().startswith("Z"):
            pids.append(int(name))
    return pids


def _sweep(uid: int | None) -> None:
    """Kill every process of the sandbox uid: `kill -9 -1` as that uid reaches them all at once,
    however they forked or setsid()'d; the /proc scan confirms."""
    if uid is None:
        return
    for _ in range(100):
        pids = _pids_of(uid)
        if not pids:
            return
        if _KILL:
            subprocess.run([_KILL, "-9", "-1"], user=uid, group=uid, extra_groups=[], env={},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)


@contextmanager
def _uid_slot():
    """A sandbox uid no other run holds, even in another process (flock on a root-only lock file)."""
    if os.geteuid() != 0:
        yield None
        return
    os.makedirs(LOCK_DIR, mode=0o700, exist_ok=True)
    st = os.lstat(LOCK_DIR)
    if st.st_uid != 0 or st.st_mode & 0o077:
        raise RuntimeError(f"{LOCK_DIR}: must be a directory owned by root with mode 700")
    for uid in range(UID_BASE, UID_BASE + UID_SLOTS):
        try:   # a uid some real account uses is not ours to sweep
            pwd.getpwuid(uid)
            continue
        except KeyError:
            pass
        fd = os.open(os.path.join(LOCK_DIR, str(uid)), os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            _sweep(uid)   # what a run that crashed before its own sweep left
            yield uid
        finally:
            os.close(fd)
        return
    raise RuntimeError(f"all {UID_SLOTS} sandbox uids from {UID_BASE} are in use")


def _describe(stderr: bytes, limit: int = 300) -> str:
    """The exception line of a traceback, with the program line that raised it."""
    lines = [l for l in stderr.decode("utf-8", "replace").splitlines() if l.strip()]
    if not lines:
        return ""
    detail = lines[-1].strip()
    where = [i for i, l in enumerate(lines) if l.startswith('  File "<sandbox>"')]
    if where and where[-1] + 1 < len(lines) and lines[where[-1] + 1].startswith("    "):
        line_no = re.search(r"line (\d+)", lines[where[-1]]).group(1)
        detail += f" (line {line_no}: {lines[where[-1] + 1].strip()})"
    return detail[:limit]


def _run(program: str, uid: int | None, work: str, timeout_s: float, allow_network: bool) -> tuple[bool, str]:
    marker_r, marker_w = os.pipe()
    cfg = dict(uid=uid, work=work, marker=marker_w, parent=os.getpid(), allow_network=allow_network, preimport=PREIMPORT,
               writable_dirs=WRITABLE_DIRS, cpu_s=math.ceil(timeout_s) + 1, memory=MEMORY_MB << 20,
               nproc=NPROC, fsize=FSIZE_MB << 20, nofile=NOFILE, workdir_mb=WORKDIR_MB)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work, "TMPDIR": work}
    try:
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _BOOTSTRAP, json.dumps(cfg)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                pass_fds=(marker_w,), env=env, cwd="/", start_new_session=True)
    except BaseException:
        os.close(marker_r)
        raise
    finally:
        os.close(marker_w)
    deadline = time.monotonic() + timeout_s
    fo, fe = proc.stdout.fileno(), proc.stderr.fileno()
    out = {fo: bytearray(), fe: bytearray(), marker_r: bytearray()}
    reason = None
    try:
        try:
            proc.stdin.write(program.encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass
        with selectors.DefaultSelector() as sel:
            for fd in out:
                sel.register(fd, selectors.EVENT_READ)
            while sel.get_map() and reason is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    reason = f"timeout after {float(timeout_s)}s"
                    break
                exited = proc.poll() is not None   # then drain what is buffered, never wait on grandchildren
                ready = sel.select(0 if exited else min(left, 0.05))
                for key, _ in ready:
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        sel.unregister(key.fd)
                    out[key.fd] += chunk
                    if sum(map(len, out.values())) > OUTPUT_CAP:
                        reason = f"output over cap ({OUTPUT_CAP} bytes)"
                if exited and not ready:
                    break
    finally:
        try:   # the leader is not reaped yet, so its pid (the group id) cannot have been reused
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        os.close(marker_r)
        _sweep(uid)
    reports = out[marker_r].decode("utf-8", "replace").splitlines()
    notes = [r[len("note: "):] for r in reports if r.startswith("note: ")]
    refused = [r for r in reports if r.startswith("refused: ")]
    if reason:
        return False, reason
    if refused:
        return False, refused[0]
    if "ok" in reports and proc.returncode == 0:
        return True, "passed" + (f" (degraded: {'; '.join(notes)})" if notes else "")
    if proc.returncode < 0:
        sig = -proc.returncode
        return False, _SIGNALS.get(sig, f"killed by signal {sig}") + (f": {_describe(out[fe])}" if out[fe] else "")
    return False, _describe(out[fe]) or f"exit status {proc.returncode} before the tests finished"


def run_tests(code: str, tests: list[str] | str, timeout_s: float = 10.0, setup: str = "",
              allow_network: bool = False) -> tuple[bool, str]:
    """Run `setup + code + tests` in the sandbox. `tests` is a list of assert lines (MBPP's
    test_list) or a whole test script (HumanEval's test + check(entry_point)). Returns (passed,
    detail): passed = it ran to its end and exited 0 within the limits; detail = "passed" or the
    reason it did not ("timeout after 10.0s", "AssertionError (line 7: assert f(2) == 4)", ...)."""
    tests = tests if isinstance(tests, str) else "\n".join(tests)
    program = "\n".join(part.rstrip("\n") for part in (setup, code, tests) if part.strip()) + "\n"
    with _uid_slot() as uid:
        work = tempfile.mkdtemp(prefix="softsrv-sandbox-")
        try:
            if uid is not None:
                os.chown(work, uid, uid)
            return _run(program, uid, work, timeout_s, allow_network)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def run_tests_many(jobs: list[tuple[str, list[str] | str]], timeout_s: float = 10.0,
                   workers: int | None = None, progress: bool = False,
                   setup: str | list[str] = "") -> list[tuple[bool, str]]:
    """run_tests on many (code, tests) pairs in parallel, up to os.cpu_count() at once; results in
    input order. `setup` is one string for all jobs or one per job."""
    setups = setup if isinstance(setup, list) else [setup] * len(jobs)
    if len(setups) != len(jobs):
        raise ValueError(f"setup: {len(setups)} strings for {len(jobs)} jobs")
    results: list[tuple[bool, str]] = [(False, "not run")] * len(jobs)
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        futures = {pool.submit(run_tests, code, tests, timeout_s, s): i
                   for i, ((code, tests), s) in enumerate(zip(jobs, setups))}
        for future in tqdm(as_completed(futures), total=len(futures), disable=not progress, desc="sandbox"):
            results[futures[future]] = future.result()
    return results
