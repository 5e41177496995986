"""bench/harness.py: what every end-to-end benchmark relies on to leave the machine as it found it."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_sigterm_stops_what_a_benchmark_started(tmp_path):
    # A benchmark that has started a child process (as bench/loop.py starts the server and the
    # retraining service) and is waiting: SIGTERM must run its cleanup, so the child is stopped
    # rather than left running on the machine, and the benchmark exits 143.
    script = tmp_path / "bench_like.py"
    pid_file = tmp_path / "child.pid"
    script.write_text(textwrap.dedent(f"""
        import asyncio, subprocess, sys
        sys.path.insert(0, {str(ROOT)!r})
        from bench.harness import run_until_terminated

        async def benchmark():
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
            open({str(pid_file)!r}, "w").write(str(child.pid))
            try:
                await asyncio.sleep(600)
            finally:
                child.terminate()
                child.wait()

        run_until_terminated(benchmark())
    """))
    bench = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text()):
        assert time.monotonic() < deadline and bench.poll() is None, "the benchmark did not start its child"
        time.sleep(0.05)
    child = int(pid_file.read_text())

    bench.send_signal(signal.SIGTERM)
    _, stderr = bench.communicate(timeout=30)

    assert bench.returncode == 143, stderr
    assert "Traceback" not in stderr
    try:
        os.kill(child, 0)
    except ProcessLookupError:
        pass  # stopped, and reaped by its parent's cleanup
    else:
        raise AssertionError(f"child {child} is still running after the benchmark was terminated")
