"""`python -m sphere_pl ARGS` in a new process forked from a server that has imported sphere_pl once.

A CLI subprocess spends 6-8 s of its ~8 s importing torch, Lightning, transformers and
sphere_pl before it parses its first argument. Tests that run many CLI commands run them
here instead: each command is still its own process, with its own working directory,
environment, stdout, stderr and exit status, and runs `sphere_pl/__main__.py` exactly as
`python -m` does (`runpy`, `sys.argv`, `__main__.__spec__`; uncaught exceptions and
`SystemExit` become the exit status and stderr the interpreter gives; atexit handlers run),
only without paying the imports again. Tests that check the real interpreter start-up keep
`helpers.run_cli`.

The server is multiprocessing's forkserver (one per pytest process), started with a
`cli_env`-style environment (HOME, W&B and cache directories in a temp directory), so
nothing imported there reads the user's home. It also preloads `test_fault_injection`,
whose SIGKILL test forks its runs from the same server.
"""

from __future__ import annotations

import locale
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

# imported by the server before it forks anything: what `python -m sphere_pl` imports, and
# what a fit imports lazily (model classes, checkpoint writing, plots)
PRELOAD = ["forked_cli", "test_fault_injection"]


def _preload() -> None:
    import importlib

    import sphere_pl.commands.cli  # noqa: F401
    import sphere_pl.commands.run  # noqa: F401
    import sphere_pl.commands.study  # noqa: F401
    import sphere_pl.commands.patches  # noqa: F401

    for name in (
        "transformers.modeling_utils",
        "transformers.generation.utils",
        "transformers.models.llama.modeling_llama",
        "transformers.models.llama.configuration_llama",
        "transformers.tokenization_utils_fast",
        "accelerate",
        "huggingface_hub.serialization",
        "safetensors.torch",
        "psutil",
        "tqdm.contrib.logging",
        "matplotlib.backends.backend_agg",
        "matplotlib.pyplot",
    ):
        try:
            importlib.import_module(name)
        except ImportError:
            pass


if os.environ.get("SPHERE_PL_FORK_SERVER") == "1":
    _preload()  # imported as a forkserver preload: do the imports once, for every child

_CONTEXT = None


def context(env: dict[str, str]):
    """The forkserver context, starting the server (with `env` as its environment) on first use."""
    global _CONTEXT
    if _CONTEXT is None:
        from multiprocessing import forkserver

        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        saved = dict(os.environ)
        try:
            os.environ.clear()
            # the server imports its preloads before it takes this process's sys.path: give it the path
            path = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
            os.environ.update(env, SPHERE_PL_FORK_SERVER="1", PYTHONPATH=path)
            forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        _CONTEXT = ctx
    return _CONTEXT


def _exit_status(error: SystemExit) -> int:
    """What the interpreter makes of an uncaught SystemExit: None 0, an int itself, else print it and 1."""
    code = error.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _cli_child(args: list[str], cwd: str, env: dict[str, str], stdout_path: str, stderr_path: str) -> None:
    import atexit
    import runpy
    import signal
    import threading

    # Ctrl-C raises KeyboardInterrupt, as in a `python -m` started from a terminal: a harness started as a
    # background job of a non-interactive shell (`bash .ci/run &`) inherits SIGINT ignored (bash ignores it
    # for `&` jobs), the interpreter then leaves it ignored, and a Ctrl-C sent to the child would be lost
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, stdout_path), (2, stderr_path)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    sys.argv = ["-m", *args]  # runpy puts sphere_pl/__main__.py's path in argv[0], as `python -m` does
    sys.path[0:0] = [cwd]  # `python -m` puts the working directory first
    try:
        runpy.run_module("sphere_pl", run_name="__main__", alter_sys=True)
        status = 0
    except SystemExit as e:
        status = _exit_status(e)
    except BaseException:
        sys.excepthook(*sys.exc_info())
        status = 1
    try:  # the interpreter's shutdown: wait for non-daemon threads, run atexit handlers, flush
        threading._shutdown()
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(status)


class RunningCli:
    """A `python -m sphere_pl ARGS` process forked from the server, running: signal it, wait for it, read its output."""

    def __init__(self, ctx, args: list[str], cwd: Path, env: dict[str, str]):
        streams = Path(env["HOME"]) / ".forked-cli"
        streams.mkdir(exist_ok=True)
        index = len(list(streams.glob("*.out")))
        self.args, self.out, self.err = list(args), streams / f"{index}.out", streams / f"{index}.err"
        self.process = ctx.Process(target=_cli_child, args=(self.args, str(cwd), dict(env), str(self.out), str(self.err)))
        self.process.start()

    def result(self, timeout: float = 300) -> subprocess.CompletedProcess:
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
            raise subprocess.TimeoutExpired(["sphere_pl", *self.args], timeout)
        encoding = locale.getpreferredencoding(False)
        stdout = self.out.read_text(encoding=encoding) if self.out.exists() else ""
        stderr = self.err.read_text(encoding=encoding) if self.err.exists() else ""
        return subprocess.CompletedProcess(["python", "-m", "sphere_pl", *self.args], self.process.exitcode, stdout, stderr)


def run_cli_forked(ctx, args: list[str], cwd: Path, env: dict[str, str], ok: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m sphere_pl ARGS` forked from the server; asserts the exit status as `helpers.run_cli` does."""
    result = RunningCli(ctx, args, cwd, env).result(timeout)
    if ok:
        assert result.returncode == 0, f"sphere_pl {args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    else:
        assert result.returncode != 0, f"sphere_pl {args} should have failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result

