"""One round, several processes: the main process decides and writes, every process trains.

Under `accelerate launch --num_processes N -m retrain once` each of the N processes runs
`retrain.round.run_round`. Who does what:

  main process only   the round lock and the `retrain_runs` row; reading the store and deciding
                      whether to skip; finding the serving policy (registering the base model
                      when nothing serves yet) and the reward model to warm-start from; writing
                      the reward model and the checkpoint; registering and promoting.
  every process       reward-model training (its share of every epoch's batches, gradients
                      averaged), PPO (its own prompts in every iteration, gradients averaged),
                      and the gate's greedy answers, scores and KL on its share of the held-out
                      prompts.

What the main process decides reaches the others through `share` (a broadcast of the pickled
value); the gate's per-prompt numbers come together through `gather`. Only the main process
talks to PostgreSQL. With one process every helper here is the identity.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import TypeVar

from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object, parse_flag_from_env

T = TypeVar("T")


def this_process() -> PartialState:
    """This process's place in the launch (or the only process): accelerate's shared state, set
    up as `Accelerator()` sets it up (ACCELERATE_USE_CPU=1: the processes run on CPU, over gloo)."""
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


class MainProcessFailed(RuntimeError):
    """A step that only the main process runs failed there (this process is told, not hung)."""


def share(ranks: PartialState, decide: Callable[[], T]) -> T:
    """`decide()` on the main process only; every process gets its result. When it raises on
    the main process, the others raise too (the same exception when it pickles), so none waits
    for a value that never comes."""
    if ranks.num_processes == 1:
        return decide()
    message: list = [None]
    failure: BaseException | None = None
    if ranks.is_main_process:
        try:
            message = [("value", decide())]
        except BaseException as exc:
            failure = exc
            message = [("error", _portable(exc))]
    broadcast_object_list(message, from_process=0)
    if failure is not None:
        raise failure
    kind, value = message[0]
    if kind == "error":
        raise value
    return value


def _portable(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return MainProcessFailed(f"the main process failed: {type(exc).__name__}: {exc}")


def my_share(ranks: PartialState, items: list[T]) -> list[T]:
    """This process's contiguous slice of `items` (sizes differ by at most one; may be empty)."""
    with ranks.split_between_processes(items) as part:
        return list(part)


def gather(ranks: PartialState, items: list[T]) -> list[T]:
    """Every process's `items`, concatenated in process order, on every process: the inverse of
    `my_share`."""
    return list(items) if ranks.num_processes == 1 else gather_object(list(items))
