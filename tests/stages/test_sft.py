"""The `sft` stage end to end on a tiny model: offline instruction data, held-out loss goes down,
outputs for every method load back; bad data is reported with file and line."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.data.instruct import builtin_instructions, summary_sentence
from lmforge.errors import DataError
from lmforge.model.hf import load_pretrained
from lmforge.peft.lora import load_adapter
from lmforge.pipeline import load_config, run_stage
from tests.conftest import save_base_model
from tests.factories import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    recs = builtin_instructions(max_examples=400)
    texts = [m["content"] for r in recs for m in r["messages"]]
    d = tmp_path_factory.mktemp("base")
    save_base_model(d, texts, 512, d_model=48, max_seq_len=128)
    return d


def _run(tmp_path, base_dir, *overrides):
    cfg = load_config(
        None,
        [
            f"run.root={tmp_path}",
            f"sft.model={base_dir}",
            "sft.max_examples=300",
            "sft.max_steps=12",
            "sft.batch_size=4",
            "sft.lr=5e-3",
            "sft.log_every=50",
            "sft.max_val_examples=24",
            "sft.num_samples=2",
            "sft.sample_max_new_tokens=8",
            "run.device=cpu",
            *overrides,
        ],
    )
    return run_stage(cfg, "sft", force=True)


def test_instruction_data_is_offline_and_deterministic():
    a = builtin_instructions(max_examples=500)
    assert a == builtin_instructions(max_examples=500) and len(a) == 500
    roles = {tuple(m["role"] for m in r["messages"]) for r in a}
    assert ("user", "assistant") in roles and ("system", "user", "assistant") in roles
    assert any(len(r) == 4 for r in roles)  # some two-turn conversations
    assert all(r["messages"][-1]["content"].endswith(".") for r in a)
    assert (
        summary_sentence("Return the sum of a and b.  More text here.\n\nDetails.")
        == "Return the sum of a and b."
    )
    assert summary_sentence("dumps(obj) -> str") is None


def test_full_sft_lowers_heldout_assistant_loss(tmp_path, base_dir):
    o = _run(tmp_path, base_dir)
    m = o.metrics
    assert m["method"] == "full" and m["steps"] == 12
    assert m["val_loss_after"] < m["val_loss_before"] - 0.3
    model = load_pretrained(o.dir / "model")
    assert model.cfg.vocab_size == 512 and (o.dir / "model" / "tokenizer_config.json").exists()
    samples = [json.loads(x) for x in (o.dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and all({"question", "reference", "before", "after"} <= set(s) for s in samples)
    manifest = json.loads((o.dir / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    # processed tokens/s, the loss units under their own name, peak memory: summary and manifest
    for key in ("tokens_per_s", "assistant_tokens", "assistant_tokens_per_s", "peak_memory_bytes"):
        assert m[key] > 0 and manifest["metrics"][key] == m[key], key
    assert m["tokens"] > m["assistant_tokens"]  # prompts and templates are processed too
    assert m["peak_memory_kind"] == "cpu_peak_rss"


def test_lora_sft_writes_peft_adapter_and_merged_model(tmp_path, base_dir):
    o = _run(tmp_path, base_dir, "sft.method=lora", "sft.lora.r=4", "sft.lora.use_dora=true")
    assert o.metrics["val_loss_after"] < o.metrics["val_loss_before"]
    assert 0 < o.metrics["trainable_fraction"] < 0.2
    cfg = json.loads((o.dir / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_dora"] is True
    base = load_pretrained(base_dir)
    load_adapter(base, o.dir / "adapter")
    merged = load_pretrained(o.dir / "model")
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), base(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["qlora", "prompt"])
def test_qlora_and_prompt_tuning_run(tmp_path, base_dir, method):
    if method == "qlora":
        pytest.importorskip("torchao")
    o = _run(
        tmp_path,
        base_dir,
        f"sft.method={method}",
        "sft.max_steps=6",
        "sft.lr=1e-2",
        "sft.prompt_tuning.num_virtual_tokens=4",
    )
    assert o.metrics["val_loss_after"] < o.metrics["val_loss_before"]
    assert (o.dir / "adapter" / "adapter_config.json").exists()
    assert (o.dir / "model").exists() == (method == "qlora")


def test_bad_jsonl_is_named_or_counted(tmp_path, base_dir):
    good = [
        {
            "messages": [
                {"role": "user", "content": f"What does `json.dumps` do? ({i})"},
                {"role": "assistant", "content": "Serialize obj to a JSON formatted str."},
            ]
        }
        for i in range(40)
    ]
    bad = {"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}
    f = tmp_path / "chat.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in good[:30] + [bad] + good[30:]) + "\n")
    with pytest.raises(DataError, match=r"chat.jsonl:31: message 0 has unknown role 'wizard'"):
        _run(tmp_path, base_dir, f"sft.data={f}")
    o = _run(tmp_path, base_dir, f"sft.data={f}", "sft.on_bad_record=skip", "sft.max_steps=2")
    assert o.metrics["train_skipped_unknown_role"] + o.metrics.get("val_skipped_unknown_role", 0) <= 1
    assert o.metrics["train_examples"] + o.metrics["val_examples"] == 40


def test_sample_answers_come_from_the_engine_like_the_reference(base_dir):
    """The before/after answers run on the serving engine; greedy, they equal the reference
    decoder re-running the whole sequence each step (no cache), plain and prompt-tuned."""
    from lmforge.chat import ChatFormat
    from lmforge.stages.sft import answer

    fmt = ChatFormat.from_dir(base_dir)
    model = tiny_model(fmt.tok.vocab_size, max_seq_len=128, seed=3)  # peaked: answers are not empty
    convs = [
        [{"role": "user", "content": q}] for q in ("What does the function return?", "Hi", "Name a list")
    ]
    got = answer(model, fmt, convs, 8)
    assert got == answer(model, fmt, convs, 8, reference=True) and any(got)
    # prompt tuning: the virtual tokens' K/V in the engine's cache, the same answers again
    from lmforge.peft.prompt import PromptTuned

    pt = PromptTuned(model, 4, seed=1)
    got = answer(pt, fmt, convs, 8)
    assert got == answer(pt, fmt, convs, 8, reference=True) and any(got)
