"""The `rl` stage end to end on a tiny model: GRPO and PPO learn a trivially learnable reward,
the first update's ratio is exactly 1, LoRA with an adapters-off reference, a reward model from
the reward stage, exact resume mid-rollout, and bad input (long prompts, failing rewards)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from lmforge.align.tasks import arithmetic_problems
from lmforge.errors import ConfigError, DataError
from lmforge.model.hf import load_pretrained
from lmforge.pipeline import load_config, run_stage
from tests.conftest import save_base_model

ME = "tests.align.test_rl"
CRASH = {"calls": 0, "at": None}


def even_tokens(completion_ids, **_):
    """A reward a random tiny model can learn at once: the share of even token ids."""
    return [sum(t % 2 == 0 for t in c) / max(1, len(c)) for c in completion_ids]


def crashing(completion_ids, **kw):
    CRASH["calls"] += 1
    if CRASH["at"] is not None and CRASH["calls"] >= CRASH["at"]:
        CRASH["at"] = None
        raise KeyboardInterrupt("simulated crash")
    return even_tokens(completion_ids)


def flaky(completions, completion_ids, **_):
    """Raises for some samples, NaN for others, a number for the rest."""
    out = []
    for _c, ids in zip(completions, completion_ids):
        if len(ids) and ids[0] % 5 == 0:
            raise RuntimeError("flaky scorer")
        out.append(float("nan") if len(ids) and ids[0] % 5 == 1 else even_tokens([ids])[0])
    return out


def always_raises(completions, **_):
    raise ValueError("broken reward")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    texts = [p["question"] + " " + p["solution"] for p in arithmetic_problems(400)]
    d = tmp_path_factory.mktemp("rlbase")
    save_base_model(d, texts, 300, max_seq_len=96)
    return d


def _cfg(root, base_dir, *overrides):
    # rl.method / rl.data: the shipped config runs PPO on the built-in questions; these tests
    # start from GRPO on built-in arithmetic prompts and say so explicitly
    return load_config(
        None,
        [
            f"run.root={root}",
            f"rl.model={base_dir}",
            "run.device=cpu",
            "rl.lr=1e-2",
            "rl.method=grpo",
            "rl.data=[builtin]",
            "rl.batch_size=8",
            "rl.max_val_examples=8",
            "rl.log_every=1",
            "rl.eval_every=0",
            "rl.grpo.max_new_tokens=8",
            "rl.ppo.max_new_tokens=8",
            f"rl.grpo.rewards=[{ME}:even_tokens]",
            f"rl.ppo.rewards=[{ME}:even_tokens]",
            *overrides,
        ],
    )


@torch.no_grad()
def even_mass(model_dir, base_dir) -> float:
    """Mean probability of an even first token over held-out prompts: what the reward pays for."""
    from lmforge.align.tasks import arithmetic_split
    from lmforge.chat import ChatFormat

    fmt, model = ChatFormat.from_dir(base_dir), load_pretrained(model_dir)
    qs = [p["question"] for p in arithmetic_split()[1][:16]]
    return sum(
        float(
            model(torch.tensor([fmt.prompt_ids([{"role": "user", "content": q}])]))[0, -1]
            .softmax(-1)[0::2]
            .sum()
        )
        for q in qs
    ) / len(qs)


def _lines(out_dir):
    return [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_grpo_learns_and_first_update_has_ratio_one(tmp_path, base_dir):
    o = run_stage(_cfg(tmp_path, base_dir, "rl.max_steps=12", "rl.grpo.epochs=2", "rl.eval_every=6"), "rl")
    m = o.metrics
    assert m["method"] == "grpo" and m["steps"] == 12 and m["rollouts"] == 6
    assert even_mass(o.dir / "model", base_dir) > even_mass(base_dir, base_dir) + 0.03
    assert [c["step"] for c in m["eval_curve"]] == [6, 12]
    lines = _lines(o.dir)
    first = next(r for r in lines if r.get("step") == 1 and "loss" in r)
    # the behaviour log-probs were recomputed with the update's own forward: exactly 1
    assert first["policy/ratio"] == 1.0 and first["clip_ratio"] == 0.0
    second = next(r for r in lines if r.get("step") == 2 and "loss" in r)
    assert second["policy/ratio"] != 1.0  # the second epoch sees the updated policy
    rollouts = [r for r in lines if "rollout" in r]
    assert len(rollouts) == 6 and all(
        "frac_zero_std_groups" in r and "rewards/even_tokens" in r for r in rollouts
    )
    load_pretrained(o.dir / "model")
    assert len((o.dir / "samples.jsonl").read_text().splitlines()) == 4


def test_ppo_with_reward_function_logs_the_usual_metrics(tmp_path, base_dir):
    o = run_stage(
        _cfg(
            tmp_path,
            base_dir,
            "rl.method=ppo",
            "rl.max_steps=16",
            "rl.ppo.epochs=2",
            "rl.ppo.adaptive_kl=true",
            "rl.ppo.target_kl=0.5",
            "rl.ppo.kl_horizon=100",
        ),
        "rl",
    )
    m = o.metrics
    assert m["method"] == "ppo" and m["steps"] == 16
    assert even_mass(o.dir / "model", base_dir) > even_mass(base_dir, base_dir) + 0.03
    assert m["kl_before"] == 0.0 and m["kl_after"] > 0 and m["kl_target"] == 0.5
    lines = _lines(o.dir)
    first = next(r for r in lines if r.get("step") == 1 and "loss" in r)
    assert (
        first["policy/ratio"] == 1.0 and first["policy/clipfrac"] == 0.0 and first["policy/approxkl"] == 0.0
    )
    assert {"val/error", "loss/value", "policy/entropy"} <= set(first)
    rollouts = [r for r in lines if "rollout" in r]
    # the policy is the reference at first: KL and log-ratio exactly 0
    assert rollouts[0]["objective/kl_k3"] == 0.0 and rollouts[0]["objective/log_ratio"] == 0.0
    assert all(r["objective/kl_k3"] >= 0 for r in rollouts)  # a KL estimate is never negative
    assert {"objective/kl_coef", "objective/entropy", "objective/rlhf_reward"} <= set(rollouts[0])
    # the hacking signals of every rollout
    assert all(
        {"reward", "completion_length", "truncated_frac", "distinct_1", "distinct_2", "kl_guard_tripped"}
        <= set(r)
        for r in rollouts
    )
    assert all(0 < r["distinct_2"] <= 1 and 0 <= r["truncated_frac"] <= 1 for r in rollouts)
    assert rollouts[-1]["objective/kl_coef"] != 0.05  # the adaptive controller moved it
    # held-out: reward with and without the KL term, diversity, likelihood of the starting answers
    assert m["kl_unit"].endswith("k3 estimator") and m["kl_to_target"] == round(m["kl_after"] / 0.5, 4)
    assert math.isclose(
        m["sampled_reward_minus_kl_after"],
        m["sampled_reward_after"] - m["kl_coef_final"] * m["kl_after"],
        abs_tol=1e-6,
    )
    assert m["start_answer_nll_after"] > m["start_answer_nll_before"] > 0
    assert 0 < m["sampled_distinct_2_before"] <= 1 and "hacking_warning" in m
    assert set(load_file(str(o.dir / "value_head.safetensors"))) == {"weight", "bias"}
    assert "v_head.weight" not in load_file(str(o.dir / "model" / "model.safetensors"))
    load_pretrained(o.dir / "model")


def test_kl_guard_drops_the_reward_of_a_rollout_far_above_target(tmp_path, base_dir):
    """target_kl tiny, guard at 1.5x: once the policy has moved, each rollout trips the guard, is
    counted and logged, and trains on the KL penalty alone."""
    o = run_stage(
        _cfg(
            tmp_path,
            base_dir,
            "rl.method=ppo",
            "rl.max_steps=6",
            "rl.ppo.epochs=2",
            "rl.ppo.kl_coef=0",
            "rl.ppo.target_kl=0.001",
            "rl.ppo.kl_guard=1.5",
        ),
        "rl",
    )
    lines = _lines(o.dir)
    rollouts = [r for r in lines if "rollout" in r]
    assert rollouts[0]["kl_guard_tripped"] == 0.0  # KL 0: the policy is the reference
    tripped = [r["rollout"] for r in rollouts if r["kl_guard_tripped"] == 1.0]
    assert tripped and o.metrics["kl_guard_trips"] == len(tripped)
    assert all(rollouts[t]["objective/kl_k3"] > 1.5 * 0.001 for t in tripped)
    assert all(
        rollouts[t]["objective/kl_k3"] <= 1.5 * 0.001 for t in range(len(rollouts)) if t not in tripped
    )
    assert "exceeds 1.5 x target_kl = 0.0015" in (o.dir.parent / "log.txt").read_text()


def test_ppo_scores_with_a_reward_model_folder(tmp_path, base_dir):
    from lmforge.align.reward import RewardModel, save_reward_model

    lm = load_pretrained(base_dir)
    rm_dir = save_reward_model(
        RewardModel.from_causal_lm(lm, seed=3),
        tmp_path / "rm",
        tokenizer_dir=base_dir,
        bos_id=0,
        eos_id=1,
        pad_id=2,
    )
    o = run_stage(
        _cfg(
            tmp_path,
            base_dir,
            "rl.method=ppo",
            "rl.max_steps=2",
            "rl.ppo.rewards=[reward_model]",
            f"rl.reward_model={rm_dir}",
        ),
        "rl",
    )
    assert math.isfinite(o.metrics["reward_before"]) and math.isfinite(o.metrics["reward_after"])
    assert o.metrics["failed_reward_samples"] == 0


def test_lora_grpo_uses_the_base_as_reference(tmp_path, base_dir):
    o = run_stage(
        _cfg(
            tmp_path,
            base_dir,
            "rl.peft=lora",
            "rl.lora.r=4",
            "rl.lora.dropout=0.1",
            "rl.max_steps=4",
            "rl.grpo.beta=0.1",
            "rl.grpo.loss_type=seq",
        ),
        "rl",
    )
    m = o.metrics
    assert (
        m["peft"] == "lora" and m["trainable_fraction"] < 0.5 and m["kl_before"] == 0.0 and m["kl_after"] > 0
    )
    assert (o.dir / "adapter" / "adapter_model.safetensors").exists()
    load_pretrained(o.dir / "model")
    assert any("kl" in r for r in _lines(o.dir) if "loss" in r)


def test_resume_mid_rollout_equals_uninterrupted(tmp_path, base_dir):
    args = ["rl.max_steps=6", "rl.grpo.epochs=2", "rl.checkpoint_every=3", f"rl.grpo.rewards=[{ME}:crashing]"]
    straight = run_stage(_cfg(tmp_path / "a", base_dir, *args), "rl")
    # calls: held-out eval before training (greedy, sampled), rollouts 0 and 1 (steps 1-4,
    # checkpoint at 3 inside rollout 1), then crash while making rollout 2
    CRASH.update(calls=0, at=5)
    with pytest.raises(KeyboardInterrupt):
        run_stage(_cfg(tmp_path / "b", base_dir, *args), "rl")
    assert json.loads((tmp_path / "b" / "tiny" / "rl" / "manifest.json").read_text())["status"] == "failed"
    state = json.loads(
        next((tmp_path / "b" / "tiny" / "rl" / "checkpoints").glob("step_00000003"))
        .joinpath("trainer_state.json")
        .read_text()
    )
    assert state["data"]["cursor"] == 1 and "buffer" in state["data"]  # the checkpoint fell inside a rollout
    resumed = run_stage(_cfg(tmp_path / "b", base_dir, *args), "rl")
    assert resumed.metrics["resumed_from_step"] == 3
    a, b = (
        load_file(str(straight.dir / "model" / "model.safetensors")),
        load_file(str(resumed.dir / "model" / "model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in _lines(resumed.dir) if "rollout" in r]
    assert steps == [1, 3, 5]


def test_resume_at_the_last_step_keeps_the_after_answers(tmp_path, base_dir):
    """A kill after the last checkpoint: the re-run trains nothing, and still reports the final
    policy's held-out metrics and answers exactly as the uninterrupted run did."""
    args = ["rl.max_steps=2", "rl.checkpoint_every=2", "rl.grpo.num_samples=2"]
    straight = run_stage(_cfg(tmp_path, base_dir, *args), "rl")
    samples = (straight.dir / "samples.jsonl").read_text()
    assert '"after": null' not in samples
    man = straight.dir / "manifest.json"
    m = json.loads(man.read_text())
    man.write_text(json.dumps({**m, "status": "failed"}))  # as if killed before the manifest was written
    (straight.dir / "samples.jsonl").unlink()
    again = run_stage(_cfg(tmp_path, base_dir, *args), "rl")
    assert again.metrics["resumed_from_step"] == 2
    assert (again.dir / "samples.jsonl").read_text() == samples
    assert again.metrics["reward_after"] == straight.metrics["reward_after"]


def test_bad_input_is_counted_not_fatal(tmp_path, base_dir):
    data = tmp_path / "prompts.jsonl"
    rows = [{"prompt": p["question"], "answer": p["answer"]} for p in arithmetic_problems(40)]
    rows.append({"prompt": "word " * 400, "answer": "1"})  # longer than the context
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    o = run_stage(
        _cfg(
            tmp_path,
            base_dir,
            f"rl.data={data}",
            "rl.max_steps=4",
            f"rl.grpo.rewards=[{ME}:flaky, 0.1*format]",
        ),
        "rl",
    )
    m = o.metrics
    assert m["skipped_long_prompts"] == 1 and m["failed_reward_samples"] > 0 and m["failures_flaky"] > 0
    assert m["steps"] == 4  # (greedy held-out answers of this random model may all fail: NaN, not a crash)
    log = (tmp_path / "tiny" / "log.txt").read_text()
    assert "reward 'flaky' failed on some samples (raised RuntimeError: flaky scorer)" in log

    with pytest.raises(DataError, match="rollouts in a row had no usable sample"):
        run_stage(
            _cfg(
                tmp_path,
                base_dir,
                "rl.max_steps=4",
                "rl.max_bad_steps=2",
                f"rl.grpo.rewards=[{ME}:always_raises]",
            ),
            "rl",
        )
    with pytest.raises(ConfigError, match="not a multiple of grpo.group_size=3"):
        run_stage(_cfg(tmp_path, base_dir, "rl.grpo.group_size=3"), "rl")
    with pytest.raises(ConfigError, match="max_new_tokens=200 leaves no room"):
        run_stage(_cfg(tmp_path, base_dir, "rl.grpo.max_new_tokens=200"), "rl")


def test_align_stage_hands_rl_methods_to_the_rl_loop(tmp_path, base_dir):
    cfg = load_config(
        None,
        [
            f"run.root={tmp_path}",
            f"align.model={base_dir}",
            "run.device=cpu",
            "align.method=grpo",
            "align.max_steps=2",
            "align.batch_size=8",
            "align.max_val_examples=4",
            "align.grpo.max_new_tokens=8",
            f"align.grpo.rewards=[{ME}:even_tokens]",
        ],
    )
    o = run_stage(cfg, "align")
    assert (
        o.metrics["method"] == "grpo"
        and o.metrics["steps"] == 2
        and (o.dir / "model" / "config.json").exists()
    )
