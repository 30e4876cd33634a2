"""Run a real `dg-edit serve` in a child process: for the service's tests, the browser test and
`bench/ws.py`, which all want the service exactly as a user starts it (the `dg-edit` command line,
its own process, the port read from what it prints) rather than an in-process imitation.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

def dg_edit_command() -> list[str]:
    """The `dg-edit` console script of this Python environment, as a user would run it.

    (Not `python -m dg_edit.cli`: that runs cli.py as `__main__`, a second copy of the module whose
    `UsageError` is not the one the front ends raise.)
    """
    script = Path(sys.executable).with_name("dg-edit")
    if script.is_file():
        return [str(script)]
    found = shutil.which("dg-edit")
    if found is None:
        raise FileNotFoundError("the dg-edit console script is not installed: pip install -e .")
    return [found]


_LISTENING = re.compile(r"listening on http://(?P<host>[^/\s]+):(?P<port>\d+)/")


class ServeProcess:
    """`dg-edit serve --port 0 ARGS...`; `url`/`ws_url` are known once the service printed its port.

    Its stderr goes to a file (`log_path`), not a pipe, so a chatty service can never block on a
    full pipe that nobody reads.
    """

    def __init__(self, args: Sequence[str] = (), env: dict[str, str] | None = None, startup_timeout: float = 120.0):
        self.args = ["--port", "0", *args]
        self.env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **(env or {})}
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.host = self.port = None
        self._terminated = False
        self._log = tempfile.NamedTemporaryFile(prefix="dg-edit-serve-", suffix=".log", delete=False)
        self.log_path = Path(self._log.name)

    def start(self) -> "ServeProcess":
        self.proc = subprocess.Popen([*dg_edit_command(), "serve", *self.args],
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=self.env, start_new_session=True)
        return self

    def wait_ready(self) -> "ServeProcess":
        """Block until the service printed its address; raise with its log if it died or hung."""
        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            match = _LISTENING.search(self.log())
            if match:
                self.host, self.port = match["host"], int(match["port"])
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"dg-edit serve exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"dg-edit serve did not start in {self.startup_timeout:.0f} s:\n{self.log()}")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/ws"

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def terminate(self) -> None:
        """Ask for a clean shutdown (SIGTERM) without waiting; `stop()` waits.

        Only once: a second SIGTERM during the interpreter's teardown, after the service restored the
        default handler, would kill the process instead of letting it finish cleanly.
        """
        if self.proc is not None and self.proc.poll() is None and not self._terminated:
            self._terminated = True
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (a clean shutdown), then SIGKILL of the whole process group if it hangs.

        The timeout is generous: after the service stopped, torch's interpreter teardown alone takes
        seconds on a loaded machine.
        """
        if self.proc is None:
            return None
        self.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "ServeProcess":
        return self.start().wait_ready()

    def __exit__(self, *exc) -> None:
        self.stop()


class ServeGroup(dict):
    """Several `ServeProcess`es by name, started side by side (their model loads overlap) and stopped
    together; after the `with` block `codes` holds each exit code.

        with ServeGroup(plain=ServeProcess(...), auth=ServeProcess(...)) as servers:
            ...
        assert servers.codes == {"plain": 0, "auth": 0}
    """

    codes: dict[str, int | None]

    def __enter__(self) -> "ServeGroup":
        for proc in self.values():
            proc.start()
        try:
            for proc in self.values():
                proc.wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.values():  # all shut down at once, then wait for each
            proc.terminate()
        self.codes = {name: proc.stop() for name, proc in self.items()}
