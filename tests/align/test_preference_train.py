"""`lmforge align` end to end on a tiny model and an easy synthetic preference set: held-out
preference accuracy rises for DPO / IPO / ORPO, LoRA works, and a cached reference gives the
same losses as a live one."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.align.pair_batches import collate_pairs
from lmforge.align.preference import encode_pairs, load_preference_records
from lmforge.align.reference import CACHE_FILE, load_cache, precompute_reference
from lmforge.chat import ChatFormat
from lmforge.model.hf import load_pretrained
from lmforge.peft.lora import load_adapter
from lmforge.pipeline import load_config, run_stage
from lmforge.runs import read_jsonl
from lmforge.train.objectives.preference import PreferenceObjective
from tests.conftest import save_pairs_and_base

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model_dir, data, _, _ = save_pairs_and_base(tmp_path_factory.mktemp("align"))
    return model_dir, data


def _run(tmp_path, setup, *overrides):
    model_dir, data = setup
    cfg = load_config(
        None,
        [
            f"run.root={tmp_path}",
            "run.device=cpu",
            f"align.model={model_dir}",
            f"align.data={data}",
            "align.val_fraction=0.2",
            "align.max_steps=20",
            "align.batch_size=4",
            "align.lr=3e-3",
            "align.warmup_steps=2",
            "align.log_every=1",
            "align.checkpoint_every=0",
            "align.seq_len=64",
            "align.max_examples=null",
            *overrides,
        ],
    )
    return run_stage(cfg, "align", force=True)


@pytest.mark.parametrize("method,beta", [("dpo", 0.1), ("ipo", 0.05), ("orpo", 0.5)])
def test_heldout_preference_accuracy_rises(tmp_path, setup, method, beta):
    o = _run(tmp_path, setup, f"align.method={method}", f"align.beta={beta}")
    m = o.metrics
    assert m["method"] == method and m["steps"] == 20 and m["val_pairs"] >= 5
    assert m["val_accuracy_before"] < 0.5 and m["val_accuracy_after"] > 0.8, m
    assert m["val_margin_after"] > m["val_margin_before"]
    assert m["val_log_ratio_chosen_after"] is not None and m["val_reward_accuracy_after"] > 0.8
    assert m["reference"] == ("none" if method == "orpo" else "cached")
    assert (o.dir / "model" / "config.json").exists() and (o.dir / "before.json").exists()
    recs = [r for r in read_jsonl(o.dir / "metrics.jsonl") if "loss" in r]
    assert "rewards/margins" in recs[0] and "rewards/accuracies" in recs[0]
    if method == "dpo":
        assert recs[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1
    if method == "orpo":
        assert "nll_loss" in recs[0] and "log_odds_ratio" in recs[0]


def test_lora_align_writes_adapter_and_merged_model(tmp_path, setup):
    o = _run(tmp_path, setup, "align.method=dpo", "align.peft=lora", "align.lora.r=4", "align.lr=1e-2")
    m = o.metrics
    assert m["peft"] == "lora" and m["trainable_params"] < 20_000
    assert m["val_reward_accuracy_after"] > 0.8 and m["val_margin_after"] > m["val_margin_before"]
    merged = load_pretrained(o.dir / "model")
    base = load_pretrained(setup[0])
    load_adapter(base, o.dir / "adapter")
    x = torch.randint(0, merged.cfg.vocab_size, (2, 12))
    assert torch.allclose(merged(x), base(x), atol=1e-4)


def test_cached_reference_equals_live_reference(tmp_path, setup):
    model_dir, data = setup
    fmt = ChatFormat.from_dir(model_dir)
    pairs, _ = encode_pairs(load_preference_records([str(data)]), fmt, 64)
    ref = load_pretrained(model_dir)
    policy = load_pretrained(model_dir)
    with torch.no_grad():  # a policy that differs from the reference
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    table = precompute_reference(
        ref, pairs, tmp_path / CACHE_FILE, fmt.tok.pad_id, "cpu", batch_size=5, log=lambda m: None
    )
    assert load_cache(tmp_path / CACHE_FILE) == table and len(table) == len(pairs)
    batch = pairs[3:11]
    cached = collate_pairs(batch, fmt.tok.pad_id, table)
    live = collate_pairs(batch, fmt.tok.pad_id)
    a = PreferenceObjective("dpo", 0.1)(policy, cached)
    b = PreferenceObjective("dpo", 0.1, ref_model=ref)(policy, live)
    assert a[1] == b[1] == 8
    assert a[0].item() == pytest.approx(b[0].item(), abs=1e-5)
    assert float(a[2]["rewards/margins"]) == pytest.approx(float(b[2]["rewards/margins"]), abs=1e-5)
    # and through the stage: the same step losses with precompute_ref on and off
    o1 = _run(tmp_path / "c", setup, "align.max_steps=3", "align.precompute_ref=true")
    o2 = _run(tmp_path / "l", setup, "align.max_steps=3", "align.precompute_ref=false")
    assert o1.metrics["reference"] == "cached" and o2.metrics["reference"] == "live"
    l1 = [r["loss"] for r in read_jsonl(o1.dir / "metrics.jsonl") if "loss" in r]
    l2 = [r["loss"] for r in read_jsonl(o2.dir / "metrics.jsonl") if "loss" in r]
    assert len(l1) == 3 and l1 == pytest.approx(l2, abs=1e-4)
    assert o1.metrics["val_loss_after"] == pytest.approx(o2.metrics["val_loss_after"], abs=1e-4)


def test_packed_pairs_give_the_same_logps_losses_and_grads(setup):
    """Chosen and rejected as two documents of one row (one packed forward) = 2B padded rows =
    each completion scored alone (fp32), for log-probs, counts, the DPO loss and its gradients."""
    from lmforge.train.objectives.preference import batch_logps, completion_logps

    model_dir, data = setup
    fmt = ChatFormat.from_dir(model_dir)
    pairs, _ = encode_pairs(load_preference_records([str(data)]), fmt, 64)
    batch = pairs[:5]
    policy = load_pretrained(model_dir)
    packed = collate_pairs(batch, fmt.tok.pad_id, packed=True)
    rows = collate_pairs(batch, fmt.tok.pad_id)
    assert packed["input_ids"].shape[0] == 5 and rows["input_ids"].shape[0] == 10
    assert packed["n_tokens"] == rows["n_tokens"] and torch.equal(packed["seq_counts"], rows["seq_counts"])
    lp_packed, n_packed = batch_logps(policy, packed)
    lp_rows, _ = batch_logps(policy, rows)
    torch.testing.assert_close(lp_packed, lp_rows, atol=1e-4, rtol=1e-5)
    for i, p in enumerate(batch):  # each completion alone, through the generic helper
        for j, comp in enumerate((p.chosen, p.rejected)):
            ids = torch.tensor([p.prompt + comp])
            labels = torch.full_like(ids, -100)
            labels[0, len(p.prompt) - 1 : -1] = ids[0, len(p.prompt) :]
            alone, n = completion_logps(policy, ids, labels)
            torch.testing.assert_close(lp_packed[i + 5 * j], alone[0], atol=1e-4, rtol=1e-5)
            assert int(n_packed[i + 5 * j]) == int(n[0]) == len(comp)
    ref = {p.key(): (0.0, 0.0) for p in batch}
    obj = PreferenceObjective("dpo", 0.1)
    grads = []
    for b in (
        collate_pairs(batch, fmt.tok.pad_id, ref, packed=True),
        collate_pairs(batch, fmt.tok.pad_id, ref),
    ):
        policy.zero_grad()
        loss, n, _ = obj(policy, b)
        loss.backward()
        assert n == 5
        grads.append((float(loss.detach()), [q.grad.clone() for q in policy.parameters()]))
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-5)
    for g1, g2 in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-4)


def test_qlora_align_runs_and_saves_dequantised_model(tmp_path, setup):
    o = _run(
        tmp_path,
        setup,
        "align.method=orpo",
        "align.peft=qlora",
        "align.lora.r=4",
        "align.max_steps=3",
        "align.qlora.compute_dtype=float32",
    )
    assert o.metrics["peft"] == "qlora" and o.metrics["steps"] == 3
    assert (o.dir / "adapter" / "adapter_config.json").exists()
    model = load_pretrained(o.dir / "model")
    assert next(model.parameters()).dtype == torch.float32


def test_bad_pairs_are_skipped_and_reported_by_the_stage(tmp_path, setup):
    model_dir, data = setup
    bad = tmp_path / "mixed.jsonl"
    lines = data.read_text().splitlines()
    lines[2] = json.dumps({"prompt": "Hi.", "chosen": "Same.", "rejected": "Same."})
    lines[4] = json.dumps({"prompt": "Hi.", "chosen": "", "rejected": "No."})
    lines[6] = json.dumps({"prompt": "word " * 80, "chosen": "Yes.", "rejected": "No."})
    lines[8] = '{"prompt": "Hi.", "chosen": 3, "rejected": "No."}'
    bad.write_text("\n".join(lines) + "\n")
    o = _run(tmp_path, (model_dir, bad), "align.max_steps=2", "align.val_fraction=0.01")
    m = o.metrics
    dropped = {k: v for k, v in m.items() if k.startswith(("train_dropped", "val_dropped")) and v}
    assert sum(v for k, v in dropped.items() if k.endswith("dropped")) == 4, dropped
    for reason in ("identical", "empty_completion", "prompt_too_long", "malformed"):
        assert m.get(f"train_dropped_{reason}", 0) + m.get(f"val_dropped_{reason}", 0) == 1, (reason, m)
    log = (tmp_path / "tiny" / "log.txt").read_text()
    assert f"{bad}:9: field 'chosen'" in log


def test_report_shows_alignment_before_after(tmp_path, setup):
    from lmforge.stages.report import ReportConfig, alignment_rows, write_report

    _run(tmp_path, setup, "align.max_steps=2")
    run_dir = tmp_path / "tiny"
    rows = alignment_rows(run_dir)
    acc = next(r for r in rows if r[1] == "val_accuracy")
    assert acc[0] == "align (dpo)" and acc[2] is not None and acc[3] is not None
    assert any(r[1] == "val_log_ratio_chosen" for r in rows)
    write_report(run_dir, tmp_path / "report", ReportConfig(plots=False))
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Alignment: before / after" in md and "| align (dpo) | val_accuracy |" in md
