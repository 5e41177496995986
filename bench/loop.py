"""The whole loop, end to end: simulated users chat, vote, and the served model learns from them.

    .venv/bin/python bench/loop.py --preference concise              # 5 rounds, about 35 minutes
    .venv/bin/python bench/loop.py --preference simple --noise 0.3
    .venv/bin/python bench/loop.py --preference question --edits 0.25  # users also edit answers
    .venv/bin/python bench/loop.py --preference concise --controls   # the result and its controls
    .venv/bin/python bench/loop.py --preference concise --controls --parallel --threads 1  # at once
    make demo                                                        # --quick: 2 short rounds

It starts the real system on a scratch database (DATABASE_URL's server, or a private embedded
PostgreSQL): `python -m server` on SmolLM2-135M-Instruct and `python -m retrain serve`, whose
scheduler starts a round once a day's feedback has arrived (RETRAIN_MIN_NEW_FEEDBACK). Nothing
in between is driven by this script: the round refreshes the reward model, runs PPO, gates the
candidate and promotes it; the server hears the NOTIFY and hot-swaps the adapter.

Each "day", `--users` simulated users chat over the websocket protocol: a new conversation per
prompt from the training side of bench/data/everyday_prompts.txt, a thumb on the answer, then a
regenerate and a compare of the two answers (and a thumb on the second), each vote by a hidden
preference (bench/preferences.py), `--noise` of them random. With `--edits SHARE`, on that share
of conversations the user first edits the answer into the one the preference wants (a
demonstration: the round fine-tunes on it before PPO), then votes as before. Then the script
waits for the round
and the swap, and measures the serving policy on the held-out prompts (never chatted during a
day; asked greedily, in conversations opted out of training):

- the preference's score, the simulated users' thumbs-up rate (their rule, without noise),
- win rate against round 0's answers to the same prompts under the preference (ties half),
  (`--measure-preference` measures under another preference than the one the users vote by:
  the `verbose` control measured under `concise`),
- KL to the base model (the gate's measure of the promoted candidate: mean per-answer nats),
- answer length (words, tokens) and the share of answers that end (EOS) before the cap.

It prints progress as it goes, writes a JSON log and a PNG plot after every round, and stops
after `--rounds` rounds or once the next round would pass `--budget-minutes`.

Every round uses the shipped retraining defaults (`python -m retrain config`): the `full`
profile sets only what the loop itself needs (start a round on the day's votes, the answer cap).
`--controls` runs the same configuration again with votes that carry no preference
(`--noise 1.0`) and, for `concise`, with users who want the opposite (`verbose`) measured under
`concise`, and writes the runs side by side (controls.json, controls.png): a learning claim
stands only when the controls do not show the same movement.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.harness import (  # noqa: E402  (after the path)
    admin_url, free_port, run_until_terminated, start_process, stop_process, version_info, wait_ready,
)
from support.database import scratch_database  # noqa: E402  (tests/support, via bench.harness)
from bench.preferences import PREFERENCES, Preference, SimulatedUser, win_rate, words  # noqa: E402

log = logging.getLogger("bench.loop")

PROMPTS = ROOT / "bench" / "data" / "everyday_prompts.txt"

# The budgets of a round, as environment variables of `python -m retrain serve` (see
# `python -m retrain config`), and the overrides of the full config (RETRAIN_CONFIG_FILE).
# `full`, which every reported result uses, overrides nothing: the shipped defaults.
PROFILES = {
    "full": {
        "days": 5, "conversations": 96, "held_out": 40, "max_new_tokens": 128,
        "retrain": {},
        "config": {},
    },
    "quick": {  # shows the loop turning in minutes; learns little, and reports nothing
        "days": 2, "conversations": 12, "held_out": 16, "max_new_tokens": 64,
        "retrain": {
            "RETRAIN_PPO_ITERATIONS": "1", "RETRAIN_PPO_BATCH_SIZE": "8", "RETRAIN_PPO_EPOCHS": "1",
            "RETRAIN_REWARD_EPOCHS": "1", "RETRAIN_REWARD_LAYERS": "6", "RETRAIN_REWARD_MAX_TOKENS": "192",
            "RETRAIN_MAX_GATE_PROMPTS": "6", "RETRAIN_HELD_OUT_PERCENT": "25",
            "RETRAIN_MIN_PAIRS": "4", "RETRAIN_MIN_PROMPTS": "4",
        },
        "config": {"round": {"min_gate_prompts": 2}},
    },
}
USER_SAMPLING = {"temperature": 0.8, "top_p": 0.9}  # the simulated users' client settings
FEEDBACK_PER_CONVERSATION = 3  # a thumb on each of two answers, and their comparison


# -- prompts --------------------------------------------------------------------------------------


def load_prompts(path: Path = PROMPTS) -> list[str]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    prompts = [line for line in lines if line and not line.startswith("#")]
    if len(set(prompts)) != len(prompts):
        raise ValueError(f"{path} repeats a prompt")
    return prompts


def split_prompts(prompts: list[str], held_out: int) -> tuple[list[str], list[str]]:
    """(training side, held-out side): the `held_out` prompts with the smallest hash of their
    text, so the split is stable however the file is reordered."""
    ranked = sorted(prompts, key=lambda p: hashlib.sha256(p.encode()).hexdigest())
    held = set(ranked[:held_out])
    return [p for p in prompts if p not in held], [p for p in prompts if p in held]


# -- the websocket client -------------------------------------------------------------------------


@dataclass
class Answer:
    conversation_id: str
    message_id: str
    text: str
    finish_reason: str
    model_version: str
    tokens: int


class Session:
    """One user's websocket: one request at a time, so frames arrive in order."""

    def __init__(self, ws_url: str, token: str):
        self.token = token
        self.url = f"{ws_url}?token={token}"
        self.ws = None

    async def __aenter__(self) -> Session:
        import websockets

        self.ws = await websockets.connect(self.url, max_size=None)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.ws.close()

    async def _send(self, frame: dict) -> None:
        await self.ws.send(json.dumps(frame))

    async def _frame(self) -> dict:
        frame = json.loads(await asyncio.wait_for(self.ws.recv(), 600))
        if frame["type"] == "error":
            raise RuntimeError(f"server error {frame['code']}: {frame['message']}")
        return frame

    async def _answer(self) -> Answer:
        started = await self._frame()
        assert started["type"] == "started", started
        pieces = []
        while True:
            frame = await self._frame()
            if frame["type"] == "token":
                pieces.append(frame["text"])
            elif frame["type"] == "done":
                return Answer(started["conversation_id"], started["message_id"], "".join(pieces),
                              frame["finish_reason"], started["model_version"], frame["usage"]["completion_tokens"])

    async def ask(self, content: str, params: dict) -> Answer:
        await self._send({"type": "message", "content": content, "params": params})
        return await self._answer()

    async def regenerate(self, message_id: str, params: dict) -> Answer:
        await self._send({"type": "regenerate", "message_id": message_id, "params": params})
        return await self._answer()

    async def _acked(self, frame: dict) -> None:
        await self._send(frame)
        ack = await self._frame()
        assert ack["type"] == "ack", ack

    async def thumb(self, message_id: str, rating: int) -> None:
        await self._acked({"type": "feedback", "message_id": message_id, "rating": rating})

    async def compare(self, message_id: str, other_id: str, verdict: str) -> None:
        await self._acked({"type": "compare", "message_id": message_id, "other_id": other_id, "verdict": verdict})

    async def edit(self, message_id: str, content: str) -> None:
        await self._acked({"type": "edit", "message_id": message_id, "content": content})


async def run_users(ws_url: str, tokens: list[str], prompts: list[str], work) -> list:
    """`work(session, prompt)` for every prompt, spread over one session per user token."""
    queue: asyncio.Queue = asyncio.Queue()
    for index, prompt in enumerate(prompts):
        queue.put_nowait((index, prompt))
    results: list = [None] * len(prompts)

    async def user(token: str) -> None:
        async with Session(ws_url, token) as session:
            while not queue.empty():
                index, prompt = queue.get_nowait()
                results[index] = await work(session, prompt)

    await asyncio.gather(*(user(token) for token in tokens))
    return results


# -- one day, one measurement ---------------------------------------------------------------------


async def chat_day(ws_url: str, tokens: list[str], prompts: list[str], users: list[SimulatedUser],
                   params: dict, progress) -> dict:
    """Each prompt: ask, (on the user's edit share: edit the answer into the one wanted), thumb,
    regenerate, compare, thumb. Returns the day's vote and edit counts, and how many of the
    comparisons were between two answers both cut at the cap (`compared_both_cut`): for a
    length preference those votes can only say "fewer words in the same tokens"."""
    counts = {"conversations": 0, "thumbs_up": 0, "thumbs_down": 0, "better": 0, "worse": 0, "same": 0,
              "edits": 0, "compared_both_cut": 0}
    by_token = dict(zip(tokens, users))

    async def converse(session: Session, prompt: str) -> None:
        judge = by_token[session.token]
        first = await session.ask(prompt, params)
        wanted = judge.edit(first.text, prompt)
        if wanted is not None:
            await session.edit(first.message_id, wanted)
            counts["edits"] += 1
        second = await session.regenerate(first.message_id, params)
        for answer in (first, second):
            rating = judge.thumb(answer.text)
            await session.thumb(answer.message_id, rating)
            counts["thumbs_up" if rating > 0 else "thumbs_down"] += 1
        verdict = judge.compare(second.text, first.text)
        await session.compare(second.message_id, first.message_id, verdict)
        counts[verdict] += 1
        counts["compared_both_cut"] += first.finish_reason == second.finish_reason == "length"
        counts["conversations"] += 1
        progress(counts["conversations"])

    await run_users(ws_url, tokens, prompts, converse)
    return counts


async def measure(base_url: str, token: str, prompts: list[str], params: dict) -> list[Answer]:
    """The serving policy's answers to the held-out prompts, each in a new conversation that
    is opted out of training at once (PATCH allow_data_use=false).

    One evaluator asks them one at a time: a greedy answer decoded alone is the same every time,
    while one decoded beside others depends on its batch (under int4, two measurements of one
    server with 8 evaluators at once gave the same answer to 22 of 40 prompts, one at a time 40
    of 40), and that would put noise into every round's win rate."""
    import httpx

    ws_url = base_url.replace("http://", "ws://") + "/ws"
    # A new connection for each PATCH: one comes every answer, 4-5 s apart, which is uvicorn's
    # keep-alive timeout (5 s), and a request sent on a kept connection as the server closes it
    # fails with a ReadError (it ended a 2-hour run once).
    fresh = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=fresh) as client:
        async def ask(session: Session, prompt: str) -> Answer:
            answer = await session.ask(prompt, params)
            response = await client.patch(f"/api/conversations/{answer.conversation_id}",
                                          json={"allow_data_use": False},
                                          headers={"Authorization": f"Bearer {session.token}"})
            response.raise_for_status()
            return answer

        return await run_users(ws_url, [token], prompts, ask)


@dataclass
class RoundRow:
    round: int
    model_version: str
    minutes: float  # since the start, when the measurement ended
    # The measured preference's mean score on the held-out prompts, over the answers that are
    # not empty (an empty answer scores -inf: it counts in the win rate and thumbs, as a loss).
    score: float | None
    empty_answers: int
    thumbs_up_rate: float  # under the measured preference's rule, no noise
    win_rate_vs_round_0: float  # under the measured preference
    users_thumbs_up_rate: float  # under the voting users' own rule, no noise (= thumbs_up_rate unless measured elsewhere)
    kl_to_base: float
    mean_words: float
    mean_tokens: float
    eos_rate: float
    run: dict = field(default_factory=dict)  # the round's retrain_runs row, summarised
    examples: list = field(default_factory=list)


def summarise(round_no: int, preference: Preference, prompts: list[str], answers: list[Answer],
              baseline: list[Answer] | None, kl: float, started: float, run: dict,
              voters: Preference | None = None) -> RoundRow:
    """One round's numbers under `preference` (the measured one); `voters`: the users' own
    preference, when the run is measured under another."""
    texts = [a.text for a in answers]
    versions = {a.model_version for a in answers}
    if len(versions) != 1:
        raise RuntimeError(f"the held-out answers came from several versions: {sorted(versions)}")
    return RoundRow(
        round=round_no,
        model_version=versions.pop(),
        minutes=round((time.monotonic() - started) / 60, 2),
        score=_finite_mean(preference.score(t) for t in texts),
        empty_answers=sum(not t.strip() for t in texts),
        thumbs_up_rate=sum(preference.likes(t) for t in texts) / len(texts),
        win_rate_vs_round_0=win_rate(preference, texts, [b.text for b in baseline]) if baseline else 0.5,
        users_thumbs_up_rate=sum((voters or preference).likes(t) for t in texts) / len(texts),
        kl_to_base=kl,
        mean_words=statistics.fmean(words(t) for t in texts),
        mean_tokens=statistics.fmean(a.tokens for a in answers),
        eos_rate=sum(a.finish_reason == "stop" for a in answers) / len(answers),
        run=run,
        examples=[{"prompt": p, "answer": a.text, "finish_reason": a.finish_reason}
                  for p, a in list(zip(prompts, answers))[:4]],
    )


def effective_round_config(retrain_env: dict[str, str], model_dir: Path) -> dict:
    """The full config every round of this run uses (what `python -m retrain config` prints
    under the same environment), so the report says exactly how the policy was trained."""
    from retrain.settings import RetrainSettings

    names = {name.upper(): name for name in RetrainSettings.model_fields}
    settings = RetrainSettings(**{names[k]: v for k, v in retrain_env.items()}, model=str(model_dir))
    return settings.retrain_config(model_dir).to_json()


# -- the round, the swap --------------------------------------------------------------------------


def latest_run_id(url: str) -> int:
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute("SELECT coalesce(max(id), 0) FROM retrain_runs").fetchone()[0]


def next_run(url: str, after_id: int) -> dict | None:
    import psycopg
    from psycopg.rows import dict_row

    with psycopg.connect(url, row_factory=dict_row) as conn:
        return conn.execute(
            "SELECT id, status, trigger, started_at, finished_at, counts, metrics, timings, candidate_id, error "
            "FROM retrain_runs WHERE id > %s ORDER BY id LIMIT 1", (after_id,)
        ).fetchone()


async def wait_for_round(url: str, after_id: int, retrain, timeout: float, progress) -> dict:
    began = time.monotonic()
    reported = 0
    while time.monotonic() - began < timeout:
        if retrain.poll() is not None:
            raise SystemExit(f"`python -m retrain serve` exited with {retrain.returncode}; see its log")
        row = await asyncio.to_thread(next_run, url, after_id)
        if row is not None and row["status"] != "running":
            return row
        minutes = int((time.monotonic() - began) // 60)
        if minutes > reported:
            reported = minutes
            progress(f"round {row['id']} running ({row['trigger']})" if row else "no round started yet")
        await asyncio.sleep(5)
    raise SystemExit(f"no round finished within {timeout:g} s after the day's feedback")


def serving_checkpoint(url: str) -> tuple[str, float]:
    """The registry's serving checkpoint and its KL to the base (0 for the base itself)."""
    from deploy import registry

    with registry.connect(url) as conn:
        serving = registry.get(conn, registry.read_state(conn).serving.id)
    return serving.id, float((serving.metrics or {}).get("kl") or 0.0)


async def wait_for_swap(client, version: str, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        info = await version_info(client)
        if info["model_version"] == version and info["in_sync"]:
            return time.monotonic() - started
        await asyncio.sleep(0.25)
    raise SystemExit(f"the server did not serve {version} within {timeout:g} s of the promotion")


def run_summary(row: dict) -> dict:
    metrics, timings = row["metrics"] or {}, row["timings"] or {}
    gate = metrics.get("gate") or {}
    return {
        "id": row["id"], "status": row["status"], "trigger": row["trigger"], "candidate": row["candidate_id"],
        "minutes": round((row["finished_at"] - row["started_at"]).total_seconds() / 60, 2),
        "decision": (metrics.get("decision") or {}).get("summary") or metrics.get("skipped") or row["error"],
        "promoted": (metrics.get("promotion") or {}).get("promoted", False),
        "gate_kl": gate.get("kl"), "gate_win_rate": gate.get("win_rate"),
        "gate_win_rate_lower": gate.get("win_rate_lower"),
        # The candidate's greedy answers on the gate's prompts that loop (the gate's own test).
        "gate_repetitive_rate": (gate.get("candidate") or {}).get("repetitive_rate"),
        "reward_accuracy": (metrics.get("reward") or {}).get("eval_accuracy"),
        "sft": metrics.get("sft"),  # the round's fine-tuning on demonstrations and liked answers
        "kto": metrics.get("kto"),  # the round's KTO on thumbed answers
        "reward_pairs": (metrics.get("reward") or {}).get("eval_pairs"),
        "reward_accuracy_interval": (metrics.get("reward") or {}).get("eval_accuracy_interval"),
        "users_on_serving_answers": gate.get("users_on_serving_answers"),
        # How the judge ranks all held-out thumbs, and the check the gate made on pairs and thumbs.
        "thumb_ranking": gate.get("thumb_ranking"),
        "judge_accuracy": gate.get("judge_accuracy"), "judge_accuracy_lower": gate.get("judge_accuracy_lower"),
        "judge_verdicts": gate.get("judge_verdicts"),
        "critic_from": metrics.get("critic_from"),
        # PPO's sampled KL per iteration and its budget's record: where a round stopped, and why.
        # (a KL that was not a number is stored as null)
        "ppo_kl": [None if it.get("kl") is None else round(it["kl"], 3)
                   for it in (metrics.get("ppo") or {}).get("iterations") or []],
        "ppo_kl_budget": (metrics.get("ppo") or {}).get("kl_budget"),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "counts": row["counts"],
    }


# -- report ---------------------------------------------------------------------------------------


# Runs made at once (--parallel) write their reports from worker threads, off the event loop that
# keeps the other runs' websockets answering pings; pyplot's state is global, so one at a time.
_WRITING = threading.Lock()


@dataclass
class Report:
    when: str
    preference: str  # what the simulated users vote by
    description: str
    noise: float
    edits: float  # share of conversations whose first answer the user edited (a demonstration)
    measured_under: str  # the preference the numbers are measured under (usually `preference`)
    profile: str
    settings: dict
    machine: dict
    kl_bound: float
    prompts: dict
    rounds: list[RoundRow] = field(default_factory=list)
    minutes: float = 0.0
    stopped_because: str = ""

    def write(self, out: Path) -> None:
        with _WRITING:
            out.mkdir(parents=True, exist_ok=True)
            (out / "loop.json").write_text(json.dumps(asdict(self), indent=2, default=str, allow_nan=False))
            plot(self, out / "loop.png")

    @classmethod
    def read(cls, out: Path) -> Report:
        """The report a run wrote under `out` (its loop.json)."""
        fields = json.loads((Path(out) / "loop.json").read_text())
        fields["rounds"] = [RoundRow(**row) for row in fields["rounds"]]
        return cls(**fields)


def plot(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r.round for r in report.rounds]
    panels = [
        ("win_rate_vs_round_0", "win rate vs round 0", 0.75 if report.noise < 0.3 else 0.65),
        ("thumbs_up_rate", "thumbs-up rate", None),
        ("score", f"{report.preference} score", None),
        ("kl_to_base", "KL to base (nats)", report.kl_bound),
        ("mean_words", "answer length (words)", None),
        ("eos_rate", "answers ending before the cap", None),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    for ax, (key, title, line) in zip(axes.flat, panels):
        ax.plot(rounds, [getattr(r, key) if getattr(r, key) is not None else float("nan") for r in report.rounds],
                marker="o")
        if line is not None:
            ax.axhline(line, color="grey", linestyle="--", linewidth=1)
        if key in ("win_rate_vs_round_0", "thumbs_up_rate", "eos_rate"):
            ax.set_ylim(-0.02, 1.02)  # shares: the whole range, so a small wobble looks small
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.set_xticks(rounds)
    fig.suptitle(f"Flywheel loop: hidden preference '{report.preference}', {report.noise:.0%} random votes"
                 + (f", {report.edits:.0%} of answers edited" if report.edits else "")
                 + f"{_measured(report)} ({report.prompts['held_out']} held-out prompts, SmolLM2-135M)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(report: Report) -> None:
    from rich.console import Console
    from rich.table import Table

    edited = f", {report.edits:.0%} of answers edited" if report.edits else ""
    table = Table(title=f"'{report.preference}' with {report.noise:.0%} random votes{edited}{_measured(report)}")
    for column in ("round", "serving", "min", "score", "thumbs up", "win vs 0", "KL", "words", "EOS", "the round"):
        table.add_column(column, justify="left" if column == "serving" else "right")
    for r in report.rounds:
        table.add_row(str(r.round), r.model_version, f"{r.minutes:.1f}", _number(r.score), f"{r.thumbs_up_rate:.2f}",
                      f"{r.win_rate_vs_round_0:.2f}", f"{r.kl_to_base:.2f}", f"{r.mean_words:.1f}",
                      f"{r.eos_rate:.2f}", _outcome(r.run))
    Console(width=160).print(table)


def _measured(report: Report) -> str:
    return f", measured under '{report.measured_under}'" if report.measured_under != report.preference else ""


def _outcome(run: dict) -> str:
    if not run:
        return "-"
    gate = f" (gate win {run['gate_win_rate']:.2f})" if run.get("gate_win_rate") is not None else ""
    judge = (f", judge {run['reward_accuracy']:.2f} on {run['reward_pairs']} pairs"
             if run.get("reward_accuracy") is not None else "")
    return f"{run['status']}{', promoted' if run['promoted'] else ''}{gate}{judge}, {run['minutes']:.1f} min"


# -- controls -------------------------------------------------------------------------------------


def control_runs(args) -> list[tuple[str, argparse.Namespace]]:
    """The result and its controls, in the same configuration: (label, args) each. The
    no-preference control votes at random (--noise 1.0) under the same preference; for
    `concise`, the opposite users (`verbose`) are measured under `concise`."""
    out = Path(args.out or ROOT / "bench" / "out" / f"loop-{args.preference}-noise{int(args.noise * 100)}-controls")
    variants = [{"out": str(out / "result")}, {"noise": 1.0, "out": str(out / "noise100")}]
    if args.preference == "concise":
        variants.append({"preference": "verbose", "measure_preference": "concise", "out": str(out / "verbose")})
    runs = []
    for index, change in enumerate(variants):
        variant = argparse.Namespace(**{**vars(args), "controls": False, **change})
        runs.append(("result" if index == 0 else control_label(
            variant.preference, variant.noise, variant.measure_preference or variant.preference), variant))
    return runs


def control_label(preference: str, noise: float, measured_under: str) -> str:
    """What a control run is, in the words the report and the plot use."""
    if preference != measured_under:
        return f"control: {preference} users, measured under {measured_under}"
    return f"control: random votes (noise {noise:.1f})"


def side_by_side(result_dir: Path, control_dirs: list[Path], out: Path) -> ControlsReport:
    """A result and its controls run separately (one at a time, or at another moment) put side by
    side as --controls would: the controls must be the result's configuration with only the
    votes changed, which is checked, so nothing else can explain a difference."""
    result = Report.read(result_dir)
    controls = ControlsReport(["result"], [result])
    same = ("profile", "edits", "kl_bound", "prompts")
    for path in control_dirs:
        control = Report.read(path)
        differs = [k for k in same if getattr(control, k) != getattr(result, k)]
        differs += [k for k in ("round_config", "max_new_tokens", "conversations", "users", "days")
                    if control.settings.get(k) != result.settings.get(k)]
        if control.measured_under != result.measured_under:
            differs.append("measured_under")
        if differs:
            raise ValueError(f"{path} is not {result_dir}'s configuration: {sorted(set(differs))} differ")
        controls.labels.append(control_label(control.preference, control.noise, control.measured_under))
        controls.runs.append(control)
    controls.write(out)
    return controls


@dataclass
class ControlsReport:
    """A result and its controls side by side: each run's rounds, measured the same way."""

    labels: list[str]
    runs: list[Report]

    def write(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "controls.json").write_text(json.dumps(
            [{"label": label, **asdict(report)} for label, report in zip(self.labels, self.runs)],
            indent=2, default=str, allow_nan=False))
        (out / "controls.md").write_text(markdown_controls(self))
        plot_controls(self, out / "controls.png")


def markdown_controls(controls: ControlsReport) -> str:
    """The runs side by side as a Markdown table, round by round: what was measured after the round
    (win rate vs round 0, thumbs-up rate under the measured preference, no noise) and what its gate
    saw (decision, win rate and its lower bound, the judge on held-out pairs and thumbs, KL)."""
    first = controls.runs[0]
    lines = [f"Under '{first.measured_under}': win vs round 0 / thumbs up after the round; the round's gate: "
             "decision, win rate (90% lower bound), judge on held-out pairs, judge on held-out thumbs, KL",
             "", "| round | " + " | ".join(controls.labels) + " |", "|---" * (len(controls.labels) + 1) + "|"]
    for index in range(max(len(r.rounds) for r in controls.runs)):
        cells = [_markdown_cell(r.rounds[index]) if index < len(r.rounds) else "-" for r in controls.runs]
        lines.append(f"| {index} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _markdown_cell(row: RoundRow) -> str:
    measured = f"{row.win_rate_vs_round_0:.2f} / {row.thumbs_up_rate:.2f}"
    run = row.run
    if not run:
        return measured
    if run.get("gate_win_rate") is None:  # no gate: skipped, or (rejected) PPO kept no update
        why = ", no candidate: PPO kept no update" if run["status"] == "rejected" else ""
        return f"{measured}; {run['status']}{why}"
    gate = [f"{run['status']}{', promoted' if run['promoted'] else ''} {run['gate_win_rate']:.2f} "
            f"({run['gate_win_rate_lower']:.2f})"]
    if run.get("reward_accuracy") is not None:
        gate.append(f"judge {run['reward_accuracy']:.2f} on {run['reward_pairs']}")
    users = run.get("users_on_serving_answers") or {}
    if run.get("thumb_ranking"):  # thumbs ranked up over down; older runs: the sign rule on serving's
        ranking = run["thumb_ranking"]
        gate.append(f"thumbs ranked {ranking['auc']:.2f} ({ranking['ups']} up, {ranking['downs']} down)")
    elif users.get("thumb_accuracy") is not None:
        gate.append(f"thumbs {users['thumb_accuracy']:.2f} on {users['thumbs']}")
    if run.get("thumb_ranking") and run.get("judge_accuracy") is not None and run["judge_verdicts"] != run["reward_pairs"]:
        gate.append(f"judged on both {run['judge_accuracy']:.2f} on {run['judge_verdicts']} "
                    f"({run['judge_accuracy_lower']:.2f})")
    if run.get("gate_kl") is not None:
        gate.append(f"KL {run['gate_kl']:.2f}")
    if run.get("gate_repetitive_rate"):
        gate.append(f"{run['gate_repetitive_rate']:.0%} repetitive")
    budget = run.get("ppo_kl_budget") or {}
    if budget.get("stopped_at") is not None:
        kept = budget["kept_iteration"]
        why = (f"{budget['final_greedy_repetitive_rate']:.0%} of greedy answers looped after the last update"
               if budget.get("stop_reason") == "loops" else
               f"at its KL budget ({budget['stop_kl']:.1f} > {budget.get('limit') or budget['max_kl']:.1f})"
               if budget.get("stop_kl") is not None else "on a KL that was not a number")
        gate.append(f"PPO stopped {why}, kept " + (f"iteration {kept}" if kept is not None else "nothing"))
    if budget.get("backtracks"):
        gate.append(f"PPO stepped back {len(budget['backtracks'])}x (KL "
                    + ", ".join(f"{b['kl']:.1f}" for b in budget["backtracks"])
                    + f" > {budget.get('limit') or budget['max_kl']:.1f})")
    sft = run.get("sft") or {}
    if sft.get("ran"):
        learnt = [f"{sft[k]} {k}" for k in ("demonstrations", "liked") if sft.get(k)]
        gate.append(f"SFT on {' + '.join(learnt) or sft['used']} (loss {sft['loss_before']:.2f} -> {sft['loss_after']:.2f})")
    kto = run.get("kto") or {}
    if kto.get("ran"):
        gate.append(f"KTO on {kto['used']} ({kto['liked']} liked; log-ratio {kto['liked_log_ratio']:+.1f} liked, "
                    f"{kto['disliked_log_ratio']:+.1f} disliked)")
    return f"{measured}; " + ", ".join(gate)


def plot_controls(controls: ControlsReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("win_rate_vs_round_0", "win rate vs round 0"), ("thumbs_up_rate", "thumbs-up rate (no noise)"),
              ("mean_words", "answer length (words)"), ("kl_to_base", "KL to base (nats)"),
              ("reward_accuracy", "judge: reward model's held-out accuracy")]
    fig, axes = plt.subplots(1, len(panels), figsize=(20, 4.2))
    for ax, (key, title) in zip(axes, panels):
        for label, report in zip(controls.labels, controls.runs):
            # The judge is measured by each round (its run row), the others on what served after it.
            values = [_run_number(r.run, key) if key == "reward_accuracy" else getattr(r, key) for r in report.rounds]
            ax.plot([r.round for r in report.rounds], values, marker="o", label=label)
        if key == "reward_accuracy":
            ax.set_ylim(-0.02, 1.02)
            ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
        if key in ("win_rate_vs_round_0", "thumbs_up_rate"):
            ax.set_ylim(-0.02, 1.02)
            ax.axhline(0.5 if key == "win_rate_vs_round_0" else controls.runs[0].rounds[0].thumbs_up_rate,
                       color="grey", linestyle="--", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("round")
    axes[0].legend(fontsize=7)
    first = controls.runs[0]
    fig.suptitle(f"Flywheel loop: '{first.measured_under}' with {first.noise:.0%} random votes and its controls "
                 f"(all measured under '{first.measured_under}')")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _run_number(run: dict, key: str) -> float:
    """A number of a round's run row, NaN where the round did not measure it (round 0, a skip)."""
    value = (run or {}).get(key)
    return float("nan") if value is None else float(value)


def print_controls(controls: ControlsReport) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"under '{controls.runs[0].measured_under}': win rate vs round 0 / thumbs up (no noise)")
    table.add_column("round", justify="right")
    for label in controls.labels:
        table.add_column(label, justify="right")
    for index in range(max(len(r.rounds) for r in controls.runs)):
        cells = [f"{r.rounds[index].win_rate_vs_round_0:.2f} / {r.rounds[index].thumbs_up_rate:.2f}"
                 if index < len(r.rounds) else "-" for r in controls.runs]
        table.add_row(str(index), *cells)
    Console(width=160).print(table)


async def run_with_controls(args) -> ControlsReport:
    """The runs of control_runs(args), one after another, or with --parallel all at once (each
    its own server, retraining service and database, and --threads torch threads of a round):
    on two cores three runs at one thread each finish sooner than three in a row at two, and
    every run still has its own budget."""
    runs = control_runs(args)
    controls = ControlsReport([label for label, _ in runs], [])
    out = Path(runs[0][1].out).parent
    for label, variant in runs:
        log.info("--- %s: preference %s, noise %.0f%%", label, variant.preference, variant.noise * 100)
    if args.parallel:
        controls.runs.extend(await asyncio.gather(*(run(variant, label) for label, variant in runs)))
        controls.write(out)
        return controls
    for label, variant in runs:
        controls.runs.append(await run(variant, label))
        controls.write(out)
    return controls


# -- the run --------------------------------------------------------------------------------------


def round_config_overrides(profile: dict, args) -> dict:
    """The round config the run's retraining service reads (RETRAIN_CONFIG_FILE): the profile's,
    then --round-config over it; the run's --seed seeds the rounds too (round.seed), so a repeat
    with another seed draws other PPO samples and data splits, not only other users."""
    overrides = {section: dict(fields) for section, fields in profile["config"].items()}
    overrides.setdefault("round", {})["seed"] = args.seed
    for section, fields in json.loads(args.round_config or "{}").items():
        overrides.setdefault(section, {}).update(fields)
    return overrides


async def run(args, label: str = "") -> Report:
    import httpx

    from deploy.base_model import resolve_base_model
    from retrain.gate import GateConfig

    profile = PROFILES[args.profile]
    days = args.rounds or profile["days"]
    conversations = args.conversations or profile["conversations"]
    max_new_tokens = args.max_new_tokens or profile["max_new_tokens"]
    voters = PREFERENCES[args.preference]
    preference = PREFERENCES[args.measure_preference or args.preference]  # what the numbers measure
    training, held_out = split_prompts(load_prompts(), args.held_out or profile["held_out"])
    rng = random.Random(args.seed)
    rng.shuffle(training)
    model_dir = resolve_base_model(args.model, Path(args.data_dir))
    edits_tag = f"-edits{round(args.edits * 100)}" if args.edits else ""
    out = Path(args.out or ROOT / "bench" / "out" / f"loop-{args.preference}-noise{int(args.noise * 100)}{edits_tag}")
    workdir = Path(tempfile.mkdtemp(prefix="bench-loop-"))
    config_overrides = round_config_overrides(profile, args)
    kl_bound = config_overrides.get("gate", {}).get("max_kl", GateConfig().max_kl)
    report = Report(
        when=datetime.now(UTC).isoformat(timespec="seconds"), preference=voters.name,
        description=voters.description, noise=args.noise, edits=args.edits, measured_under=preference.name,
        profile=args.profile,
        settings={**{k: v for k, v in vars(args).items()}, "days": days, "conversations": conversations,
                  "max_new_tokens": max_new_tokens, "retrain": profile["retrain"], "config": config_overrides,
                  "user_sampling": USER_SAMPLING},
        machine={"cpus": os.cpu_count(), "load_average": os.getloadavg(), "platform": platform.platform()},
        kl_bound=kl_bound,
        prompts={"file": str(PROMPTS.relative_to(ROOT)), "training": len(training), "held_out": len(held_out)},
    )
    started = time.monotonic()

    tag = f"{label}: " if label else ""  # which run, when controls run side by side

    def say(message: str) -> None:
        log.info("[%5.1f min] %s%s", (time.monotonic() - started) / 60, tag, message)

    config_file = workdir / "retrain-config.json"
    config_file.write_text(json.dumps(config_overrides))
    retrain_env = {
        **profile["retrain"],
        # The day's last vote starts its round: every conversation's edit comes before its votes,
        # so all of the day's edits are in by then. Edits alone start none: how many a day brings
        # is each user's coin, and a round started by them would leave the day's last conversations
        # to the next.
        "RETRAIN_MIN_NEW_FEEDBACK": str(conversations * FEEDBACK_PER_CONVERSATION), "RETRAIN_MIN_NEW_EDITS": "0",
        "RETRAIN_FEEDBACK_CHECK_SECONDS": "5", "RETRAIN_MAX_NEW_TOKENS": str(max_new_tokens),
        "RETRAIN_THREADS": str(args.threads), "RETRAIN_CONFIG_FILE": str(config_file), "AUTO_PROMOTE": "true",
    }
    report.settings["round_config"] = effective_round_config(retrain_env, model_dir)
    say(f"work directory {workdir}; preference '{voters.name}' ({voters.description}), "
        f"noise {args.noise:.0%}, edits {args.edits:.0%}{_measured(report)}; {len(training)} training prompts, "
        f"{len(held_out)} held out")
    with scratch_database(admin_url(args.database_url, workdir), "flywheel_bench_loop") as url:
        common = {"DATABASE_URL": url, "MODEL": str(model_dir), "DATA_DIR": str(workdir / "data"),
                  "LOG_LEVEL": "INFO"}
        port = free_port()
        server = start_process("server", [], {
            **common, "HOST": "127.0.0.1", "PORT": str(port), "ALLOW_ANONYMOUS": "true",
            "RATE_LIMIT_PER_MINUTE": "100000", "MAX_NEW_TOKENS_LIMIT": str(max(max_new_tokens, 256)),
        }, workdir / "server.log")
        retrain = start_process("retrain", ["serve"], {**common, **retrain_env}, workdir / "retrain.log")
        base_url = f"http://127.0.0.1:{port}"
        ws_url = base_url.replace("http://", "ws://") + "/ws"
        tokens = [f"loop-user-{i}-{uuid.uuid4().hex[:8]}" for i in range(args.users)]
        users = [SimulatedUser(voters, args.noise, random.Random(args.seed * 1000 + i), edits=args.edits)
                 for i in range(args.users)]
        chat_params = {**USER_SAMPLING, "max_new_tokens": max_new_tokens}
        measure_params = {"temperature": 0.0, "max_new_tokens": max_new_tokens}
        try:
            async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
                info = await wait_ready(client, server, args.start_timeout_s)
                say(f"server ready, serving {info['model_version']}; measuring round 0")
                evaluator = f"loop-evaluator-{uuid.uuid4().hex[:8]}"
                baseline = await measure(base_url, evaluator, held_out, measure_params)
                report.rounds.append(summarise(0, preference, held_out, baseline, None, 0.0, started, {}, voters))
                await asyncio.to_thread(report.write, out)
                say(_row_line(report.rounds[-1]))
                cursor = 0
                last_run = await asyncio.to_thread(latest_run_id, url)
                for day in range(1, days + 1):
                    elapsed = (time.monotonic() - started) / 60
                    longest = max((r.minutes - p.minutes for p, r in zip(report.rounds, report.rounds[1:])), default=0)
                    if elapsed + longest > args.budget_minutes:
                        report.stopped_because = (f"budget: {elapsed:.0f} min spent, a round took up to "
                                                  f"{longest:.0f} min, budget {args.budget_minutes:g} min")
                        break
                    today = [training[(cursor + i) % len(training)] for i in range(conversations)]
                    cursor += conversations
                    step = max(1, conversations // 4)
                    counts = await chat_day(
                        ws_url, tokens, today, users, chat_params,
                        lambda n: n % step == 0 and say(f"day {day}: {n}/{conversations} conversations"),
                    )
                    say(f"day {day}: feedback stored {counts}; waiting for the scheduler's round")
                    row = await wait_for_round(url, last_run, retrain, args.round_timeout_s, say)
                    last_run = row["id"]
                    summary = {**run_summary(row), "day_votes": counts}
                    say(f"round {row['id']} {row['status']} in {summary['minutes']:.1f} min: {summary['decision']}")
                    version, kl = await asyncio.to_thread(serving_checkpoint, url)
                    summary["swap_s"] = round(await wait_for_swap(client, version, args.swap_timeout_s), 2)
                    answers = await measure(base_url, evaluator, held_out, measure_params)
                    report.rounds.append(summarise(day, preference, held_out, answers, baseline, kl, started, summary,
                                                   voters))
                    report.minutes = round((time.monotonic() - started) / 60, 1)
                    await asyncio.to_thread(report.write, out)
                    say(_row_line(report.rounds[-1]))
                else:
                    report.stopped_because = f"{days} rounds done"
        finally:
            # Off the event loop: a server takes seconds to stop, and a run beside this one
            # (--parallel) must go on answering its websocket's pings meanwhile (it lost its
            # connection to a 20 s ping timeout while a finished run stopped its services).
            await asyncio.to_thread(stop_process, retrain)
            await asyncio.to_thread(stop_process, server)
    report.minutes = round((time.monotonic() - started) / 60, 1)
    await asyncio.to_thread(report.write, out)
    say(f"done: {report.stopped_because}; wrote {out / 'loop.json'} and {out / 'loop.png'} "
        f"(logs under {workdir})")
    return report


def _finite_mean(values) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite else None


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _row_line(r: RoundRow) -> str:
    return (f"round {r.round} ({r.model_version}): score {_number(r.score)}, thumbs up {r.thumbs_up_rate:.2f} "
            f"(users' rule {r.users_thumbs_up_rate:.2f}), "
            f"win vs round 0 {r.win_rate_vs_round_0:.2f}, KL {r.kl_to_base:.2f}, {r.mean_words:.0f} words, "
            f"EOS {r.eos_rate:.2f}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preference", choices=sorted(PREFERENCES), default="concise",
                        help="the simulated users' hidden preference")
    parser.add_argument("--noise", type=float, default=0.0, help="share of random votes (0..1)")
    parser.add_argument("--edits", type=float, default=0.0, metavar="SHARE",
                        help="share of conversations in which the user first edits the answer into "
                             "the one the preference wants (a demonstration), 0..1")
    parser.add_argument("--measure-preference", choices=sorted(PREFERENCES), default=None,
                        help="measure under this preference instead of the users' own (the verbose control "
                             "measured under concise)")
    parser.add_argument("--controls", action="store_true",
                        help="also run the controls in the same configuration (--noise 1.0; for concise, "
                             "verbose users measured under concise) and write them side by side")
    parser.add_argument("--parallel", action="store_true",
                        help="with --controls: run the result and its controls at the same time (use "
                             "--threads 1 on two cores)")
    parser.add_argument("--side-by-side", nargs="+", metavar="DIR", default=None,
                        help="run nothing: put the runs written under these directories (the result "
                             "first, then its controls) side by side under --out, as --controls does")
    parser.add_argument("--quick", dest="profile", action="store_const", const="quick", default="full",
                        help="2 short rounds on small budgets: shows the loop working, not learning much")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (days) to run (default: the profile's)")
    parser.add_argument("--conversations", type=int, default=None, help="conversations per day")
    parser.add_argument("--held-out", type=int, default=None, help="held-out prompts measured after each round")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="answer cap, chat and rounds alike")
    parser.add_argument("--users", type=int, default=8, help="simulated users chatting at once")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of a round (RETRAIN_THREADS)")
    parser.add_argument("--budget-minutes", type=float, default=90.0,
                        help="start no round that would end after this (the longest round so far is the guess)")
    parser.add_argument("--round-config", default=None,
                        help='JSON over the profile\'s round config, as RETRAIN_CONFIG_FILE takes it, e.g. '
                             '\'{"ppo": {"advantage_estimator": "gae"}}\' (see `python -m retrain config`): for '
                             'experiments; reported results use the shipped defaults')
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the simulated users, the prompt order and the rounds (round.seed)")
    parser.add_argument("--model", default=os.environ.get("MODEL"), help="model directory (default: converted SmolLM2)")
    parser.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "var"),
                        help="where the default model is converted once (rounds work in a temporary directory)")
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"),
                        help="a PostgreSQL server for the scratch database (default: an embedded one)")
    parser.add_argument("--start-timeout-s", type=float, default=300.0)
    parser.add_argument("--round-timeout-s", type=float, default=2400.0)
    parser.add_argument("--swap-timeout-s", type=float, default=120.0)
    parser.add_argument("--out", default=None, help="directory for loop.json and loop.png")
    args = parser.parse_args(argv)
    if not 0.0 <= args.noise <= 1.0:
        parser.error(f"--noise is a share of votes between 0 and 1, not {args.noise}")
    if not 0.0 <= args.edits <= 1.0:
        parser.error(f"--edits is a share of conversations between 0 and 1, not {args.edits}")
    if args.parallel and not args.controls:
        parser.error("--parallel runs the controls beside the result: it needs --controls")
    return args


def main(argv=None) -> None:
    from feedback.logs import configure_logging

    configure_logging()
    args = parse_args(argv)
    if args.side_by_side:
        first, *rest = (Path(d) for d in args.side_by_side)
        controls = side_by_side(first, rest, Path(args.out or first.parent / "controls"))
        print_controls(controls)
        return
    if args.controls:
        controls = run_until_terminated(run_with_controls(args))
        for report in controls.runs:
            print_table(report)
        print_controls(controls)
        return
    report = run_until_terminated(run(args))
    print_table(report)


if __name__ == "__main__":
    main()
