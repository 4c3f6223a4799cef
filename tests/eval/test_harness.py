"""lm-evaluation-harness: its Hugging Face backend, lmforge's adapter and lmforge's own
multiple-choice evaluator agree on a tiny random Llama and a local task (no download)."""

import json
import os
import random

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")

from lmforge.eval.loading import load_model_and_tokenizer  # noqa: E402
from lmforge.eval.loglik import Scorer  # noqa: E402
from lmforge.eval.readers import load_task  # noqa: E402
from lmforge.eval.tasks import evaluate_multiple_choice  # noqa: E402
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
