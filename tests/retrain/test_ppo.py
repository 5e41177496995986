"""PPO: the pure pieces against hand-computed cases, the model plumbing against plain forwards,
and a short PPO run on a planted reward (tiny Llama, real SmolLM2 tokenizer, seconds)."""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from retrain.ppo import (
    AdaptiveKLController,
    adapter_merged,
    FixedKLController,
    KLBudget,
    PPOConfig,
    RunningMoments,
    answer_logits_and_hidden,
    apply_no_eos_penalty,
    apply_repetition_penalty,
    compute_gae,
    greedy_loops,
    group_advantages,
    kl_penalised_rewards,
    left_pad,
    make_value_head,
    mask_after_eos,
    masked_whiten,
    normalise_scores,
    prepare_policy,
    reference_policy,
    repeated_ngram_mask,
    reward_to_go,
    token_logprobs,
    train_ppo,
    unlikelihood_loss,
    warm_up_critic,
    whiten_sequences,
)

EOS = 2  # <|im_end|> in SmolLM2's tokenizer, also its pad token


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A 64-wide model gains nothing from threads, and on a busy 2-core machine the thread pool's
    waiting made these tests several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    """SmolLM2's real tokenizer, as the shared tiny model carries it."""
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def tiny_llama(tiny_model_dir: Path) -> LlamaForCausalLM:
    """A fresh copy of the shared tiny Llama (2 layers, width 64, SmolLM2's 49k vocabulary)."""
    return LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()


# --- a tiny "SFT" policy with something to choose between --------------------------------------
# A random Llama over 49k tokens is near uniform: no answer would ever contain a planted word, and
# PPO would have no signal. So the base policy is first taught four answers, equally likely for
# every prompt; the planted reward then prefers one of them. Like a real SFT model, it ends its
# answers with EOS.
PROMPTS = ["Tell me something.", "Say anything.", "What is on your mind?", "Give me a fact.",
           "Talk to me.", "Share a thought."]  # fmt: skip
ANSWERS = ["I like cats.", "The sky is blue.", "Water is wet.", "Bread is tasty."]
TARGET = "I like cats."


def conversation(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template(conversation(prompt), add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def answer_ids(tokenizer, answer: str) -> list[int]:
    return tokenizer(answer, add_special_tokens=False)["input_ids"] + [EOS]


@pytest.fixture(scope="module")
def sft_state(tokenizer, tiny_model_dir) -> dict[str, torch.Tensor]:
    """Weights of the tiny base policy after a short supervised fit on every (prompt, answer)."""
    return supervised_fit(tokenizer, tiny_model_dir, ANSWERS)


def supervised_fit(tokenizer, tiny_model_dir: Path, answers: list[str]) -> dict[str, torch.Tensor]:
    """The tiny Llama fitted to answer every prompt with each of `answers` (equally likely)."""
    model = tiny_llama(tiny_model_dir)
    torch.manual_seed(0)
    with torch.no_grad():  # larger embeddings: the tied output layer can turn peaky in a few steps
        model.model.embed_tokens.weight.normal_(0, 0.1)
    rows = [(prompt_ids(tokenizer, p), answer_ids(tokenizer, a)) for p in PROMPTS for a in answers]
    ids = [p + a for p, a in rows]
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), EOS)
    attention = torch.zeros((len(ids), width), dtype=torch.long)
    predicts_answer = torch.zeros((len(ids), width), dtype=torch.bool)  # position -> next is answer
    for row, ((p, a), seq) in enumerate(zip(rows, ids)):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        attention[row, : len(seq)] = 1
        predicts_answer[row, len(p) - 1 : len(seq) - 1] = True
    targets = torch.roll(input_ids, -1, dims=1)[predicts_answer]
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(50):
        hidden = model.model(input_ids=input_ids, attention_mask=attention).last_hidden_state
        # The 49k-way output layer only where an answer token is predicted: most of the cost.
        loss = torch.nn.functional.cross_entropy(model.lm_head(hidden[predicts_answer]), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return copy.deepcopy(model.state_dict())


@pytest.fixture
def sft_model(tiny_model_dir, sft_state) -> LlamaForCausalLM:
    model = tiny_llama(tiny_model_dir)
    model.load_state_dict(sft_state)
    return model.eval()


def answer_probability(lm, tokenizer, prompt: str, answer: str) -> float:
    """Exact probability (temperature 1) that `lm` answers `prompt` with `answer` then EOS."""
    query = torch.tensor([prompt_ids(tokenizer, prompt)])
    response = torch.tensor([answer_ids(tokenizer, answer)])
    with torch.no_grad():
        logits, _ = answer_logits_and_hidden(
            lm, query, torch.ones_like(query), response, torch.ones_like(response), 1.0
        )
    return token_logprobs(logits, response).sum().exp().item()


# --- pure pieces ---------------------------------------------------------------------------------


def test_gae_matches_hand_computed_case():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.5, 3.0, 7.0]])
    values = torch.tensor([[0.5, 1.0, -1.0], [2.0, 1.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # row 1 ended after two tokens
    advantages, returns = compute_gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # Row 0, delta_t = r_t + V_{t+1} - V_t with V after the end = 0:
    #   t=2: 2 + 0 - (-1) = 3              -> A2 = 3
    #   t=1: 0 + (-1) - 1 = -2             -> A1 = -2 + 0.5 * 3 = -0.5
    #   t=0: 1 + 1 - 0.5 = 1.5             -> A0 = 1.5 + 0.5 * -0.5 = 1.25
    # Row 1 (the masked reward 7 and value 9 must not leak in):
    #   t=1: 3 + 0 - 1 = 2                 -> A1 = 2
    #   t=0: 0.5 + 1 - 2 = -0.5            -> A0 = -0.5 + 0.5 * 2 = 0.5
    assert torch.allclose(advantages, torch.tensor([[1.25, -0.5, 3.0], [0.5, 2.0, 0.0]]))
    assert torch.allclose(returns, torch.tensor([[1.75, 0.5, 2.0], [2.5, 3.0, 0.0]]))


def test_gae_with_lambda_one_and_no_values_is_reward_to_go():
    rewards = torch.tensor([[0.1, -0.2, 1.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    advantages, _ = compute_gae(rewards, torch.zeros(1, 4), mask, gamma=0.9, lam=1.0)
    # 1.0 | -0.2 + 0.9 * 1.0 = 0.7 | 0.1 + 0.9 * 0.7 = 0.73
    assert torch.allclose(advantages, torch.tensor([[0.73, 0.7, 1.0, 0.0]]))


def test_rloo_advantages_on_a_small_group_by_hand():
    """Two prompts, k = 3 answers each (rows 0-2: prompt 0, rows 3-5: prompt 1). RLOO: the
    return minus the mean of the group's other two returns."""
    returns = torch.tensor([1.0, 2.0, 6.0, -1.0, -1.0, 2.0])
    advantages = group_advantages(returns, 3, "rloo")
    # 1 - (2 + 6)/2 = -3 | 2 - (1 + 6)/2 = -1.5 | 6 - (1 + 2)/2 = 4.5
    # -1 - (-1 + 2)/2 = -1.5 | -1.5 | 2 - (-1 - 1)/2 = 3
    assert advantages.tolist() == [-3.0, -1.5, 4.5, -1.5, -1.5, 3.0]
    # Equal returns teach nothing: every advantage 0.
    assert group_advantages(torch.tensor([0.7, 0.7]), 2, "rloo").tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(returns, 4, "rloo")


def test_grpo_normalises_within_the_group():
    # Group [1, 2, 6]: mean 3, unbiased std sqrt(((-2)^2 + (-1)^2 + 3^2) / 2) = sqrt(7) = 2.645751.
    advantages = group_advantages(torch.tensor([1.0, 2.0, 6.0]), 3, "grpo")
    std = math.sqrt(7) + 1e-4
    assert advantages.tolist() == pytest.approx([-2 / std, -1 / std, 3 / std])
    assert whiten_sequences(torch.tensor([1.0, 3.0])).tolist() == pytest.approx([-0.707107, 0.707107], abs=1e-6)


def test_group_estimators_put_the_sequence_advantage_on_every_token_with_the_kl_in_the_return():
    """An answer's return under rloo is its score minus beta times its KL summed: the per-token
    rewards summed. Row 0: 1 - 0.5 * (0.2 + 0.4) = 0.7; row 1: 0 - 0.5 * 0.2 = -0.1 (one token)."""
    scores = torch.tensor([1.0, 0.0])
    logp = torch.tensor([[-1.0, -1.0], [-1.0, 0.0]])
    ref_logp = torch.tensor([[-1.2, -1.4], [-1.2, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    rewards, _, _ = kl_penalised_rewards(scores, logp, ref_logp, mask, beta=0.5)
    assert rewards.sum(1).tolist() == pytest.approx([0.7, -0.1])
    advantages = group_advantages(rewards.sum(1), 2, "rloo")  # 0.7 - (-0.1) = 0.8, and -0.8
    per_token = advantages[:, None] * mask
    torch.testing.assert_close(per_token, torch.tensor([[0.8, 0.8], [-0.8, 0.0]]))


def test_reward_to_go_is_the_critics_warm_up_target():
    rewards = torch.tensor([[0.0, -0.1, 1.0], [2.0, 5.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # row 0: 0.9 | 0.9 | 1.0 (gamma 1); row 1 ends after its first token: 2 | 0 | 0
    torch.testing.assert_close(reward_to_go(rewards, mask), torch.tensor([[0.9, 0.9, 1.0], [2.0, 0.0, 0.0]]))


def test_the_critics_warm_start_fits_the_returns_before_the_policy_moves():
    """A critic starting at zero is fitted to returns it can express exactly (a linear map of
    its features): the error falls from the returns' mean square to near 0."""
    torch.manual_seed(0)
    hidden = torch.randn(4, 3, 8)
    truth = torch.nn.Linear(8, 1)
    returns = truth(hidden).squeeze(-1).detach()
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
    head = make_value_head(8)
    before, after = warm_up_critic(head, hidden, returns * mask, mask, steps=300, learning_rate=0.05)
    expected_before = ((returns * mask) ** 2).sum() / mask.sum()  # zero head: error = mean of returns^2
    assert before == pytest.approx(expected_before.item(), rel=1e-5)
    assert after < 0.01 * before


def test_kl_penalised_reward_puts_score_on_last_real_token():
    scores = torch.tensor([2.0, -1.0])
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.0, -9.0]])
    ref_logp = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards, kl, non_score = kl_penalised_rewards(scores, logp, ref_logp, mask, beta=0.1)
    # kl = logp - ref_logp on real tokens: [0.5, 0, -1] and [0.5, 0, (masked)]
    assert torch.allclose(kl, torch.tensor([[0.5, 0.0, -1.0], [0.5, 0.0, 0.0]]))
    assert torch.allclose(non_score, -0.1 * kl)
    # -beta * kl everywhere, + score on token 2 of row 0 and token 1 of row 1 (its last real one)
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.0, 0.1 + 2.0], [-0.05, 0.0 - 1.0, 0.0]]))


def test_mask_after_eos_and_the_no_eos_penalty():
    response = torch.tensor(
        [
            [5, 6, EOS, EOS, EOS],  # finished; pad = EOS afterwards
            [5, EOS, 7, 8, 9],  # finished at token 1; what follows is not part of the answer
            [5, 6, 7, 8, 9],  # cut off at max_new_tokens: no EOS
        ]
    )
    ids, mask, has_eos = mask_after_eos(response, [EOS], pad_id=EOS)
    assert has_eos.tolist() == [True, True, False]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert ids[1].tolist() == [5, EOS, EOS, EOS, EOS]

    scores = torch.tensor([0.3, -0.4, 2.0])
    replaced = apply_no_eos_penalty(scores, has_eos, penalty=-1.0, mode="replace")
    added = apply_no_eos_penalty(scores, has_eos, penalty=-1.0, mode="add")
    assert replaced.tolist() == pytest.approx([0.3, -0.4, -1.0])
    assert added.tolist() == pytest.approx([0.3, -0.4, 1.0])
    assert torch.equal(apply_no_eos_penalty(scores, has_eos, penalty=None), scores)


def test_the_repetition_penalty_is_added_to_flagged_answers_only():
    scores = torch.tensor([0.3, -0.4, 2.0])
    repeats = torch.tensor([False, True, True])
    assert apply_repetition_penalty(scores, repeats, -1.0).tolist() == pytest.approx([0.3, -1.4, 1.0])
    assert torch.equal(apply_repetition_penalty(scores, repeats, None), scores)


def test_the_default_no_eos_penalty_is_added_so_cut_answers_keep_the_reward_models_signal():
    from retrain.settings import RetrainSettings

    assert PPOConfig().no_eos_penalty_mode == "add"
    assert RetrainSettings(retrain_config_file=None).retrain_config().ppo.no_eos_penalty_mode == "add"

    # A batch like SmolLM2's at 64 tokens: two answers of three are cut (no EOS). Normalised
    # reward-model scores; the cut ones range from much liked to much disliked.
    scores = torch.tensor([1.5, 0.5, -0.5, -1.5, 0.8, -0.8])
    has_eos = torch.tensor([False, False, False, False, True, True])
    cut = ~has_eos
    mask = torch.ones(6, 4)  # every answer 4 tokens long; no KL (policy = reference)
    zeros = torch.zeros(6, 4)

    def first_token_advantages(mode: str) -> torch.Tensor:
        final = apply_no_eos_penalty(scores, has_eos, penalty=-1.0, mode=mode)
        rewards, _, _ = kl_penalised_rewards(final, zeros, zeros, mask, beta=0.05)
        advantages, _ = compute_gae(rewards, zeros, mask)
        return masked_whiten(advantages, mask)[:, 0]

    replaced = apply_no_eos_penalty(scores, has_eos, penalty=-1.0, mode="replace")
    added = apply_no_eos_penalty(scores, has_eos, penalty=-1.0, mode="add")
    # replace: every cut answer scores -1, the reward model's view of them is gone; the one it
    # disliked most (-1.5) is even raised.
    assert replaced[cut].tolist() == [-1.0] * 4 and replaced[3] > scores[3]
    assert first_token_advantages("replace")[cut].unique().numel() == 1  # PPO cannot tell them apart
    # add: each cut answer exactly one penalty below its own score, the ranking kept, and so
    # the advantages PPO follows still order the cut answers as the reward model does.
    assert torch.allclose(added[cut], scores[cut] - 1.0)
    advantages = first_token_advantages("add")[cut]
    assert torch.equal(advantages.argsort(), scores[cut].argsort()) and advantages.unique().numel() == 4


def test_adaptive_kl_controller_moves_beta_towards_target():
    above = AdaptiveKLController(0.1, target=6.0, horizon=100)
    above.update(current_kl=9.0, n_steps=10)  # error +0.5, clipped to +0.2: beta * (1 + 0.2 * 10 / 100)
    assert above.value == pytest.approx(0.1 * 1.02)
    below = AdaptiveKLController(0.1, target=6.0, horizon=100)
    below.update(current_kl=5.4, n_steps=10)  # error -0.1: beta * (1 - 0.1 * 10 / 100)
    assert below.value == pytest.approx(0.1 * 0.99)
    fixed = FixedKLController(0.1)
    fixed.update(current_kl=100.0, n_steps=1000)
    assert fixed.value == 0.1


def test_the_kl_budget_keeps_the_last_weights_measured_within_it():
    layer = torch.nn.Linear(2, 1)
    frozen = torch.nn.Parameter(torch.ones(1), requires_grad=False)  # not trained: never copied
    layer.register_parameter("frozen", frozen)
    budget = KLBudget(max_kl=2.0, module=layer)
    start = layer.weight.detach().clone()
    assert budget.check(kl=1.5, iteration=0) and budget.kept_iteration == 0
    with torch.no_grad():
        layer.weight.add_(1.0)
        layer.frozen.add_(1.0)
    assert budget.check(kl=2.0, iteration=1)  # at the bound is within it: these weights are kept now
    moved = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.add_(1.0)
    assert not budget.check(kl=2.5, iteration=2)
    assert torch.equal(layer.weight, moved) and not torch.equal(layer.weight, start)
    assert budget.kept_iteration == 1 and layer.frozen.item() == 2.0
    assert not KLBudget(2.0, layer).check(float("nan"), 0), "a KL that is not a number is never within"
    # A policy that starts over the ceiling (promoted beyond it) may trade within where it started.
    promoted = KLBudget(2.0, layer)
    assert promoted.check(3.0, 0) and promoted.limit == 3.0
    assert promoted.check(2.9, 1) and not promoted.check(3.1, 2) and promoted.kept_iteration == 1
    assert KLBudget(None, layer).check(1e9, 0), "no budget: every check passes"
    with pytest.raises(ValueError, match="max_kl"):
        PPOConfig(max_kl=0.0)
    with pytest.raises(ValueError, match="max_kl_step"):
        PPOConfig(max_kl_step=-1.0)


def test_a_rounds_kl_budget_is_a_step_from_where_it_starts_under_the_ceiling():
    """The reference stays the base model, so a round that starts from a promoted policy starts at
    that policy's KL: its budget is max_step above that, not what the earlier rounds left over."""
    layer = torch.nn.Linear(2, 1)
    second_round = KLBudget(max_kl=16.0, module=layer, max_step=6.0)
    assert second_round.check(6.5, 0) and (second_round.start, second_round.limit) == (6.5, 12.5)
    assert second_round.check(12.5, 1) and not second_round.check(12.6, 2)
    assert second_round.kept_iteration == 1
    near_ceiling = KLBudget(max_kl=16.0, module=layer, max_step=6.0)
    assert near_ceiling.check(13.0, 0) and near_ceiling.limit == 16.0, "the step stops at the ceiling"
    assert near_ceiling.check(16.0, 1) and not near_ceiling.check(16.1, 2)
    over_ceiling = KLBudget(max_kl=16.0, module=layer, max_step=6.0)
    assert over_ceiling.check(17.0, 0) and over_ceiling.limit == 17.0, "promoted beyond it: trade within"
    step_only = KLBudget(max_kl=None, module=layer, max_step=2.0)
    assert step_only.check(30.0, 0) and step_only.limit == 32.0 and not step_only.check(32.5, 1)
    first_nan = KLBudget(max_kl=16.0, module=layer, max_step=6.0)
    assert not first_nan.check(float("nan"), 0) and first_nan.limit is None and first_nan.kept is None


def test_a_step_back_puts_the_optimisers_moments_back_with_the_weights():
    layer = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)

    def step() -> None:
        optimizer.zero_grad()
        layer(torch.ones(1, 2)).sum().backward()
        optimizer.step()

    budget = KLBudget(max_kl=2.0, module=layer, optimizer=optimizer)
    step()
    assert budget.check(1.0, 1)
    kept_weight, kept_moment = layer.weight.detach().clone(), optimizer.state[layer.weight]["exp_avg"].clone()
    for kl in (3.0, 4.0):  # two steps back to the same point: stepping in between leaves the copy as it was
        step()
        step()
        assert not budget.check(kl, 2)
        assert torch.equal(layer.weight, kept_weight)
        assert torch.equal(optimizer.state[layer.weight]["exp_avg"], kept_moment)
        assert optimizer.state[layer.weight]["step"].item() == 1
    with pytest.raises(ValueError, match="kl_backtrack_factor"):
        PPOConfig(kl_backtrack_factor=1.0)
    with pytest.raises(ValueError, match="kl_backtracks"):
        PPOConfig(kl_backtracks=-1)


def test_ppo_steps_back_from_an_update_over_its_budget_at_a_smaller_learning_rate(tokenizer, sft_model):
    """A budget only the untrained adapter is within: every update goes over it. Each time, the
    adapter goes back to the weights measured within it (LoRA's B at zero), and PPO goes on at half
    the learning rate, until its steps back are spent; then it stops."""
    config = PPOConfig(
        num_iterations=6, batch_size=8, mini_batch_size=8, micro_batch_size=8, max_new_tokens=10,
        temperature=1.0, learning_rate=1e-2, lora_r=8, lora_alpha=16, seed=0, max_kl=1e-6, kl_backtracks=2,
    )  # fmt: skip
    # Answers' lengths differ, so every update has a gradient and moves B off zero.
    by_length = lambda prompts, answers: torch.tensor([float(len(answer)) for answer in answers])  # noqa: E731
    result = train_ppo(sft_model, tokenizer, [conversation(p) for p in PROMPTS], by_length, config)
    budget = result.kl_budget
    assert [(b["iteration"], b["learning_rate"], b["kept_iteration"]) for b in budget["backtracks"]] == [
        (1, 5e-3, 0), (3, 2.5e-3, 2)]
    rates = [(s["iteration"], s["learning_rate"]) for s in result.stats]
    assert rates[:2] == [(0, 1e-2), (2, 5e-3)] and all(rate == 2.5e-3 for _, rate in rates[2:])
    assert [s["kl"] for s in result.stats[:2]] == pytest.approx([0.0, 0.0], abs=1e-6), "back to B = 0"
    assert all(s["kl"] <= config.max_kl for s in result.stats), "every update started within the budget"
    assert budget["stopped_at"] is not None and budget["stop_kl"] > config.max_kl, "steps back spent, PPO stops"
    assert budget["kept_iteration"] == result.stats[-1]["iteration"], "with the last weights measured within"


def test_ppo_stops_at_its_kl_budget_with_the_weights_measured_within_it(tokenizer, sft_model):
    """No steps back: iteration 0 measures the reference itself (LoRA's B starts at zero: KL
    exactly 0), trains, iteration 1 measures over the budget, and the adapter goes back to
    iteration 0's starting weights."""
    config = PPOConfig(
        num_iterations=4, batch_size=8, mini_batch_size=8, micro_batch_size=8, max_new_tokens=10,
        temperature=1.0, learning_rate=1e-2, lora_r=8, lora_alpha=16, seed=0, max_kl=1e-6, kl_backtracks=0,
    )  # fmt: skip
    result = train_ppo(sft_model, tokenizer, [conversation(p) for p in PROMPTS], cats_reward, config)
    assert result.kl_budget["stopped_at"] == 1 and result.kl_budget["kept_iteration"] == 0
    assert result.kl_budget["stop_kl"] > config.max_kl
    assert len(result.stats) == 1 and result.stats[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    lora_b = [p for n, p in result.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().max().item() == 0.0 for p in lora_b), "the update was undone"


def test_ppo_measures_its_last_update_against_the_budget(tokenizer, sft_model, tiny_model_dir, sft_state):
    config = PPOConfig(
        num_iterations=2, batch_size=8, mini_batch_size=8, micro_batch_size=8, max_new_tokens=10,
        temperature=1.0, learning_rate=1e-3, lora_r=8, lora_alpha=16, seed=0, max_kl=50.0,
    )  # fmt: skip
    result = train_ppo(sft_model, tokenizer, [conversation(p) for p in PROMPTS], cats_reward, config)
    budget = result.kl_budget
    assert budget["stopped_at"] is None and len(result.stats) == 2
    assert math.isfinite(budget["final_kl"]) and budget["final_kl"] <= 50.0 and budget["final_check_s"] > 0
    assert budget["final_greedy_repetitive_rate"] == 0.0  # short answers: no loops
    assert not budget["final_greedy_set_aside"], "6 prompts cannot spare 6 for the check: it shares them"
    fresh = tiny_llama(tiny_model_dir)
    fresh.load_state_dict(sft_state)
    unbudgeted = train_ppo(
        fresh, tokenizer, [conversation(p) for p in PROMPTS], cats_reward,
        PPOConfig(**{**asdict(config), "max_kl": None, "max_kl_step": None}),
    )  # fmt: skip
    assert "final_kl" not in unbudgeted.kl_budget and unbudgeted.kl_budget["stopped_at"] is None


def test_ppo_undoes_a_last_update_whose_greedy_answers_loop(tokenizer, sft_model, tiny_model_dir, sft_state):
    """The check after the last update finds loops (the test's own flag: every answer) and puts
    back the weights the last iteration started from: the same weights a one-iteration run ends with."""
    config = PPOConfig(
        num_iterations=2, batch_size=8, mini_batch_size=8, micro_batch_size=8, max_new_tokens=10,
        temperature=1.0, learning_rate=1e-2, lora_r=8, lora_alpha=16, seed=0, max_kl=None,
        max_kl_step=None, unlikelihood_coef=0.0, repetition_penalty=None, greedy_prompts=3,
    )  # fmt: skip
    prompts = [conversation(p) for p in PROMPTS]
    undone = train_ppo(sft_model, tokenizer, prompts, cats_reward, config, is_repetitive=lambda a: True)
    budget = undone.kl_budget
    assert (budget["stopped_at"], budget["stop_reason"], budget["kept_iteration"]) == (2, "loops", 1)
    assert budget["final_greedy_repetitive_rate"] == 1.0 and budget["final_greedy_prompts"] == 3
    assert budget["final_greedy_set_aside"], "6 prompts: 3 for the iterations, 3 set aside for the check"
    assert len(undone.stats) == 2

    fresh = tiny_llama(tiny_model_dir)
    fresh.load_state_dict(sft_state)
    one = train_ppo(fresh, tokenizer, prompts, cats_reward,
                    PPOConfig(**{**asdict(config), "num_iterations": 1, "greedy_prompts": 0}))  # fmt: skip
    lora = {n: p for n, p in one.model.named_parameters() if "lora_" in n}
    assert any(p.abs().max().item() > 0 for n, p in lora.items() if "lora_B" in n), "the first update moved it"
    for name, param in undone.model.named_parameters():
        if name in lora:
            assert torch.equal(param, lora[name]), name


def test_whitening_and_running_moments():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    white = masked_whiten(x, mask)
    real = white[mask.bool()]
    assert real.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert real.std().item() == pytest.approx(1.0, abs=1e-4)
    assert white[~mask.bool()].abs().max().item() == 0.0

    moments = RunningMoments()
    batches = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0]), torch.tensor([-4.0, 0.5])]
    for batch in batches:
        moments.update(batch)
    everything = torch.cat(batches)
    assert moments.mean == pytest.approx(everything.mean().item())
    assert moments.std == pytest.approx(everything.std().item())
    normalised = normalise_scores(torch.tensor([10.0]), "running", running=moments)
    assert normalised.item() == pytest.approx((10.0 - everything.mean().item()) / everything.std().item())


# --- model plumbing --------------------------------------------------------------------------------


def test_logprobs_are_temperature_scaled_and_ignore_left_padding(tokenizer, sft_model):
    short, long = prompt_ids(tokenizer, "Hi."), prompt_ids(tokenizer, "What is on your mind?")
    query, query_mask = left_pad([short, long], EOS)
    response = torch.tensor([[40, 41, 42], [43, 44, EOS]])
    response_mask = torch.ones_like(response)
    temperature = 0.5
    with torch.no_grad():
        logits, _ = answer_logits_and_hidden(sft_model, query, query_mask, response, response_mask, temperature)
        got = token_logprobs(logits, response)
        for row, prompt in enumerate([short, long]):
            # The plain way: one unpadded sequence, full logits, divided by T, log-softmax.
            seq = torch.tensor([prompt + response[row].tolist()])
            plain = sft_model(input_ids=seq).logits[0, len(prompt) - 1 : -1] / temperature
            expected = torch.log_softmax(plain, -1).gather(-1, response[row, :, None]).squeeze(-1)
            assert torch.allclose(got[row], expected, atol=1e-4)
            at_t1 = torch.log_softmax(plain * temperature, -1).gather(-1, response[row, :, None]).squeeze(-1)
            assert not torch.allclose(got[row], at_t1, atol=1e-2)


def test_reference_with_adapter_off_is_the_base_model(tokenizer, sft_model):
    base = copy.deepcopy(sft_model)
    policy, frozen = prepare_policy(sft_model, PPOConfig(lora_r=4, lora_alpha=8))
    assert frozen is None  # LoRA: no second copy of the weights
    torch.manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter (fresh LoRA B is zero, i.e. a no-op)
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    query, query_mask = left_pad([prompt_ids(tokenizer, "Hi."), prompt_ids(tokenizer, "Talk to me.")], EOS)
    response = torch.tensor([[40, 41, EOS], [43, 44, 45]])
    args = (query, query_mask, response, torch.ones_like(response), 1.0)
    with torch.no_grad():
        base_logp = token_logprobs(answer_logits_and_hidden(base, *args)[0], response)
        adapted_logp = token_logprobs(answer_logits_and_hidden(policy, *args)[0], response)
        with reference_policy(policy, frozen) as reference:
            ref_logp = token_logprobs(answer_logits_and_hidden(reference, *args)[0], response)
        after_logp = token_logprobs(answer_logits_and_hidden(policy, *args)[0], response)
    assert not torch.allclose(adapted_logp, base_logp, atol=1e-3)
    assert torch.allclose(ref_logp, base_logp, atol=1e-5)
    assert torch.allclose(after_logp, adapted_logp)  # the adapter is back on afterwards


def test_rollouts_sample_with_the_adapter_merged_and_leave_it_unmerged(tokenizer, sft_model):
    policy, _ = prepare_policy(sft_model, PPOConfig(lora_r=4, lora_alpha=8))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    query, query_mask = left_pad([prompt_ids(tokenizer, "Hi."), prompt_ids(tokenizer, "Talk to me.")], EOS)
    response = torch.tensor([[40, 41, EOS], [43, 44, 45]])
    args = (query, query_mask, response, torch.ones_like(response), 1.0)
    with torch.no_grad():
        adapted = token_logprobs(answer_logits_and_hidden(policy, *args)[0], response)
        with adapter_merged(policy):
            merged = token_logprobs(answer_logits_and_hidden(policy, *args)[0], response)
    assert torch.allclose(merged, adapted, atol=1e-4)  # the same policy, sampled faster
    after = policy.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.allclose(after[k], before[k], atol=1e-6) for k in before)  # unmerged again
    plain = torch.nn.Linear(2, 2)
    with adapter_merged(plain):  # a model without an adapter samples as it is
        assert not hasattr(plain, "merge_adapter")


# --- PPO end to end ----------------------------------------------------------------------------------


def cats_reward(prompts: list[list[dict]], answers: list[str]) -> torch.Tensor:
    """Planted reward: 1 for answers that mention cats, else 0."""
    return torch.tensor([1.0 if "cats" in answer else 0.0 for answer in answers])


@pytest.mark.parametrize("estimator", ["rloo", "grpo", "gae"])
def test_ppo_raises_a_planted_reward_with_bounded_kl(tokenizer, sft_model, estimator):
    prompts = [conversation(p) for p in PROMPTS]
    before = [answer_probability(sft_model, tokenizer, p, TARGET) for p in PROMPTS]
    assert 0.1 < sum(before) / len(before) < 0.45  # the SFT mixture: about 1 in 4, room to grow

    # Nats per answer. Collapsing onto the target answer alone costs about ln 4 = 1.4; sampled
    # estimates are noisy, so 4 leaves room for that, not for a runaway policy or a KL measured
    # at the wrong temperature or positions.
    kl_bound = 4.0
    config = PPOConfig(
        num_iterations=6, batch_size=16, mini_batch_size=8, micro_batch_size=16, max_new_tokens=10,
        temperature=1.0, learning_rate=1e-3, kl_coef=0.1, lora_r=8, lora_alpha=16, seed=0,
        advantage_estimator=estimator,
    )  # fmt: skip
    result = train_ppo(sft_model, tokenizer, prompts, cats_reward, config)

    after = [answer_probability(result.model, tokenizer, p, TARGET) for p in PROMPTS]
    with reference_policy(result.model, None) as reference:
        reference_after = [answer_probability(reference, tokenizer, p, TARGET) for p in PROMPTS]
    mean_before, mean_after = sum(before) / len(before), sum(after) / len(after)
    assert mean_after > mean_before + 0.25, (before, after)
    assert reference_after == pytest.approx(before, abs=1e-5)  # learnt in the adapter only

    stats = result.stats
    assert len(stats) == config.num_iterations
    assert stats[-1]["score_mean"] + stats[-2]["score_mean"] > stats[0]["score_mean"] + stats[1]["score_mean"]
    assert max(s["kl"] for s in stats) < kl_bound
    # ... and the measured KL saw the move: answering "cats" 9 times in 10 where the reference
    # does 1 in 4 is ~1 nat per answer (0.9 ln 3.6 + 0.1 ln 0.4).
    assert stats[-1]["kl"] > 0.3
    for s in stats:
        assert all(math.isfinite(v) for v in s.values())
        assert {"entropy", "clip_frac", "policy_loss", "approx_kl", "response_length", "advantage_abs_mean",
                "eos_rate", "non_score_reward", "generation_s", "scoring_s", "training_s"} <= s.keys()  # fmt: skip
        assert ("value_loss" in s) == (estimator == "gae")  # only GAE has a critic
    if estimator == "gae":  # the critic was fitted before the first update
        assert stats[0]["value_warmup_error_after"] < stats[0]["value_warmup_error_before"]
    assert result.config == asdict(config)
    assert all(f.metadata.get("help") for f in fields(PPOConfig))


def test_ppo_learns_to_avoid_the_answers_the_gate_would_call_repetitive(tokenizer, sft_model):
    """The reward model is indifferent; only the repetition penalty speaks, and PPO follows it.
    (The tiny model's answers are not loops: the test's own `is_repetitive` flags the target.)"""
    prompts = [conversation(p) for p in PROMPTS]
    before = [answer_probability(sft_model, tokenizer, p, TARGET) for p in PROMPTS]
    config = PPOConfig(
        num_iterations=6, batch_size=16, mini_batch_size=8, micro_batch_size=16, max_new_tokens=10,
        temperature=1.0, learning_rate=1e-3, kl_coef=0.1, lora_r=8, lora_alpha=16, seed=0,
    )  # fmt: skip
    flat = lambda prompts, answers: torch.zeros(len(answers))  # noqa: E731
    result = train_ppo(sft_model, tokenizer, prompts, flat, config, is_repetitive=lambda a: "cats" in a)
    after = [answer_probability(result.model, tokenizer, p, TARGET) for p in PROMPTS]
    assert sum(after) / len(after) < sum(before) / len(before) - 0.1, (before, after)
    first = result.stats[0]
    assert 0 < first["repetitive_rate"] < 1  # the SFT mixture: some answers are the target
    assert first["reward_mean"] == pytest.approx(-first["repetitive_rate"])  # -1 each, the rest 0


def test_repeated_ngrams_and_their_unlikelihood_by_hand():
    # bigrams (1,2) (2,3) (3,1) (1,2)* (2,3)* (3,4): the repeats' tokens, not their first occurrence
    assert repeated_ngram_mask([1, 2, 3, 1, 2, 3, 4], 2) == [False, False, False, True, True, True, False]
    assert repeated_ngram_mask([5, 5, 5], 1) == [False, True, True]
    assert repeated_ngram_mask([1, 2], 3) == [False, False]
    # p(token) = 0.5 at the first position (two equal logits), 0.8 at the second: only candidates count
    logits = torch.tensor([[[0.0, 0.0], [math.log(4.0), 0.0]]])
    tokens = torch.tensor([[0, 0]])
    assert unlikelihood_loss(logits, tokens, torch.tensor([[True, True]])).item() == pytest.approx(
        (-math.log(0.5) - math.log(0.2)) / 2)  # fmt: skip
    assert unlikelihood_loss(logits, tokens, torch.tensor([[True, False]])).item() == pytest.approx(-math.log(0.5))
    assert unlikelihood_loss(logits, tokens, torch.tensor([[False, False]])).item() == 0.0
    # A loop the policy is sure of (p = 1 - 1e-13, 1 in float32) still costs log(1 + e^30) and is pushed down.
    sure = torch.tensor([[[30.0, 0.0]]], requires_grad=True)
    loss = unlikelihood_loss(sure, torch.tensor([[0]]), torch.tensor([[True]]))
    loss.backward()
    assert loss.item() == pytest.approx(30.0, abs=1e-4) and sure.grad[0, 0, 0].item() == pytest.approx(1.0)


def test_ppo_pushes_down_the_loops_of_its_own_greedy_answers(tokenizer, tiny_model_dir):
    """A policy taught to answer with a phrase over and over loops under greedy decoding; the
    reward is flat, so only the unlikelihood term speaks, and the loop gets less likely. (Its
    answers are under the gate's 12 words: the test flags them itself.)"""
    model = tiny_llama(tiny_model_dir)
    model.load_state_dict(supervised_fit(tokenizer, tiny_model_dir, ["cats and cats and cats and cats and"]))
    prompts = [conversation(p) for p in PROMPTS[:4]]
    query, query_mask = left_pad([prompt_ids(tokenizer, p) for p in PROMPTS[:4]], EOS)
    config = PPOConfig(
        num_iterations=3, batch_size=8, group_size=2, mini_batch_size=8, micro_batch_size=8, max_new_tokens=12,
        temperature=1.0, learning_rate=1e-2, lora_r=8, lora_alpha=16, seed=0, unlikelihood_ngram=2,
        repetition_penalty=None, max_kl=None, max_kl_step=None, max_greedy_repetitive_rate=None,  # every update stays
    )  # fmt: skip
    loops, share = greedy_loops(model, tokenizer, query, query_mask, config, [EOS], EOS, lambda a: True)
    assert share == 1.0 and loops["candidates"].sum().item() > 0
    loop_ids = loops["response_ids"][:, 1:]  # the loop's repeated tokens
    with torch.no_grad():
        before = token_logprobs(answer_logits_and_hidden(
            model, query, query_mask, loop_ids, torch.ones_like(loop_ids), 1.0)[0], loop_ids).mean().item()  # fmt: skip

    flat = lambda prompts, answers: torch.zeros(len(answers))  # noqa: E731
    result = train_ppo(model, tokenizer, prompts, flat, config, is_repetitive=lambda a: True)
    with torch.no_grad():
        after = token_logprobs(answer_logits_and_hidden(
            result.model, query, query_mask, loop_ids, torch.ones_like(loop_ids), 1.0)[0], loop_ids).mean().item()  # fmt: skip
    assert after < before - 0.5, (before, after)
    assert result.stats[0]["greedy_repetitive_rate"] == 1.0 and result.stats[0]["unlikelihood_loss"] > 0
    assert result.stats[0]["greedy_s"] > 0

    looping = tiny_llama(tiny_model_dir)
    looping.load_state_dict(supervised_fit(tokenizer, tiny_model_dir, ["cats and cats and cats and cats and"]))
    off = train_ppo(looping, tokenizer, prompts, flat,
                    PPOConfig(**{**asdict(config), "unlikelihood_coef": 0.0}), is_repetitive=lambda a: True)  # fmt: skip
    assert "unlikelihood_loss" not in off.stats[0] and off.stats[0]["greedy_s"] < 1e-3
    with torch.no_grad():
        without = token_logprobs(answer_logits_and_hidden(
            off.model, query, query_mask, loop_ids, torch.ones_like(loop_ids), 1.0)[0], loop_ids).mean().item()  # fmt: skip
    assert without > before - 0.1, "without the term, the flat reward leaves the loop where it was"


def test_full_finetuning_with_ptx_trains_the_policy_and_keeps_the_reference(tokenizer, sft_model):
    before = {name: p.detach().clone() for name, p in sft_model.named_parameters()}
    config = PPOConfig(
        num_iterations=1, batch_size=4, mini_batch_size=2, micro_batch_size=1, ppo_epochs=1,
        max_new_tokens=4, use_lora=False, learning_rate=1e-3, ptx_batch_size=2, seed=1,
    )  # fmt: skip
    ptx = [tokenizer.apply_chat_template(conversation(p) + [{"role": "assistant", "content": a}], tokenize=False)
           for p, a in zip(PROMPTS, ANSWERS)]  # fmt: skip
    result = train_ppo(sft_model, tokenizer, [conversation(p) for p in PROMPTS[:4]], cats_reward, config, ptx_texts=ptx)
    stats = result.stats[0]
    assert stats["ptx_loss"] > 0 and math.isfinite(stats["ptx_loss"])
    assert stats["kl"] == pytest.approx(0.0, abs=1e-4)  # first rollouts come from the reference itself
    changed = [n for n, p in result.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed, "full fine-tuning must move the policy's own weights"


def test_value_head_starts_from_the_reward_head_or_zero():
    reward_head = torch.nn.Linear(64, 1, bias=False)  # a sequence-classification score head
    from_reward = make_value_head(64, reward_head)
    assert torch.equal(from_reward.weight, reward_head.weight) and from_reward.bias.item() == 0.0
    from_state = make_value_head(64, {"weight": torch.ones(1, 64), "bias": torch.tensor([0.5])})
    assert from_state(torch.ones(1, 64)).item() == pytest.approx(64.5)
    assert make_value_head(64)(torch.randn(3, 64)).abs().max().item() == 0.0
    with pytest.raises(ValueError, match="hidden size"):
        make_value_head(32, reward_head)
