"""Start the lab's command line as real processes from a notebook and stream what rank 0 prints (chapter 6)."""

from __future__ import annotations

import os
import subprocess
import sys

__all__ = ["lab_command"]


def lab_command(nproc: int, *args: str, timeout: float = 900.0, echo: bool = True) -> list[str]:
    """Run ``torchrun --standalone --nproc-per-node nproc -m dsv3lib.lab *args`` (or, for ``nproc == 1`` and a
    verb other than ``train``, plain ``python -m dsv3lib.lab``), printing each line of its output as it arrives
    (a notebook cell shows them live); returns the lines. A non-zero exit raises ``RuntimeError`` with the last
    lines, which name the failed rank and step."""
    if nproc == 1 and args and args[0] != "train":
        cmd = [sys.executable, "-m", "dsv3lib.lab", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "dsv3lib.lab", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    lines: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        try:
            for line in proc.stdout:
                line = line.rstrip("\n")
                lines.append(line)
                if echo:
                    print(line, flush=True)
            proc.wait(timeout=timeout)
        except BaseException:
            proc.kill()
            raise
    if proc.returncode:
        tail = "\n".join(lines[-8:])
        raise RuntimeError(f"lab {' '.join(args[:1])}: exited with code {proc.returncode}:\n{tail}")
    return lines
