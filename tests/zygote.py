"""A Python that has already imported torch, diffusers and para-fx: the scripts tier's processes
(tests/scripts.py) are forked from it instead of starting Python and importing them again.

Each script's process, and every process it starts with ``sys.executable`` (torchrun's workers,
the ranks of ``torch.multiprocessing.spawn``, multiprocessing's resource tracker), spent about
7 s of CPU importing torch, diffusers and para-fx on the 2-core machine: 18 such processes were
most of the tier's CPU. Here one server per environment imports them once (``serve``); the
scripts run ``shim``, a small executable that stands for Python: it sends its command line, its
environment, its working folder and its open file descriptors (stdin, stdout, stderr, and the
pipes multiprocessing passes) to the server, which forks a process that takes them over and runs
the command as Python runs it (a file as ``__main__``, ``-m`` through runpy, ``-c``), and
returns its exit status (or dies by the same signal). In that process ``sys.executable`` is the
shim again, so that what the script starts is forked from the server too.

What a fresh Python would differ in is kept: what the imports printed (warnings, logs) is printed
again at the start of every forked process, on the same stream (tests/test_quiet.py reads the
demo's warnings); a command whose environment differs from the server's in anything read at
import (anything but the rank variables that torchrun and process groups set, ``RUNTIME``), or
that asks for an interpreter option this does not reproduce, runs in a real Python (``exec``),
as it did before. Killing the shim (a script's timeout kills its whole session) kills the forked
process and all it started; the server was started with no thread running, and forks nothing
but from its one thread.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys

# Variables that may differ between the server's environment and a command's: set by torchrun for
# its workers and read when a process group or the launcher's agent starts, never at import,
RUNTIME = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
           "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_",
           "TORCH_NCCL_", "NCCL_", "CUDA_DEVICE_ORDER", "TORCH_DISTRIBUTED_",
           # and by pytest, in its own environment, while the scripts run (a script given None runs in it)
           "PYTEST_CURRENT_TEST", "LINES", "COLUMNS")
CONNECT_TIMEOUT = 600  # s a shim waits for its server to listen (it imports for about 10 s)


def _send(sock: socket.socket, obj, fds=()) -> None:
    data = json.dumps(obj).encode()
    socket.send_fds(sock, [struct.pack("!I", len(data)) + data], list(fds))


def _receive(sock: socket.socket, max_fds: int = 0):
    data, fds, _, _ = socket.recv_fds(sock, 1 << 16, max_fds)
    if not data:
        return None, fds
    (size,) = struct.unpack("!I", data[:4])
    data = data[4:]
    while len(data) < size:
        more = sock.recv(size - len(data))
        if not more:
            return None, fds
        data += more
    return json.loads(data), fds


# --- the shim: the process a script starts as Python -----------------------------------------------


SHIM = """#!{python} -SEs
import sys
sys.path.insert(0, {here!r})
import zygote
zygote.client({socket!r})
"""


def write_shim(path: str, socket_path: str) -> str:
    """An executable at ``path`` that runs commands in the server listening at ``socket_path``."""
    with open(path, "w") as f:
        f.write(SHIM.format(python=sys.executable, here=os.path.dirname(os.path.abspath(__file__)), socket=socket_path))
    os.chmod(path, 0o755)
    return path


def client(socket_path: str) -> None:
    import signal
    import time

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while True:
        try:
            sock.connect(socket_path)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                sys.stderr.write(f"zygote: no server at {socket_path}\n")
                os._exit(255)
            time.sleep(0.05)
    listed = [int(n) for n in os.listdir("/proc/self/fd")]
    fds = []
    for fd in sorted(listed):
        if fd == sock.fileno():
            continue
        try:
            os.fstat(fd)
        except OSError:  # the listing's own descriptor, closed since
            continue
        fds.append(fd)
    _send(sock, dict(argv=sys.argv, env=dict(os.environ), cwd=os.getcwd(), fds=fds), fds)
    for fd in fds:
        if fd > 2:  # the forked process holds them now: a pipe's end closes when it exits
            os.close(fd)
    message, _ = _receive(sock)
    if message is None:
        sys.stderr.write("zygote: the server closed the connection\n")
        os._exit(255)
    pid = message["pid"]

    def forward(signum, frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, forward)
    message, _ = _receive(sock)
    if message is None:
        sys.stderr.write("zygote: the server closed the connection before the exit status\n")
        os._exit(255)
    if "signal" in message:
        signal.signal(message["signal"], signal.SIG_DFL)
        os.kill(os.getpid(), message["signal"])
        os._exit(128 + message["signal"])
    os._exit(message["exit"])


# --- the server ---------------------------------------------------------------------------------------


def serve(socket_path: str, shim: str, preload: list[str]) -> None:
    """Import ``preload`` (Python statements), then fork a process per connection. What the imports
    printed on stdout and stderr is printed again by every forked process, at its start."""
    import gc
    import signal

    here = os.path.dirname(os.path.abspath(__file__))
    real_python = sys.executable
    sys.executable = shim  # before multiprocessing reads it: what the scripts start comes here too
    environment = dict(os.environ)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path + ".tmp")
    listener.listen(64)
    for statement in preload:
        exec(statement, {})
    sys.stdout.flush()
    sys.stderr.flush()
    printed = []
    for fd in (1, 2):  # started with stdout and stderr in files: what the imports printed
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        printed.append(b"".join(chunks))
    base_path = [p for i, p in enumerate(sys.path) if not (i == 0 and p == here)]
    imported = {k: v for k, v in os.environ.items() if environment.get(k) != v}  # what the imports set
    gc.collect()
    gc.freeze()  # what the imports made: never scanned again, and not written to by the collector
    # A Python thread running now would leave its locks held in every fork: then every command runs
    # in a real Python instead. (numpy's OpenBLAS starts an idle thread pool where OMP_NUM_THREADS
    # is not 1; OpenBLAS stops it before a fork and starts it again when needed, as the ranks' fork
    # server of tests/ranks.py relies on.)
    import threading

    threads = threading.active_count()
    if threads != 1:
        sys.stderr.write(f"zygote: {threads} Python threads after the imports; commands run in a fresh Python\n")
    os.rename(socket_path + ".tmp", socket_path)  # ready: the shims connect from now on

    children = set()

    def stop(signum, frame):  # reap every monitor, so that their CPU time counts in this process's
        for pid in list(children):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    while True:
        conn, _ = listener.accept()
        for pid in list(children):
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    children.discard(pid)
            except ChildProcessError:
                children.discard(pid)
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            listener.close()
            _monitor(conn, environment, imported, real_python, base_path, printed, fresh=threads != 1)
        children.add(pid)
        conn.close()


def _monitor(conn: socket.socket, environment: dict, imported: dict, real_python: str, base_path: list, printed: list, fresh: bool) -> None:
    """Fork the command's process, tell the shim its pid, wait for it and send its status; kill it
    with all it started if the shim goes away."""
    import select

    try:
        request, fds = _receive(conn, max_fds=250)
        if request is None:
            os._exit(0)
        pid = os.fork()
        if pid == 0:
            _worker(conn, request, fds, environment, imported, real_python, base_path, printed, fresh)
        for fd in fds:
            os.close(fd)
        _send(conn, dict(pid=pid))
        pidfd = os.pidfd_open(pid)
        while True:
            ready, _, _ = select.select([conn, pidfd], [], [])
            if pidfd in ready:
                _, status = os.waitpid(pid, 0)
                if os.WIFSIGNALED(status):
                    _send(conn, dict(signal=os.WTERMSIG(status)))
                else:
                    _send(conn, dict(exit=os.WEXITSTATUS(status)))
                break
            if not conn.recv(1):  # the shim died (killed with its session): so do the command and its children
                try:
                    os.killpg(pid, 9)
                except ProcessLookupError:
                    pass
                os.waitpid(pid, 0)
                break
    finally:
        os._exit(0)


def _options(argv: list[str]):
    """Python's command line: (unbuffered, warning options, mode, target, arguments), or None for an
    option reproduced only by a real Python."""
    unbuffered, warnings_options, i = False, [], 1
    while i < len(argv):
        arg = argv[i]
        if arg == "-u":
            unbuffered = True
        elif arg == "-B":  # multiprocessing passes it on where PYTHONDONTWRITEBYTECODE is set
            sys.dont_write_bytecode = True
        elif arg.startswith("-W"):
            if arg == "-W":
                i += 1
                warnings_options.append(argv[i])
            else:
                warnings_options.append(arg[2:])
        elif arg in ("-c", "-m"):
            return unbuffered, warnings_options, arg, argv[i + 1], argv[i + 2:]
        elif arg.startswith("-"):
            return None
        else:
            return unbuffered, warnings_options, "file", arg, argv[i + 1:]
        i += 1
    return None


def _worker(conn, request, fds, environment, imported, real_python, base_path, printed, fresh) -> None:
    import ctypes
    import fcntl

    code = 1
    try:
        os.setsid()  # a group of its own: the monitor kills it with all it started
        ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG: SIGKILL when the monitor dies
        conn.close()
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 1000) for fd in fds]
        for fd in fds:
            os.close(fd)
        for fd, target in zip(high, request["fds"]):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        env, argv = request["env"], request["argv"]
        options = _options(argv)
        after_imports = {**environment, **imported}  # a process forked from here passes on what the imports set
        differs = [k for k in set(env) | set(environment) | set(imported)
                   if env.get(k) not in (environment.get(k), after_imports.get(k)) and not k.startswith(RUNTIME)]
        if os.environ.get("ZYGOTE_LOG"):  # a file: what each command ran in
            with open(os.environ["ZYGOTE_LOG"], "a") as log:
                forked = not (fresh or differs or options is None)
                log.write(f"{os.getpid()} {'forked' if forked else 'fresh Python'}: {argv[1:]} {differs}\n")
        if fresh or differs or options is None:
            os.execve(real_python, [real_python, *argv[1:]], env)
        unbuffered, warnings_options, mode, target, args = options
        os.environ.clear()
        os.environ.update(env)
        os.environ.update(imported)
        _run(mode, target, args, argv, unbuffered, warnings_options, base_path, printed)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)


def _run(mode, target, args, argv, unbuffered, warnings_options, base_path, printed) -> None:
    """Run the command as Python's main would, then end as Python does: the exit code of SystemExit or 1
    after a traceback, non-daemon threads joined, atexit functions run, the streams flushed."""
    import atexit
    import builtins
    import io
    import threading
    import types
    import warnings

    if unbuffered:
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding=sys.stdout.encoding, write_through=True)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding=sys.stderr.encoding,
                                      errors="backslashreplace", write_through=True)
    for data, stream in zip(printed, (sys.stdout, sys.stderr)):  # what the imports printed, as a fresh Python would
        if data:
            stream.flush()
            stream.buffer.write(data) if hasattr(stream, "buffer") else os.write(stream.fileno(), data)
            stream.flush()
    for option in warnings_options:  # those of the environment (PYTHONWARNINGS) are the server's already
        if option not in sys.warnoptions:
            warnings._setoption(option)
            sys.warnoptions.append(option)
    sys.orig_argv = list(argv)
    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = builtins
    code = 0
    try:
        if mode == "file":
            path = os.path.abspath(target)
            sys.path[:] = [os.path.dirname(os.path.realpath(path)), *base_path]
            sys.argv = [target, *args]
            main.__file__ = target
            main.__cached__ = None
            sys.modules["__main__"] = main
            with open(path, "rb") as f:
                source = f.read()
            exec(compile(source, target, "exec"), main.__dict__)
        elif mode == "-c":
            sys.path[:] = ["", *base_path]
            sys.argv = ["-c", *args]
            sys.modules["__main__"] = main
            exec(compile(target, "<string>", "exec"), main.__dict__)
        else:
            import runpy

            sys.path[:] = [os.getcwd(), *base_path]
            sys.argv = ["-m", *args]
            sys.modules["__main__"] = main
            runpy._run_module_as_main(target, alter_argv=True)
    except SystemExit as e:
        code = _exit_code(e.code)
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    try:
        threading._shutdown()
        atexit._run_exitfuncs()
    except SystemExit as e:
        code = _exit_code(e.code)
    except BaseException:
        sys.excepthook(*sys.exc_info())
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed stream, as Python ignores it at exit
            pass
    os._exit(code)


def _exit_code(value) -> int:
    if value is None:
        return 0
    if isinstance(value, int):
        return value & 0xFF
    sys.stderr.write(f"{value}\n")
    sys.stderr.flush()
    return 1


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2], sys.argv[3:])
