"""lm-evaluation-harness: its Hugging Face backend, lmforge's adapter and lmforge's own
multiple-choice evaluator agree on a tiny random Llama and a local task (no download)."""

import csv
import json
import os
import random

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")

from lmforge.eval.loglik import Scorer  # noqa: E402
from lmforge.eval.readers import load_task  # noqa: E402
from lmforge.eval.tasks import evaluate_multiple_choice  # noqa: E402
from lmforge.serve.loading import load_model_and_tokenizer  # noqa: E402
from tests.factories import WORDS, tiny_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread


def _items(n=24, seed=3):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = rng.choice([3, 4])
        choices = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))) for _ in range(k)]
        out.append(
            {
                "id": str(i),
                "query": " ".join(rng.choice(WORDS) for _ in range(5)).capitalize() + ":",
                "choices": choices,
                "gold": rng.randrange(k),
            }
        )
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp = tmp_path_factory.mktemp("harness")
    tok = tiny_tokenizer()
    cfg = transformers.LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=48,
        initializer_range=0.2,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
    )
    torch.manual_seed(1)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    model_dir = tmp / "model"
    hf.save_pretrained(model_dir)
    tok.save(model_dir)
    items = tmp / "tasks" / "items.jsonl"
    items.parent.mkdir()
    items.write_text("".join(json.dumps(r) + "\n" for r in _items()))
    (tmp / "tasks" / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {items}
  cache_dir: {tmp / "hf_cache"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    return hf, model_dir, tmp / "tasks", items


def _run(lm, task_dir):
    from lm_eval.tasks import TaskManager

    tm = TaskManager(
        include_path=str(task_dir), include_defaults=False
    )  # skip indexing 1000s of built-in tasks
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=["tiny_mc"],
        task_manager=tm,
        log_samples=True,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )


def test_multiple_choice_matches_harness(setup):
    from lm_eval.models.huggingface import HFLM

    import lmforge.eval.harness as H

    hf, model_dir, task_dir, items = setup
    hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(model_dir)
    ref = _run(HFLM(pretrained=hf, tokenizer=hf_tok, batch_size=8, max_length=48), task_dir)
    ours = _run(H.LMForgeLM(pretrained=str(model_dir), add_bos_token=False), task_dir)
    r, o = ref["results"]["tiny_mc"], ours["results"]["tiny_mc"]
    assert r["acc,none"] == o["acc,none"] and r["acc_norm,none"] == o["acc_norm,none"]
    # the same per-choice log-likelihoods (the harness sums float32 per-token scores, lmforge sums in
    # float64: sums of ~100 nats differ in the last float32 digit)
    for a, b in zip(ref["samples"]["tiny_mc"], ours["samples"]["tiny_mc"]):
        for (x,), (y,) in zip(a["resps"], b["resps"]):
            assert y[0] == pytest.approx(x[0], rel=1e-6, abs=1e-5)
    # lmforge's own evaluator on the same items and prompts gives the harness's accuracies
    model, tok = load_model_and_tokenizer(model_dir)
    task = load_task(str(items))
    res = evaluate_multiple_choice(Scorer(model, tok, add_bos=False), task)
    assert res["n"] == len(task.docs) == r["sample_len"]
    assert res["acc"]["value"] == pytest.approx(r["acc,none"])
    assert res["acc_norm"]["value"] == pytest.approx(r["acc_norm,none"])
    assert res["acc"]["value"] != res["acc_norm"]["value"] or res["chance"] < 1  # both computed


def test_adapter_rolling_and_generation(setup):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    import lmforge.eval.harness as H

    hf, model_dir, _, _ = setup
    hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(model_dir)
    ref = HFLM(pretrained=hf, tokenizer=hf_tok, batch_size=4, max_length=48)
    ours = H.LMForgeLM(pretrained=str(model_dir), add_bos_token=False)
    text = "The quick brown fox jumps over the lazy dog. " * 6  # longer than the 48-token context
    reqs = [
        Instance("loglikelihood_rolling", {}, (text,), 0),
        Instance("loglikelihood_rolling", {}, ("apple",), 1),
    ]
    for a, b in zip(ref.loglikelihood_rolling(reqs), ours.loglikelihood_rolling(reqs)):
        assert b == pytest.approx(a, rel=1e-6, abs=1e-5)
    gen = ours.generate_until(
        [Instance("generate_until", {}, ("The quick", {"until": ["\n"], "max_gen_toks": 8}), 0)]
    )
    assert isinstance(gen[0], str) and "\n" not in gen[0]


def test_mmlu_five_shot_prompts_match_harness(setup, tmp_path):
    """The standard dev/ + test/ MMLU layout: lmforge evaluates test only and builds every 5-shot
    prompt exactly as the harness's own `mmlu_<subject>` config (first_n dev shots) does."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    hf, model_dir, _, _ = setup
    rng = random.Random(5)
    data, tasks = tmp_path / "mmlu", tmp_path / "tasks"
    tasks.mkdir()
    template = (
        "{{question.strip()}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC. {{choices[2]}}\\n"
        "D. {{choices[3]}}\\nAnswer:"
    )
    for subject in ("anatomy", "college_physics"):
        for split, n in (("dev", 6), ("test", 4)):
            rows = [
                {
                    "question": " ".join(rng.choice(WORDS) for _ in range(4)) + f" {split}{i}? ",
                    "choices": [rng.choice(WORDS) for _ in range(4)],
                    "answer": rng.randrange(4),
                }
                for i in range(n)
            ]
            (data / split).mkdir(parents=True, exist_ok=True)
            with open(data / split / f"{subject}_{split}.csv", "w", newline="") as f:
                w = csv.writer(f)
                for r in rows:
                    w.writerow([r["question"], *r["choices"], "ABCD"[r["answer"]]])
            (tmp_path / f"{subject}_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        desc = (
            f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}."
        )
        (tasks / f"mmlu_{subject}.yaml").write_text(
            f"task: mmlu_{subject}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    dev: {tmp_path / f'{subject}_dev.jsonl'}\n    test: {tmp_path / f'{subject}_test.jsonl'}\n"
            f"  cache_dir: {tmp_path / 'hf_cache'}\n"
            f"test_split: test\nfewshot_split: dev\nfewshot_config:\n  sampler: first_n\n"
            f'output_type: multiple_choice\ndoc_to_text: "{template}"\n'
            f'doc_to_choice: ["A", "B", "C", "D"]\ndoc_to_target: answer\n'
            f'description: "{desc}\\n\\n"\nmetric_list:\n  - metric: acc\n'
        )
    hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(model_dir)
    ref = lm_eval.simple_evaluate(
        model=HFLM(pretrained=hf, tokenizer=hf_tok, batch_size=8, max_length=48),
        tasks=["mmlu_anatomy", "mmlu_college_physics"],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        num_fewshot=5,
        log_samples=True,
        fewshot_random_seed=0,
    )
    theirs = {
        (s["doc"]["question"].strip(), tuple(s["doc"]["choices"])): [a[0] for a in s["arguments"]]
        for name in ("mmlu_anatomy", "mmlu_college_physics")
        for s in ref["samples"][name]
    }
    task = load_task(f"mmlu:{data}")
    assert len(task.docs) == len(theirs) == 8  # the dev items are shots, not evaluated items
    for i, doc in enumerate(task.docs):
        q = doc.query.split("\nA. ")[0]
        choices = tuple(line[3:] for line in doc.query.split("\n")[1:5])
        ctx = task.prompt(i, 5)
        assert [ctx] * 4 == [c for c in theirs[(q, choices)]]
        assert ctx.count("Answer:") == 6
