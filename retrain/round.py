"""One retraining round: logged feedback in, a gated and registered candidate out.

`run_round` reads top to bottom as the round runs:

  1. data       the store's comparisons, thumbs and prompts, split by prompt into a training
                side and a held-out side (retrain/data.py); too little of either: skipped.
  2. serving    the policy that serves now (from the registry; the base model when nothing
                has served yet) and its greedy answers to the held-out prompts, taken before
                PPO touches the weights.
  3. reward     the reward model refreshed: warm-started from the previous round's
                (DATA_DIR/reward/), trained on the training side, held-out pairwise accuracy,
                scores normalised so the serving policy's answers average 0.
  3b. SFT       the policy adapter imitates the training side's demonstrations (answers users
                edited into the ones they wanted; retrain/sft.py), when there are any.
  3c. KTO       with kto.enabled, the adapter learns the training side's thumbed answers:
                liked ones up, disliked ones down, relative to the base (retrain/kto.py).
  4. PPO        >= 1 iteration on a fresh sample of the training-side prompts, seeded by the
                round's own seed (`round_seed`): the serving adapter keeps training (or a fresh
                one starts on the base); reference = adapter off; with GAE the critic starts
                from the serving checkpoint's (`critic_start`). When PPO undid every update it
                made and no SFT or KTO ran, the candidate is the serving policy: the round ends
                rejected there, with nothing gated, saved or registered.
  5. gate       candidate vs serving on the held-out prompts, both greedy: reward-model win
                rate (with its confidence bound) and mean reward, the reward model's own
                held-out accuracy and how it ranks the users' verdicts on the serving policy's
                answers, the candidate's KL to the reference on its own answers, degeneration
                -> retrain/gate.decide.
  6. save       the adapter as a checkpoint (deploy/checkpoint.py; the manifest holds the full
                config, the data counts and ids, every metric; GAE's critic rides along as
                critic.safetensors), registered as a candidate or as
                rejected with the reasons; with AUTO_PROMOTE, a passing one is promoted unless
                the registry is pinned.

Every stage is timed into the run's `timings` (seconds) and counted into its `counts`; the
run is a row of `retrain_runs` (retrain/runs.py). A crash anywhere marks the run failed,
removes what this round wrote, and leaves serving as it was: nothing is promoted before
the last step, and the registry changes nothing on a failed call.

Under `accelerate launch --num_processes N -m retrain once` every process runs `run_round`:
the main process alone locks, records, reads the store, writes and registers; all of them
train and share the gate's work (retrain/ranks.py has the division). A process that dies
takes the launch down: the main process records the failure when it still can, and the next
round (or `python -m retrain once` with RETRAIN_LAUNCHER, retrain/launch.py) closes a run left
'running' and removes its reward model.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save as save_safetensors
from tqdm.auto import tqdm
from transformers import AutoConfig, GenerationConfig

from deploy import checkpoint, registry
from deploy.base_model import resolve_from_settings
from deploy.policy import load_base_policy, load_policy, save_checkpoint
from feedback.db import database_url

from .data import RoundData, read_round_data, too_little
from .gate import decide, degeneration, repetitive, thumb_ranking
from .ppo import (
    adapter_merged,
    answer_logits_and_hidden,
    eos_token_ids,
    left_pad,
    mask_after_eos,
    reference_policy,
    tokenize_prompts,
    train_ppo,
)
from .reward import MANIFEST as REWARD_MANIFEST
from .reward import accuracy_report, load_reward_model, read_manifest, train_reward_model
from .reward_data import RewardData
from .ranks import gather, my_share, share, this_process
from .runs import Run, recorded_run, recording_outcome, stop_if_asked
from .settings import RetrainConfig, RetrainSettings
from .kto import kto_before_ppo
from .sft import sft_before_ppo

log = logging.getLogger(__name__)

ACTOR = "retrain"  # who the registry records for everything a round does

# Each timed stage and the part of the breakdown it belongs to (`python -m retrain once`).
STAGES = {
    "read_data": "data",
    "load_policy": "load",
    "gate_serving_answers": "gate",
    "reward_training": "training",
    "load_reward_model": "load",
    "sft": "training",
    "kto": "training",
    "ppo_setup": "load",
    "ppo_rollouts": "generation",
    "ppo_forward": "training",
    "ppo_scoring": "scoring",
    "ppo_update": "training",
    "gate_candidate_answers": "gate",
    "gate_scoring": "gate",
    "gate_kl": "gate",
    "save": "save",
    "register": "save",
}


class RoundFailed(RuntimeError):
    """The round crashed; its run row says failed with the traceback, serving is unchanged."""

    def __init__(self, run_id: int, cause: BaseException):
        super().__init__(f"retrain run {run_id} failed: {type(cause).__name__}: {cause}")
        self.run_id = run_id


@dataclass
class RoundResult:
    run_id: int
    status: str  # 'succeeded' (a passing candidate), 'rejected' (the gate said no, or PPO kept nothing), 'skipped'
    reason: str  # the skip reason, the gate's summary, or why there was no candidate
    candidate_id: str | None = None
    promoted: bool = False
    counts: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class GateAnswers:
    """Greedy answers to the held-out prompts, with the tensors the KL measure re-reads."""

    texts: list[str]
    ended_with_eos: list[bool]
    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]  # query ids/mask, answer ids/mask

    def gathered(self, ranks: PartialState) -> GateAnswers:
        """Every process's answers in prompt order (the tensors stay with the process that made them)."""
        return GateAnswers(gather(ranks, self.texts), gather(ranks, self.ended_with_eos), [])


@dataclass
class RoundPlan:
    """What the main process read and decided before the round trains, shared with every process."""

    config: RetrainConfig
    data: RoundData
    skip: str | None = None  # why the round ends here (too little data)
    serving: registry.Checkpoint | None = None
    adapter_base: Path | None = None  # the full-weights directory the policy's adapter sits on
    warm_start: Path | None = None  # the previous reward model, or None: a fresh one


# -- the round ------------------------------------------------------------------------------------


def run_round(settings: RetrainSettings, trigger: str = "manual", *, url: str | None = None) -> RoundResult:
    """Run one round now (refused with RoundAlreadyRunning while another holds the lock).

    Every process of a launch calls this; each returns the round's result, and only the main
    process's carries the candidate id and the promotion."""
    ranks = this_process()  # its place in `accelerate launch`, or the only process
    if ranks.is_main_process:
        url = url or database_url(settings)  # the other processes never touch the database
    written: list[Path] = []  # what the main process wrote: removed again if the round fails
    run_id = None
    try:
        with ExitStack() as recording:
            # The main process takes the lock and opens the run's row; the others get a copy.
            run = share(ranks, lambda: recording.enter_context(recorded_run(url, trigger)))
            run_id = run.id
            started = time.perf_counter()
            result = _round(run, settings, url, written, ranks)
            run.timings["total"] = time.perf_counter() - started
            result.timings = dict(run.timings)
        return result
    except BaseException as exc:
        if ranks.is_main_process:
            with recording_outcome():
                for path in written:
                    shutil.rmtree(path, ignore_errors=True)
        # Refused lock (no run row) and interrupts pass through as they are.
        if run_id is None or not isinstance(exc, Exception):
            raise
        raise RoundFailed(run_id, exc) from exc


def _round(run: Run, settings: RetrainSettings, url: str | None, written: list[Path], ranks: PartialState) -> RoundResult:
    timed = _stopwatch(run.timings)

    # 1. Data, read by the main process: what the store allows training on; too little and the
    # round ends here, having touched nothing but its own row. Every process gets the same plan.
    with timed("read_data"):
        plan = share(ranks, lambda: _plan(run, settings, url))
    config, data = plan.config, plan.data
    run.counts.update(data.counts)
    if plan.skip:
        run.status = "skipped"
        run.metrics["skipped"] = plan.skip
        log.info("round skipped: %s", plan.skip)
        return RoundResult(run.id, "skipped", plan.skip, counts=dict(run.counts), metrics=dict(run.metrics))
    serving, adapter_base = plan.serving, plan.adapter_base
    run.metrics["serving"] = serving.id
    run.metrics["processes"] = ranks.num_processes

    # 2. The serving policy, and its answers to the held-out prompts before PPO changes it. Each
    # process answers its share of the prompts (`mine`); the answers are gathered for all.
    with timed("load_policy"):
        policy, tokenizer = _load_serving(serving, adapter_base, ranks.device)
        kept, gate_tokens = tokenize_prompts(tokenizer, [p.messages for p in data.gate_prompts], config.ppo.max_prompt_tokens)
        gate_prompts = [data.gate_prompts[i].messages for i in kept]
        frozen = copy.deepcopy(policy).requires_grad_(False) if not config.ppo.use_lora else None
    run.counts["gate_prompts_used"] = len(gate_prompts)
    if len(gate_prompts) < config.round.min_gate_prompts:
        raise ValueError(f"only {len(gate_prompts)} held-out prompts fit {config.ppo.max_prompt_tokens} tokens")
    my_prompts, my_tokens = my_share(ranks, gate_prompts), my_share(ranks, gate_tokens)
    with timed("gate_serving_answers"):
        my_serving_answers = greedy_answers(policy, tokenizer, my_tokens, config, "gate: serving answers")
        serving_answers = my_serving_answers.gathered(ranks)

    # 3. Reward refresh: warm start from the previous round's model, normalised on serving's
    # answers; every process trains, the main process writes it.
    reward_dir = settings.reward_dir / f"run-{run.id:06d}"
    with timed("reward_training"):
        written.append(reward_dir)
        reward_metrics = train_reward_model(
            data.reward_train, config.reward, reward_dir,
            eval_data=data.reward_held_out,
            reference=list(zip(gate_prompts, serving_answers.texts)),
            init_from=plan.warm_start,
        )
    run.metrics["reward"] = _reward_summary(reward_metrics, reward_dir)
    with timed("load_reward_model"):
        reward_model = load_reward_model(reward_dir, base_model=str(adapter_base)).to(ranks.device)

    # 3b. SFT on the training side's demonstrations, and liked answers when sft.liked_answers
    # (retrain/sft.py): PPO starts from it; the reference stays the base (adapter off).
    policy = sft_before_ppo(run, policy, tokenizer, data.demonstrations, data.liked, config)
    # 3c. KTO on the training side's thumbed answers when kto.enabled (retrain/kto.py).
    policy = kto_before_ppo(run, policy, tokenizer, data.thumbed, config)

    # 4. PPO on the training-side prompts: each process samples its own share of every batch.
    ppo_started = time.perf_counter()
    critic_init, run.metrics["critic_from"] = critic_start(serving, reward_model, config)
    result = train_ppo(
        policy, tokenizer, [p.messages for p in data.ppo_prompts], reward_model.score_answers,
        config.ppo, value_head_init=critic_init,
        # PPO penalises what the gate will reject: repetition by the gate's own test.
        is_repetitive=functools.partial(
            repetitive, n=config.gate.repetition_ngram, min_distinct_ratio=config.gate.min_distinct_ngram_ratio
        ),
    )
    _add_ppo_timings(run.timings, result.stats, time.perf_counter() - ppo_started, result.kl_budget)
    run.counts.update({f"ppo_{k}": v for k, v in result.counts.items()})
    # The last iteration trained; with the KL budget the candidate may be an earlier one's weights
    # (kl_budget.kept_iteration: 0 is the policy the round started from, when its first update went over).
    run.metrics["ppo"] = {
        "iterations": result.stats, "last": result.stats[-1] if result.stats else None, "kl_budget": result.kl_budget,
    }
    # Every update was undone (over the KL budget, or looping), and no SFT or KTO ran: the candidate is the
    # serving policy itself, which the gate could only call a tie. Nothing to judge, save or register.
    if not result.moved and not run.metrics["sft"]["ran"] and not run.metrics["kto"]["ran"]:
        reason = ("PPO kept no update (each one it made was undone: over its KL budget, or looping) and no SFT "
                  "or KTO ran: the candidate would be the serving policy, so nothing was gated or registered")
        log.warning("round rejected: %s", reason)
        run.status = "rejected"
        run.metrics["decision"] = {"passed": False, "reasons": [reason], "summary": reason}
        if ranks.is_main_process:
            written.remove(reward_dir)  # the refreshed judge is still the next round's warm start
            prune_reward_models(settings.reward_dir, config.round.keep_reward_models)
        return RoundResult(run.id, run.status, reason, counts=dict(run.counts), metrics=dict(run.metrics))
    candidate = result.model

    # 5. Gate: the same held-out prompts, greedy, judged by the refreshed reward model. Each
    # process answers, scores and measures its share; every process sees all the numbers.
    with timed("gate_candidate_answers"):
        my_candidate_answers = greedy_answers(candidate, tokenizer, my_tokens, config, "gate: candidate answers")
        candidate_answers = my_candidate_answers.gathered(ranks)
    with timed("gate_scoring"):
        candidate_scores = gather(ranks, reward_model.score_answers(my_prompts, my_candidate_answers.texts).tolist())
        serving_scores = gather(ranks, reward_model.score_answers(my_prompts, my_serving_answers.texts).tolist())
    with timed("gate_kl"):
        kl_per_answer = gather(ranks, kl_to_reference(candidate, frozen, my_candidate_answers, config.ppo.temperature))
    kl = sum(kl_per_answer) / len(kl_per_answer)
    with timed("gate_scoring"):
        users = users_on_serving_answers(reward_model, data.reward_held_out, serving.id)
        thumbs = held_out_thumb_ranking(reward_model, data.reward_held_out)
    decision = decide(
        candidate_scores, serving_scores, kl,
        degeneration(candidate_answers.texts, candidate_answers.ended_with_eos, config.gate),
        degeneration(serving_answers.texts, serving_answers.ended_with_eos, config.gate),
        config.gate,
        reward_accuracy=reward_metrics["eval_accuracy"], reward_pairs=reward_metrics["eval_pairs"], users=users,
        thumbs=thumbs,
    )
    run.metrics["gate"] = decision.metrics
    run.metrics["decision"] = {"passed": decision.passed, "reasons": decision.reasons, "summary": decision.summary()}
    run.metrics["examples"] = _examples(gate_prompts, serving_answers, candidate_answers, serving_scores, candidate_scores)
    log.info(decision.summary())
    run.status = "succeeded" if decision.passed else "rejected"
    if not ranks.is_main_process:  # the rest is the main process's: save, register, promote
        return RoundResult(run.id, run.status, decision.summary(), counts=dict(run.counts), metrics=dict(run.metrics))

    # 6. Save, register (candidate or rejected), promote when allowed.
    candidate_id = checkpoint.new_checkpoint_id("rl")
    path = settings.checkpoints_dir / candidate_id
    with timed("save"):
        written.append(path)
        save_checkpoint(
            path, candidate,
            checkpoint_id=candidate_id,
            parent_id=serving.id,
            base_model=checkpoint.base_model_name(adapter_base),
            config={**config.to_json(),
                    "round": {**asdict(config.round), "run_id": run.id, "trigger": run.trigger,
                              "processes": ranks.num_processes},  # batch sizes are per process
                    "serving": serving.id, "reward_model": str(reward_dir), "data": data.trace()},
            data_counts={k: v for k, v in run.counts.items() if isinstance(v, int)},
            metrics={"reward": run.metrics["reward"], "ppo": run.metrics["ppo"], "gate": decision.metrics,
                     "decision": run.metrics["decision"]},
            extra_files=critic_files(result.value_head) if config.ppo.uses_critic else None,
        )
    summary = _registry_metrics(run, decision, kl)
    promoted = False
    with timed("register"):
        with registry.connect(url) as conn:
            if decision.passed:
                registry.register(conn, path, actor=ACTOR, reason=decision.summary(), metrics=summary)
            else:
                registry.register(conn, path, actor=ACTOR, status="rejected",
                                  reason="gate: " + "; ".join(decision.reasons), metrics=summary)
            written.remove(path)  # registered: the registry owns it now, even if promotion fails
            if decision.passed and config.round.auto_promote:
                promoted = _promote(conn, candidate_id, decision, run.metrics)
    written.remove(reward_dir)  # this round's reward model is the next round's warm start
    prune_reward_models(settings.reward_dir, config.round.keep_reward_models)

    run.candidate_id = candidate_id
    return RoundResult(run.id, run.status, decision.summary(), candidate_id, promoted,
                       dict(run.counts), dict(run.metrics))


# -- stages ---------------------------------------------------------------------------------------


def _stopwatch(timings: dict):
    @contextmanager
    def timed(stage: str) -> Iterator[None]:
        stop_if_asked(stage)  # `retrain serve` got SIGTERM: the round ends here, interrupted
        started = time.perf_counter()
        try:
            yield
        finally:
            timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - started
            log.info("stage %s: %.1f s", stage, timings[stage])

    return timed


def _plan(run: Run, settings: RetrainSettings, url: str) -> RoundPlan:
    """The main process's reading: the config, the data, whether to skip, the serving policy and
    the reward model to warm-start from."""
    config = settings.retrain_config()
    seed = round_seed(config.round.seed, run.id)
    config.reward.seed = config.ppo.seed = config.sft.seed = config.kto.seed = seed  # recorded in the checkpoint's config
    data = read_round_data(
        url,
        held_out_percent=config.round.held_out_percent,
        max_ppo_prompts=config.round.max_ppo_prompts,
        max_gate_prompts=config.round.max_gate_prompts,
        max_reward_examples=config.round.max_reward_examples,
        seed=seed,  # each round its own sample of the reward data and of the PPO prompts
    )
    reason = too_little(data, config.round.min_pairs, config.round.min_prompts, config.round.min_gate_prompts)
    if reason:
        return RoundPlan(config, data, skip=reason)
    serving, adapter_base = _serving_policy(url, settings)
    config.reward.base_model = str(adapter_base)
    forget_reward_models(settings.reward_dir, run.abandoned)  # a dead round's is no warm start
    return RoundPlan(config, data, serving=serving, adapter_base=adapter_base,
                     warm_start=previous_reward_model(settings.reward_dir, adapter_base))


def round_seed(run_seed: int, run_id: int) -> int:
    """The seed of one round: derived from the configured seed and the run's id, so rounds
    differ from each other (their reward-data sample, PPO prompts, sampling, initialisation)
    and a round can be replayed from its two numbers. A hash rather than a sum: seed 1 run 2
    and seed 2 run 1 must not collide."""
    digest = hashlib.sha256(f"{run_seed}:{run_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def _serving_policy(url: str, settings: RetrainSettings) -> tuple[registry.Checkpoint, Path]:
    """The serving checkpoint, and the full-weights directory its adapter sits on (the base
    model for the base itself and for adapters trained on it). Nothing served yet: the base
    model from MODEL / DATA_DIR is registered and serves, as a server does at its first start."""
    with registry.connect(url) as conn:
        state = registry.read_state(conn)
        if state.serving is None:
            registry.register_base(conn, resolve_from_settings(settings), actor=ACTOR)
            state = registry.read_state(conn)
        serving = registry.get(conn, state.serving.id)
        ancestor = serving
        while ancestor.kind != "full":
            if ancestor.parent_id is None:
                raise ValueError(f"checkpoint {ancestor.id} is an adapter with no parent: its base model is unknown")
            ancestor = registry.get(conn, ancestor.parent_id)
    adapter_base = Path(ancestor.path)
    if settings.model and Path(settings.model).resolve() != adapter_base.resolve() and ancestor.is_base:
        log.warning("MODEL=%s, but the serving policy %s builds on %s: training on the latter",
                    settings.model, serving.id, adapter_base)
    return serving, adapter_base


def _load_serving(serving: registry.Checkpoint, adapter_base: Path, device: torch.device):
    """The serving policy as PPO's starting point: an adapter stays a separate PeftModel, so PPO
    keeps training it and the reference (adapter off) is the base it was trained on."""
    if serving.kind == "lora":
        policy = load_policy(Path(serving.path), base_model_dir=adapter_base, merge=False)
    else:
        policy = load_base_policy(Path(serving.path))
    return policy.model.to(device), policy.tokenizer


@torch.no_grad()
def greedy_answers(model, tokenizer, prompt_tokens: Sequence[Sequence[int]], config: RetrainConfig, desc: str) -> GateAnswers:
    """Greedy answers (the same decoding for candidate and serving, so only the weights differ)."""
    eos_ids = eos_token_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    generation = GenerationConfig(
        do_sample=False, max_new_tokens=config.round.gate_max_new_tokens,
        eos_token_id=list(eos_ids), pad_token_id=pad_id,
    )
    device = next(model.parameters()).device
    size = config.round.gate_batch_size
    answers = GateAnswers([], [], [])
    model.eval()
    quiet = not this_process().is_local_main_process  # one progress bar per machine
    for start in tqdm(range(0, len(prompt_tokens), size), desc=desc, unit="batch", dynamic_ncols=True, disable=quiet):
        query_ids, query_mask = left_pad(prompt_tokens[start : start + size], pad_id, device)
        with adapter_merged(model):
            out = model.generate(input_ids=query_ids, attention_mask=query_mask, generation_config=generation)
        response_ids, mask, has_eos = mask_after_eos(out[:, query_ids.shape[1] :], eos_ids, pad_id)
        answers.batches.append((query_ids, query_mask, response_ids, mask))
        answers.texts += [
            tokenizer.decode(ids[:length], skip_special_tokens=True).strip()
            for ids, length in zip(response_ids.tolist(), mask.sum(1).tolist())
        ]
        answers.ended_with_eos += has_eos.tolist()
    return answers


@torch.no_grad()
def kl_to_reference(policy, frozen_reference, answers: GateAnswers, temperature: float) -> list[float]:
    """KL(policy || reference) in nats per answer: the exact per-token KL of the two next-token
    distributions (logits / T, as PPO measures it), summed over each answer's tokens.

    Exact rather than sampled: the gate's answers are greedy, so a log-prob ratio of the chosen
    tokens alone would not estimate the KL."""
    per_answer = []
    for query_ids, query_mask, response_ids, mask in answers.batches:
        args = (query_ids, query_mask, response_ids, mask, temperature)
        logits, _ = answer_logits_and_hidden(policy, *args)
        with reference_policy(policy, frozen_reference) as reference:
            ref_logits, _ = answer_logits_and_hidden(reference, *args)
        logp, ref_logp = torch.log_softmax(logits, -1), torch.log_softmax(ref_logits, -1)
        per_token = (logp.exp() * (logp - ref_logp)).sum(-1)
        per_answer += (per_token * mask).sum(1).tolist()
    return per_answer


def previous_reward_model(reward_dir: Path, base_model: Path) -> Path | None:
    """The newest reward model trained on the same base: the warm start (None: a fresh one)."""
    for path in sorted(Path(reward_dir).glob("run-*"), reverse=True):
        if not (path / REWARD_MANIFEST).is_file():
            continue
        trained_on = read_manifest(path)["config"].get("base_model", "")
        if trained_on and Path(trained_on).resolve() == Path(base_model).resolve():
            return path
        log.info("not warm-starting from %s: trained on %s, not %s", path, trained_on, base_model)
    return None


def prune_reward_models(reward_dir: Path, keep: int) -> None:
    for path in sorted(Path(reward_dir).glob("run-*"), reverse=True)[max(keep, 1):]:
        shutil.rmtree(path, ignore_errors=True)


def forget_reward_models(reward_dir: Path, run_ids: Sequence[int]) -> None:
    """Remove the reward models of runs that died (marked failed after the fact): like a failed
    round's own, they must not become a later round's warm start."""
    for run_id in run_ids:
        path = Path(reward_dir) / f"run-{run_id:06d}"
        if path.exists():
            log.warning("removing %s: its round died before finishing", path)
            shutil.rmtree(path, ignore_errors=True)


def users_on_serving_answers(reward_model, held_out: RewardData, version: str) -> dict | None:
    """How the reward model ranks the users' own held-out verdicts on answers `version` wrote
    (pairs whose two answers it wrote; thumbs on its answers): the judge checked against the
    people, on the policy being replaced. None when the held-out side has none."""
    theirs = held_out.written_by(version)
    pairs = [(group.prompt, pair) for group in theirs.groups for pair in group.pairs if not pair.tie]
    if not pairs and not theirs.thumbs:
        return None
    conversations = [c for prompt, pair in pairs for c in ((prompt, pair.chosen), (prompt, pair.rejected))]
    conversations += [(thumb.prompt, thumb.answer) for thumb in theirs.thumbs]
    raw = reward_model.score(conversations, normalized=False).tolist()
    margins = [raw[2 * i] - raw[2 * i + 1] for i in range(len(pairs))]
    thumb_scores = raw[2 * len(pairs):]
    correct = sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins)
    thumbs_correct = sum((score > 0) == (thumb.label > 0) for score, thumb in zip(thumb_scores, theirs.thumbs))
    return {"version": version, **accuracy_report(correct, len(pairs), thumbs_correct, len(theirs.thumbs))}


def held_out_thumb_ranking(reward_model, held_out: RewardData) -> dict | None:
    """How the reward model ranks every held-out thumb, whichever policy wrote the answer: the
    share of (up, down) answer pairs it scores in the users' order (`gate.thumb_ranking`)."""
    if not held_out.thumbs:
        return None
    scores = reward_model.score([(t.prompt, t.answer) for t in held_out.thumbs], normalized=False).tolist()
    return thumb_ranking(scores, [t.label > 0 for t in held_out.thumbs])


CRITIC_FILE = "critic.safetensors"  # GAE's value head, inside the checkpoint it was trained with


def critic_files(value_head) -> dict[str, bytes]:
    """The trained value head as a checkpoint file: the next round's critic starts from it."""
    state = {name: tensor.detach().float().cpu().contiguous() for name, tensor in value_head.state_dict().items()}
    return {CRITIC_FILE: save_safetensors(state)}


def critic_start(serving: registry.Checkpoint, reward_model, config: RetrainConfig) -> tuple[Any, str]:
    """Where GAE's critic starts, and a word saying which: the critic trained with the serving
    checkpoint (kept across rounds); else the reward model's head, when both read the same
    features (the base's last layer); else zero (a reward model cut to its bottom blocks reads
    other features), to be warmed up on the first batch before the policy moves. The group
    estimators have no critic."""
    if not config.ppo.uses_critic:
        return None, "none"
    saved = Path(serving.path) / CRITIC_FILE
    if saved.is_file():
        return load_safetensors(saved), f"checkpoint {serving.id}"
    depth = reward_model.body.config.num_hidden_layers
    policy_depth = AutoConfig.from_pretrained(reward_model.config.base_model).num_hidden_layers
    if depth == policy_depth:
        return reward_model.head, "reward model head"
    return None, "zero"


def _reward_summary(metrics: dict, path: Path) -> dict:
    keep = ("eval_accuracy", "eval_pairs", "eval_accuracy_interval", "eval_thumb_accuracy", "eval", "counts", "steps", "trainable_parameters",
            "warm_started_from", "pairs_per_second", "train_seconds", "normalization")
    return {"path": str(path), **{k: metrics.get(k) for k in keep}}


def _add_ppo_timings(timings: dict, stats: list[dict], wall: float, kl_budget: dict) -> None:
    parts = {"ppo_rollouts": ("generation_s", "greedy_s"), "ppo_forward": ("forward_s",),
             "ppo_scoring": ("scoring_s",), "ppo_update": ("training_s",)}  # fmt: skip
    for stage, keys in parts.items():
        timings[stage] = timings.get(stage, 0.0) + sum(s.get(key, 0.0) for s in stats for key in keys)
    # The checks after the last update (greedy answers, the KL budget's rollouts) count as rollouts.
    budget_check = kl_budget.get("final_check_s", 0.0) + kl_budget.get("final_greedy_s", 0.0)
    timings["ppo_rollouts"] += budget_check
    # What the iterations do not account for: wrapping the policy in LoRA, the optimiser, tokenising.
    trained = sum(s["iteration_s"] for s in stats) + budget_check
    timings["ppo_setup"] = timings.get("ppo_setup", 0.0) + max(0.0, wall - trained)


def _examples(prompts, serving: GateAnswers, candidate: GateAnswers, serving_scores, candidate_scores, n: int = 3) -> list[dict]:
    """A few held-out answers side by side: what the numbers meant, for a person reading the run."""
    return [
        {"prompt": prompts[i][-1]["content"][:200], "serving": serving.texts[i][:300], "candidate": candidate.texts[i][:300],
         "serving_score": serving_scores[i], "candidate_score": candidate_scores[i]}
        for i in range(min(n, len(prompts)))
    ]


def _registry_metrics(run: Run, decision, kl: float) -> dict[str, Any]:
    """The headline numbers on the registry row (`python -m deploy list` shows them)."""
    m = decision.metrics
    return {
        "run_id": run.id,
        "gate_passed": decision.passed,
        "win_rate": m["win_rate"],
        "win_rate_lower": m["win_rate_lower"],
        "candidate_reward": m["candidate_reward"],
        "serving_reward": m["serving_reward"],
        "kl": kl,
        "reward_accuracy": m["reward_accuracy"],
        "reward_pairs": m["reward_pairs"],
        "judge_accuracy": m["judge_accuracy"],  # pairs and, when they count, held-out thumbs
        "judge_verdicts": m["judge_verdicts"],
        "gate_prompts": m["prompts"],
    }


def _promote(conn, candidate_id: str, decision, metrics: dict) -> bool:
    m = decision.metrics
    reason = (f"gate passed: win rate {m['win_rate']:.3f} (at least {m['win_rate_lower']:.3f}), reward "
              f"{m['candidate_reward']:+.3f} vs {m['serving_reward']:+.3f}, KL {m['kl']:.3f} nats on "
              f"{m['prompts']} held-out prompts, judge accuracy "
              + (f"{m['judge_accuracy']:.3f} on {m['judge_verdicts']} {'verdicts' if m['judge_counts_thumbs'] else 'pairs'}"
                 if m["judge_accuracy"] is not None else "untested"))
    try:
        registry.promote(conn, candidate_id, actor=ACTOR, reason=reason, auto=True)
    except registry.Pinned as exc:
        metrics["promotion"] = {"promoted": False, "reason": exc.message}
        log.info("candidate %s not promoted: %s", candidate_id, exc.message)
        return False
    metrics["promotion"] = {"promoted": True, "reason": reason}
    log.info("promoted %s: %s", candidate_id, reason)
    return True


def breakdown(timings: dict[str, float]) -> list[tuple[str, str, float]]:
    """(stage, part, seconds) in the order the round runs, for the time table."""
    return [(stage, part, timings[stage]) for stage, part in STAGES.items() if stage in timings]


def totals_by_part(timings: dict[str, float]) -> dict[str, float]:
    parts: dict[str, float] = {}
    for stage, part, seconds in breakdown(timings):
        parts[part] = parts.get(part, 0.0) + seconds
    return parts
