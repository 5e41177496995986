"""retrain/ranks.py: what each process of a launch gets from `share`, `my_share` and `gather`,
with one process (the identity) and with two real processes over gloo on CPU."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from retrain.ranks import MainProcessFailed, _portable, gather, my_share, share, this_process

REPO = Path(__file__).resolve().parents[2]

# Run in each of two processes (RANK 0 and 1): prints what that process got, as one JSON line.
TWO_PROCESSES = r'''
import json, os
from retrain.ranks import gather, my_share, share, this_process

ranks = this_process()
decided = share(ranks, lambda: {"decided_by": int(os.environ["RANK"])})
mine = my_share(ranks, list(range(5)))
everyone = gather(ranks, [v * 10 for v in mine])
try:
    share(ranks, lambda: int("not a number"))  # fails on the main process only
    failure = None
except ValueError as exc:
    failure = str(exc)
print(json.dumps({"rank": ranks.process_index, "decided": decided, "mine": mine,
                  "everyone": everyone, "failure": failure}), flush=True)
# Leave the gloo group before exiting: a process that exits with it still up can abort in
# gloo's teardown ("terminate called without an active exception", status -6).
ranks.destroy_process_group()
'''


class _Unpicklable(Exception):
    def __init__(self, lock):
        super().__init__("holds a lock")
        self.lock = lock


def test_one_process_decides_and_keeps_everything():
    ranks = this_process()
    assert ranks.num_processes == 1 and ranks.is_main_process
    assert share(ranks, lambda: {"skip": False}) == {"skip": False}
    assert my_share(ranks, [1, 2, 3]) == [1, 2, 3]
    assert gather(ranks, [4, 5]) == [4, 5]
    with pytest.raises(ZeroDivisionError):
        share(ranks, lambda: 1 / 0)


def test_a_failure_that_cannot_be_sent_becomes_main_process_failed():
    sendable = ValueError("bad config")
    assert _portable(sendable) is sendable
    unsendable = _portable(_Unpicklable(threading.Lock()))
    assert isinstance(unsendable, MainProcessFailed)
    assert "_Unpicklable: holds a lock" in str(unsendable)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(180)
def test_two_processes_share_the_main_decision_split_the_work_and_gather_it():
    port = str(_free_port())
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2",
           "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    processes = [
        subprocess.Popen([sys.executable, "-c", TWO_PROCESSES], cwd=REPO, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)})
        for rank in (0, 1)
    ]
    results = {}
    for process in processes:
        out, err = process.communicate(timeout=150)
        assert process.returncode == 0, err[-2000:]
        result = json.loads(out.strip().splitlines()[-1])
        results[result["rank"]] = result

    for rank in (0, 1):
        assert results[rank]["decided"] == {"decided_by": 0}  # the main process's value, everywhere
        assert results[rank]["everyone"] == [0, 10, 20, 30, 40]  # in process order, on every process
        # The main process's failure reaches the other one as the same exception, not a hang.
        assert results[rank]["failure"] == "invalid literal for int() with base 10: 'not a number'"
    assert results[0]["mine"] + results[1]["mine"] == [0, 1, 2, 3, 4]
    assert {len(results[0]["mine"]), len(results[1]["mine"])} == {2, 3}
