"""Run ``sparsekern prune`` in this process and kill it with SIGKILL at a chosen moment (tests/test_resume.py).

    python tests/fault_runner.py boundary N PRUNE_ARGS...   # at the N-th write boundary (1-based)
    python tests/fault_runner.py after SECONDS PRUNE_ARGS...  # after that long
    python tests/fault_runner.py count 0 PRUNE_ARGS...       # no kill; print "boundaries: N" at the end

A write boundary is the moment just before and just after each durable step of the resume state (every fsync and
rename in ``sparsekern.resume``) and of the final checkpoint's swap into place (``models._swap_into_place``): the
places where a crash could leave a half-written state.
"""

import os
import signal
import sys
import threading


def main() -> int:
    mode, value, *argv = sys.argv[1:]
    from sparsekern import models, resume
    from sparsekern.cli import main as cli

    count = 0
    lock = threading.Lock()

    def boundary() -> None:
        nonlocal count
        with lock:
            count += 1
            if mode == "boundary" and count == int(value):
                os.kill(os.getpid(), signal.SIGKILL)

    def counted(module, name):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            boundary()
            result = original(*args, **kwargs)
            boundary()
            return result

        setattr(module, name, wrapper)

    counted(resume, "_fsync")
    counted(resume, "_replace")
    counted(models, "_swap_into_place")
    if mode == "after":
        threading.Timer(float(value), lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
    code = cli(argv)
    print(f"boundaries: {count}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
