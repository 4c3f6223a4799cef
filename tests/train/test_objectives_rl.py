"""PPO / GRPO arithmetic against hand-computed values, reward functions, verifiable tasks."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmforge.align.kl import AdaptiveKLController, FixedKLController
from lmforge.align.reward_functions import (
    FormatReward,
    build_rewards,
    exact_match,
    extract_number,
    parse_spec,
)
from lmforge.align.tasks import (
    arithmetic_problems,
    arithmetic_split,
    load_prompt_sets,
    read_prompt_file,
    record_to_prompt,
)
from lmforge.errors import ConfigError, DataError
from lmforge.train.objectives.kl import k3_kl
from lmforge.train.objectives.rl import (
    gae,
    group_advantages,
    grpo_token_loss,
    kl_penalty_rewards,
    masked_whiten,
    normalized_loss,
    ppo_policy_loss,
    ppo_value_loss,
)


def close(a, b, tol=1e-5):
    return torch.allclose(
        torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol
    )


# ----------------------------------------------------------------------------- PPO
def test_gae_hand_computed():
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.5, 0.6, 0.7]])
    m = torch.ones(1, 3)
    adv, ret = gae(r, v, m, gamma=1.0, lam=0.5)
    # t2: 1 - .7 = .3 ; t1: (0 + .7 - .6) + .5*.3 = .25 ; t0: (.6 - .5) + .5*.25 = .225
    assert close(adv, [[0.225, 0.25, 0.3]]) and close(ret, [[0.725, 0.85, 1.0]])
    adv, ret = gae(r, v, m, gamma=0.9, lam=1.0)  # lam=1: returns are discounted reward sums
    assert close(adv, [[0.31, 0.30, 0.30]]) and close(ret, [[0.81, 0.9, 1.0]])
    # a shorter sequence: the value after its last token is 0, padding contributes nothing
    r2, v2, m2 = (
        torch.tensor([[0.0, 2.0, 5.0]]),
        torch.tensor([[0.5, 0.5, 9.0]]),
        torch.tensor([[1.0, 1.0, 0.0]]),
    )
    adv, ret = gae(r2, v2, m2, gamma=1.0, lam=1.0)
    assert close(adv, [[1.5, 1.5, 0.0]]) and close(ret, [[2.0, 2.0, 0.0]])


def test_kl_penalty_puts_score_on_last_token():
    logp = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, 0.0]])
    ref = torch.tensor([[-1.5, -0.5, -1.0], [-1.0, -2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rew, kl = kl_penalty_rewards(logp, ref, torch.tensor([3.0, -1.0]), mask, kl_coef=0.1)
    assert close(kl, [[0.5, -0.5, 0.0], [-1.0, 0.0, 0.0]])
    assert close(rew, [[-0.05, 0.05, 3.0], [0.1, -1.0, 0.0]])


def test_ppo_clipped_losses_hand_computed():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    loss, ratio, clipped = ppo_policy_loss(logp, torch.zeros(1, 3), adv, cliprange=0.2)
    # max(-A r, -A clip(r)): 1.5 -> max(-1.5, -1.2); 0.5, A=-1 -> max(.5, .8); 1.1 -> -2.2 (inside the range)
    assert close(loss, [[-1.2, 0.8, -2.2]]) and close(ratio, [[1.5, 0.5, 1.1]])
    assert clipped.tolist() == [[1.0, 1.0, 0.0]]
    vloss, vclip = ppo_value_loss(
        torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5]), torch.tensor([2.0, 0.0]), cliprange_value=0.2
    )
    # clipped values .7, .3: 0.5 * max((1-2)^2, (.7-2)^2) = .845 ; 0.5 * max(0, .09) = .045
    assert close(vloss, [0.845, 0.045]) and vclip.tolist() == [1.0, 1.0]


def test_kl_controllers():
    fixed = FixedKLController(0.2)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.2
    ada = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ada.update(12.0, 1000)  # error +100% clipped to +20%, times 1000/10000
    assert math.isclose(ada.value, 0.1 * 1.02)
    ada.update(3.0, 1000)  # -50% clipped to -20%
    assert math.isclose(ada.value, 0.1 * 1.02 * 0.98)
    ada.update(6.6, 10000)  # +10%, full horizon
    assert math.isclose(ada.value, 0.1 * 1.02 * 0.98 * 1.1)
    ada.update(float("nan"), 10)
    assert math.isclose(ada.value, 0.1 * 1.02 * 0.98 * 1.1)


def test_whitening():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = masked_whiten(x, m)
    assert close(w, [[-1.0, 0.0, 1.0, 0.0]], tol=1e-4)  # unbiased std of 1,2,3 is 1
    assert close(masked_whiten(x, m, shift_mean=False), [[1.0, 2.0, 3.0, 0.0]], tol=1e-4)


# ----------------------------------------------------------------------------- GRPO
def test_group_advantages_each_scaling():
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    a, kept, zero = group_advantages(r, 4, "none")
    assert close(a, [0.5, -0.5, 0.5, -0.5, 0, 0, 0, 0]) and kept.all() and zero.tolist() == [False, True]
    a, _, _ = group_advantages(r, 4, "group")
    s = math.sqrt(1 / 3)  # unbiased std of (1, 0, 1, 0)
    assert close(a, [0.5 / (s + 1e-4), -0.5 / (s + 1e-4)] * 2 + [0] * 4)
    a, _, _ = group_advantages(r, 4, "batch")
    bs = float(r.std())
    assert close(a, [0.5 / (bs + 1e-4), -0.5 / (bs + 1e-4)] * 2 + [0] * 4)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantage_is_zero_for_equal_rewards(scale):
    a, kept, zero = group_advantages(torch.tensor([0.7] * 6 + [0.0] * 3), 3, scale)
    assert torch.equal(a, torch.zeros(9)) and zero.all() and kept.all()


def test_failed_rewards_leave_the_group_statistics():
    r = torch.tensor([1.0, float("nan"), 0.0, 0.0, float("nan"), float("nan"), float("inf"), 5.0])
    a, kept, zero = group_advantages(r, 4, "none", valid=torch.isfinite(r))
    # group 1: mean over the 3 valid samples = 1/3; group 2: one valid sample -> dropped
    assert (
        close(a[:4], [2 / 3, 0.0, -1 / 3, -1 / 3])
        and kept.tolist() == [True, False, True, True] + [False] * 4
    )
    assert torch.equal(a[4:], torch.zeros(4)) and zero.tolist() == [False, False]


def test_k3_and_grpo_token_loss():
    logp, ref = torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25]))
    assert close(k3_kl(logp, ref), [0.5 + math.log(2) - 1])
    assert float(k3_kl(logp, logp)) == 0.0
    lp = torch.log(torch.tensor([[1.5, 0.7], [1.5, 0.7]]))
    loss, ratio, clipped = grpo_token_loss(lp, torch.zeros(2, 2), torch.tensor([1.0, -1.0]), 0.2, 0.28)
    # A=+1: -min(r, clip(r, .8, 1.28)) -> -1.28, -0.7 ; A=-1: -min(-r, -clip(r)) -> 1.5, 0.8
    assert close(loss, [[-1.28, -0.7], [1.5, 0.8]]) and clipped.tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_three_loss_normalisations():
    per_tok = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # 3rd sample dropped
    s, n = normalized_loss(per_tok, mask, "token", 5)
    assert (float(s), n) == (10.0, 4)  # (1+2+3+4) / 4 tokens
    s, n = normalized_loss(per_tok, mask, "seq", 5)
    assert (float(s), n) == (6.0, 2)  # (6/3 + 4/1) / 2 sequences
    s, n = normalized_loss(per_tok, mask, "dr_grpo", 5)
    assert (float(s), n) == (2.0, 2)  # 10 / (2 sequences * 5 max tokens)


# ----------------------------------------------------------------------------- rewards
def test_number_extraction_and_exact_match():
    assert extract_number("so 12 then\n#### 1,234") == 1234.0
    assert extract_number("He has 7 apples.") == 7.0
    assert extract_number("it costs $2.50 or -3") == -3.0
    assert extract_number("#### $18") == 18.0 and extract_number("no digits") is None
    assert exact_match(
        ["The answer is 7.", "3 + 4 = 8", "seven", "#### 72"],
        ["7", "7", "7", "Natalia sold 48+24 = 72 clips.\n#### 72"],
    ) == [1.0, 0.0, 0.0, 1.0]
    assert exact_match(["7"], [None]) == [None]  # no reference: a failed sample, not a 0


def test_format_reward_and_specs():
    f = FormatReward()
    assert f(["x #### 5", "the answer is 3.", "5"]) == [1.0, 1.0, 0.0]
    assert parse_spec("0.5*format", "k") == (0.5, "format") and parse_spec("exact_match", "k") == (
        1.0,
        "exact_match",
    )
    with pytest.raises(ConfigError, match="format_pattern"):
        FormatReward("([")
    with pytest.raises(ConfigError, match=r"rl.grpo.rewards\[0\].*module:function"):
        build_rewards(["nonsense"], key="rl.grpo.rewards")
    with pytest.raises(ConfigError, match="cannot import"):
        build_rewards(["no_such_module_xyz:fn"])
    with pytest.raises(ConfigError, match="no callable"):
        build_rewards(["math:not_there"])


def test_reward_set_isolates_raising_and_nan_functions(tmp_path):
    user = tmp_path / "my_rewards.py"
    user.write_text(
        "def picky(completions, answers):\n"
        "    out = []\n"
        "    for c in completions:\n"
        "        if 'boom' in c:\n"
        "            raise ValueError('cannot score ' + c)\n"
        "        out.append(float('nan') if 'nan' in c else len(c))\n"
        "    return out\n"
        "def wrong_length(completions, **kw):\n"
        "    return [1.0]\n"
    )
    rs = build_rewards(["exact_match", f"0.5*{user}:picky"])
    res = rs(["q"] * 4, ["7", "boom 7", "nan", "8"], ["7", "7", "7", "7"])
    name = "picky"
    assert res.terms["exact_match"] == [1.0, 1.0, 0.0, 0.0]
    assert res.terms[name][0] == 1.0 and res.terms[name][3] == 1.0
    assert math.isnan(res.terms[name][1]) and math.isnan(res.terms[name][2])
    assert res.total[0] == 1.5 and res.failed == [False, True, True, False]
    assert res.failures == {"exact_match": 0, name: 2} and "cannot score boom 7" in res.errors[name]
    res = build_rewards([f"{user}:wrong_length"])(["q"] * 2, ["a", "b"], [None, None])
    assert res.failed == [True, True] and "1 values for 2 samples" in res.errors["wrong_length"]


# ----------------------------------------------------------------------------- tasks
def test_arithmetic_task_is_deterministic_split_and_checkable():
    a, b = arithmetic_problems(300), arithmetic_problems(300)
    assert a == b and len({p["question"] for p in a}) == 300
    tr, va = arithmetic_split(300)
    assert len(va) > 10 and not {p["question"] for p in tr} & {p["question"] for p in va}
    assert exact_match([p["solution"] for p in a], [p["answer"] for p in a]) == [1.0] * 300
    assert all(0 <= int(p["answer"]) <= 18 for p in a)


def test_prompt_records_gsm8k_and_errors(tmp_path):
    f = tmp_path / "p.jsonl"
    rows = [
        {"question": "Ann has 3 pens and 4 more. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
        {"prompt": "What is 2 + 2?", "answer": 4},
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "1+1?"},
                {"role": "assistant", "content": "2"},
            ]
        },
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    items = read_prompt_file(f)
    assert items[0].answer == "7" and items[0].text.startswith("Ann")
    assert (
        items[1].answer == "4"
        and items[2].answer == "2"
        and [r for r, _ in items[2].messages] == ["system", "user"]
    )
    with pytest.raises(DataError, match=r"x.jsonl:3: an RL prompt record needs"):
        record_to_prompt({"text": "hi"}, "x.jsonl:3")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        read_prompt_file(bad)
    train, val = load_prompt_sets(["builtin", str(f)], None, 0.3, seed=1)
    assert train and val and not set(train) & set(val)
    train2, val2 = load_prompt_sets(["builtin"], ["builtin", str(f)], 0.1, seed=1)
    assert len(val2) == len(arithmetic_split()[1]) + 3
