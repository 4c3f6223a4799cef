"""The eval and report stages on a tiny trained run, stages written by others included."""

import json

from lmforge.cli import main
from lmforge.model.hf import save_pretrained
from lmforge.runs import atomic_write_json
from tests.conftest import tiny_args
from tests.factories import single_thread, tiny_model


def test_eval_then_report(clone_run, capsys):
    root = clone_run("ev")
    args = tiny_args(root, "ev", "pretrain.max_steps=5", "eval.builtin_items=40")
    run = root / "ev"
    with single_thread():
        assert main(["pretrain", *args]) == 0
        assert main(["eval", *args]) == 0
    res = json.loads((run / "eval" / "results.json").read_text())
    assert {"loss", "ppl", "bpb", "unigram_bpb", "tokens", "documents", "tasks", "hardware"} <= set(res)
    assert res["documents"]["word_ppl"] > 1 and res["documents"]["tokens"] > 0
    cloze = res["tasks"]["builtin_cloze"]
    assert cloze["n"] > 0 and cloze["chance"] == 0.25 and 0 <= cloze["acc"]["value"] <= 1
    assert (run / "eval" / "predictions" / "builtin_cloze.jsonl").exists()
    manifest = json.loads((run / "eval" / "manifest.json").read_text())
    assert "builtin_cloze/acc_norm" in manifest["metrics"] and "word_ppl" in manifest["metrics"]

    # a stage the report has never heard of, and a data funnel, are shown generically
    atomic_write_json(
        run / "align" / "manifest.json",
        {
            "stage": "align",
            "status": "complete",
            "seconds": 1.5,
            "metrics": {"reward_margin": 0.7, "steps": 2},
        },
    )
    (run / "align" / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 0.9, "lr": 1e-4}\n{"step": 2, "loss": 0.6}\n'
    )
    atomic_write_json(
        run / "data" / "funnel.json",
        {
            "steps": [
                {"name": "read", "docs_in": 100, "docs_out": 100, "tokens_out": 5000, "dropped": {}},
                {
                    "name": "quality",
                    "docs_in": 100,
                    "docs_out": 60,
                    "tokens_out": 3000,
                    "dropped": {"too_short": {"docs": 30}, "gopher_repetition": {"docs": 10}},
                },
            ]
        },
    )
    assert main(["report", *args]) == 0
    md = (run / "report" / "report.md").read_text()
    html = (run / "report" / "report.html").read_text()
    for title in (
        "Model card",
        "Data funnel",
        "Training: pretrain",
        "Training: align",
        "Evaluation",
        "builtin_cloze",
    ):
        assert title in md and title in html
    assert "too_short" in md and "reward_margin" in md and "parameters" in md
    assert (run / "report" / "plots" / "pretrain_curves.png").exists()
    assert "](plots/pretrain_curves.png)" in md
    assert html.count("data:image/png;base64,") >= 3 and "src='http" not in html and "<script" not in html


def test_eval_refuses_a_model_of_another_vocabulary(clone_run, tmp_path, capsys):
    root = clone_run("mm")
    other = tmp_path / "other_model"
    save_pretrained(tiny_model(300), other)  # no tokenizer: the run's (512 tokens) is used
    assert main(["eval", *tiny_args(root, "mm", f"eval.model={other}")]) == 2
    assert "do not belong together" in capsys.readouterr().err


def test_eval_bad_task_is_a_clear_error(clone_run, tmp_path, capsys):
    root = clone_run("bt")
    args = tiny_args(root, "bt", "pretrain.max_steps=2")
    with single_thread():
        assert main(["pretrain", *args]) == 0
    bad = tmp_path / "items.jsonl"
    bad.write_text('{"query": "q", "choices": ["a", "b"], "answer": 3}\n')
    assert main(["eval", *args, f"eval.tasks=[{bad}]", "eval.doc_tokens=0"]) == 2
    err = capsys.readouterr().err
    assert "items.jsonl:1" in err and "out of range" in err
    # two tasks of one type keep their own results and prediction files
    arc = {"choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "B"}
    for name, n in (("A", 3), ("B", 5)):
        lines = [json.dumps({"question": f"q{i}", **arc}) + "\n" for i in range(n)]
        (tmp_path / f"{name}.jsonl").write_text("".join(lines))
    tasks = f"eval.tasks=[arc:{tmp_path / 'A.jsonl'},arc:{tmp_path / 'B.jsonl'}]"
    with single_thread():
        assert main(["eval", *args, tasks, "eval.doc_tokens=0"]) == 0
    res = json.loads((root / "bt" / "eval" / "results.json").read_text())
    assert {k: v["n"] for k, v in res["tasks"].items()} == {"arc-A": 3, "arc-B": 5}
    for key, n in (("arc-A", 3), ("arc-B", 5)):
        assert len((root / "bt" / "eval" / "predictions" / f"{key}.jsonl").read_text().splitlines()) == n


def test_eval_scores_every_model_of_the_run_on_the_same_tokens(clone_run):
    """The chain table: pretrain and a (perturbed) sft model, each scored on the same val tokens;
    the figures equal evaluate_shard on those models, the delta is their difference."""
    import torch

    from lmforge.data.shards import load_shard
    from lmforge.eval.perplexity import evaluate_shard, token_byte_lengths
    from lmforge.model.hf import load_pretrained
    from lmforge.tokenizer import LMTokenizer

    root = clone_run("ch")
    run = root / "ch"
    chats = root / "chats.jsonl"  # the SFT held-out conversations (files: cheap to re-read)
    chats.write_text(
        "".join(
            json.dumps(
                {"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "ok"}]}
            )
            + "\n"
            for i in range(8)
        )
    )
    args = tiny_args(
        root,
        "ch",
        "pretrain.max_steps=5",
        "eval.tasks=[]",
        "eval.doc_tokens=0",
        "eval.chain_tokens=600",
        "pretrain.seq_len=128",  # room for the held-out chat prompts the chain asks every model
        "eval.chain_answer_tokens=6",
        f"sft.data=[{chats}]",
        f"sft.val_data=[{chats}]",
    )
    with single_thread():
        assert main(["pretrain", *args]) == 0
    sft = load_pretrained(run / "pretrain" / "model")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in sft.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_pretrained(sft, run / "sft" / "model", tokenizer_dir=run / "pretrain" / "model")
    atomic_write_json(run / "sft" / "manifest.json", {"stage": "sft", "status": "complete", "metrics": {}})
    with single_thread():
        assert main(["eval", *args]) == 0
    chain = json.loads((run / "eval" / "results.json").read_text())["chain"]
    assert [r["stage"] for r in chain] == ["pretrain", "sft"]
    val = load_shard(run / "tokenizer", "val")
    tb = token_byte_lengths(LMTokenizer.load(run / "tokenizer"))
    for r in chain:
        m = load_pretrained(run / r["stage"] / "model")
        with torch.no_grad():
            ref = evaluate_shard(
                m,
                val,
                tb,
                seq_len=m.cfg.max_seq_len,
                batch_size=16,
                device=torch.device("cpu"),
                max_tokens=600,
            )
        assert abs(r["bpb"] - ref["bpb"]) < 1e-6 and r["tokens"] == ref["tokens"] <= 600
    assert chain[0]["delta_bpb"] is None
    # the SFT stage's held-out conversations, scored for every model too
    assert all(r["assistant_loss"] > 0 and r["chat_examples"] > 0 for r in chain)
    assert (
        abs(chain[1]["delta_assistant_loss"] - (chain[1]["assistant_loss"] - chain[0]["assistant_loss"]))
        < 1e-9
    )
    assert (
        abs(chain[1]["delta_bpb"] - (chain[1]["bpb"] - chain[0]["bpb"])) < 1e-9 and chain[1]["delta_bpb"] > 0
    )
    manifest = json.loads((run / "eval" / "manifest.json").read_text())
    assert manifest["metrics"]["chain/sft_bpb"] == chain[1]["bpb"]
    assert manifest["metrics"]["chain/pretrain_assistant_loss"] == chain[0]["assistant_loss"]
    # every model answered the same held-out chat prompts (no reward model in this run: no score)
    shown = json.loads((run / "eval" / "results.json").read_text())["chain_prompts"]
    assert len(shown) == 3 and all(len(r["answers"]) == 3 and r["chat_prompts"] > 0 for r in chain)
    assert all("rm_score" not in r for r in chain) and chain[0]["answers"] != chain[1]["answers"]
    with single_thread():
        assert main(["report", *args]) == 0
    md = (run / "report" / "report.md").read_text()
    assert (
        "Model chain" in md
        and "| sft |" in md
        and "chat assistant loss" in md
        and f"{chain[1]['delta_bpb']:+.4f}" in md
        and "Greedy answers of every model" in md
        and "reward-model score" not in md
    )


def test_a_new_reward_model_re_runs_eval(tmp_path):
    """The model chain scores answers with the run's reward model, so the reward stage's
    fingerprint is one of the eval stage's inputs."""
    from lmforge.pipeline import load_config, stage_fingerprint
    from lmforge.runs import atomic_write_json

    cfg = load_config("tiny", [f"run.root={tmp_path}"])
    fp0, inputs = stage_fingerprint(cfg, "eval")
    assert inputs["reward"] == "missing"
    atomic_write_json(cfg.run.dir / "reward" / "manifest.json", {"stage": "reward", "fingerprint": "abc"})
    fp1, inputs = stage_fingerprint(cfg, "eval")
    assert inputs["reward"].split(":")[0] == "abc" and fp1 != fp0  # "fingerprint:artifact digest"
