"""One Python process with Triton's CPU interpreter on (``TRITON_INTERPRET=1`` must be set before Triton is
imported, so not in pytest's process), kept for the session: the interpreter tests send it their scripts instead of
each paying a new interpreter's start and imports of torch, Triton and the kernels (~3.5 s on a CI core)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# A script arrives as a line with its length, then its text; the reply goes back the same way on the protocol
# stream: "" (ran to the end) or the traceback. A script's own output goes to stderr.
_WORKER = r"""
import os, sys, traceback
proto = os.fdopen(os.dup(sys.stdout.fileno()), "w")
sys.stdout = sys.stderr
while True:
    header = sys.stdin.readline()
    if not header:
        break
    script = sys.stdin.read(int(header))
    try:
        exec(compile(script, "<interpreted script>", "exec"), {"__name__": "__main__"})
        reply = ""
    except BaseException:
        reply = traceback.format_exc()
    proto.write(f"{len(reply)}\n{reply}")
    proto.flush()
"""


class TritonInterpreter:
    """``run(script)`` -> "" if the script ran to its end under the interpreter, else its traceback (or, if the
    process died, the end of its stderr; a new process then takes the next script)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._log = tempfile.TemporaryFile(mode="w+")

    def _start(self) -> subprocess.Popen:
        env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
        return subprocess.Popen(
            [sys.executable, "-c", _WORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=env,
            cwd=ROOT,
        )

    def run(self, script: str) -> str:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = self._start()
        proc = self._proc
        try:
            proc.stdin.write(f"{len(script)}\n{script}")
            proc.stdin.flush()
            header = proc.stdout.readline()
            if header:
                return proc.stdout.read(int(header))
        except BrokenPipeError:
            pass
        proc.wait()
        self._proc = None
        self._log.seek(0)
        return f"the interpreter process died (exit {proc.returncode}):\n{self._log.read()[-3000:]}"

    def close(self) -> None:
        if self._proc is not None:
            self._proc.stdin.close()
            self._proc.wait(timeout=60)
        self._log.close()
