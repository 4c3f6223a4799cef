"""Self-instruct synthetic data: ROUGE-L, prompt/parse round trip, the paper's filters, the funnel
accounting of a real run, and the two generation backends agreeing under greedy decoding."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.cli import main
from lmforge.data.synth import (
    Task,
    build_prompt,
    load_seed_tasks,
    make_backend,
    parse_tasks,
    reject_reason,
    resolve_backend,
    rouge_l,
    self_instruct,
)
from lmforge.data.synth_cli import engine_sampler
from lmforge.errors import ConfigError, DataError
from lmforge.model.config import ModelConfig
from lmforge.model.hf import save_pretrained
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import train_tokenizer

SEEDS = [
    Task("Give an antonym of the word.", "happy", "sad"),
    Task("Translate the number into words.", "42", "forty-two"),
    Task("Name a fruit that is yellow.", "", "A banana."),
    Task("Sort the letters alphabetically.", "cab", "abc"),
    Task("Write the plural of the noun.", "mouse", "mice"),
    Task("Say whether the number is even or odd.", "7", "odd"),
]


def test_rouge_l_matches_hand_computation():
    # tokens a = the cat sat on the mat (6), b = the cat is on the mat (6); LCS = the cat on the mat (5)
    assert rouge_l("The cat sat on the mat.", "the cat is on the mat") == pytest.approx(5 / 6)
    assert rouge_l("abc", "abc") == 1.0
    assert rouge_l("abc", "xyz") == 0.0
    assert rouge_l("", "abc") == 0.0
    # LCS is order-sensitive: reversed words share only one in order
    assert rouge_l("one two three", "three two one") == pytest.approx(1 / 3)


def test_prompt_parse_round_trip():
    prompt = build_prompt(SEEDS[:3])
    assert prompt.endswith("4. Instruction:")
    cont = (
        " List three colours.\n4. Input: <noinput>\n4. Output: red, green\nblue\n"
        "5. Instruction: Reverse the word.\n5. Input: abc\n5. Output: cba\n6. Instruction: trunc"
    )
    tasks = parse_tasks(4, cont)
    assert [t.instruction for t in tasks] == ["List three colours.", "Reverse the word.", "trunc"]
    assert tasks[0].input == "" and tasks[0].output == "red, green\nblue"
    assert tasks[1].input == "abc" and tasks[1].output == "cba"
    assert tasks[2].output == ""  # cut off: rejected later as empty_output


@pytest.mark.parametrize(
    "task,why",
    [
        (Task("", "", "x"), "empty_instruction"),
        (Task("Name a colour please now.", "", ""), "empty_output"),
        (Task("Do it.", "", "x"), "too_short"),
        (Task(" ".join(["word"] * 151), "", "x"), "too_long"),
        (Task("- list some animals here", "", "x"), "bad_start"),
        (Task("Describe the image in detail.", "", "x"), "blacklisted_word"),
        (Task("Give an antonym of the word please.", "", "x"), "too_similar"),
        (Task("Count the vowels in the sentence.", "", "3"), None),
    ],
)
def test_filters(task, why):
    assert reject_reason(task, [s.instruction for s in SEEDS]) == why


def test_seed_reader_formats_and_errors(tmp_path):
    p = tmp_path / "seeds.jsonl"
    p.write_text(
        json.dumps({"instruction": "A?", "instances": [{"input": "", "output": "B"}]})
        + "\n\n"
        + json.dumps({"instruction": "C?", "output": "D"})
        + "\n"
        + json.dumps({"prompt": "E?", "completion": "F"})
        + "\n"
    )
    assert [(t.instruction, t.output) for t in load_seed_tasks(p)] == [("A?", "B"), ("C?", "D"), ("E?", "F")]
    p.write_text(json.dumps({"instruction": "A?", "instances": []}) + "\n")
    with pytest.raises(DataError, match=r"seeds.jsonl:1: field 'instances'"):
        load_seed_tasks(p)
    p.write_text('{"instruction": "ok", "output": "x"}\n{bad json\n')
    with pytest.raises(DataError, match=r"seeds.jsonl:2: invalid JSON"):
        load_seed_tasks(p)


@pytest.fixture(scope="module")
def format_model(tmp_path_factory):
    """A tiny model trained for a few seconds on self-instruct prompts, so it continues the
    numbered task format (a random model would only emit noise). Trained on one thread so the
    weights, and so the greedy path the backends must agree on, do not depend on test order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    texts = [build_prompt(SEEDS[i:] + SEEDS[:i]) for i in range(len(SEEDS))]
    texts = [t[: -len(" Instruction:") - 2] for t in texts]  # whole numbered lists
    tok = train_tokenizer(texts * 4, vocab_size=300)
    d = tmp_path_factory.mktemp("fmt")
    tok.save(d)
    model = Transformer(
        ModelConfig(
            vocab_size=tok.vocab_size, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256
        )
    )
    ids = [tok.encode(t, add_bos=True) for t in texts]
    n = min(min(map(len, ids)), 256)
    batch = torch.tensor([x[:n] for x in ids])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(80):
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    assert loss.item() < 2.5  # from ~5.7 at init: it has learned the numbered format
    save_pretrained(model.eval(), d, tokenizer_dir=d, bos_id=tok.bos_id, eos_id=tok.eos_id)
    return d


def test_self_instruct_accounts_for_every_candidate(format_model):
    gen = make_backend(
        "lmforge", format_model, sample=engine_sampler, temperature=1.0, top_p=1.0, max_new_tokens=96, seed=0
    )
    tasks, rep = self_instruct(
        SEEDS, gen, num_tasks=5, seed=1, batch_size=4, max_new_tokens=96, max_prompts=8
    )
    assert rep.prompts == 8 or len(tasks) == 5
    assert rep.candidates > 0, "the trained model continues the numbered format"
    assert rep.candidates == rep.kept + sum(rep.rejected.values())
    assert rep.kept == len(tasks) <= 5
    pool = [s.instruction for s in SEEDS]
    for t in tasks:  # kept tasks pass the filters against everything kept before them
        assert reject_reason(t, pool) is None
        pool.append(t.instruction)


def test_backends_agree_greedy(format_model):
    """transformers and lmforge's engine decode the same tokens from the same folder (greedy);
    the lmforge backend cannot run without the engine handed in."""
    pytest.importorskip("transformers")
    prompt = [build_prompt(SEEDS[:2])]
    kw = dict(temperature=0.0, top_p=1.0, max_new_tokens=24, seed=0)
    ours = make_backend("lmforge", format_model, sample=engine_sampler, **kw)(prompt, 24)[0]
    theirs = make_backend("hf", format_model, **kw)(prompt, 24)[0]
    assert ours.strip() and ours.strip() == theirs.strip()
    assert resolve_backend("auto", format_model) == "lmforge"
    with pytest.raises(ConfigError, match="needs a sampler"):
        make_backend("lmforge", format_model, **kw)


def test_cli_writes_messages_jsonl_and_report(format_model, tmp_path, capsys):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(
        "".join(
            json.dumps({"instruction": s.instruction, "input": s.input, "output": s.output}) + "\n"
            for s in SEEDS
        )
    )
    out = tmp_path / "synth.jsonl"
    assert (
        main(
            [
                "synth",
                str(format_model),
                "--seeds",
                str(seeds),
                "--out",
                str(out),
                "-n",
                "3",
                "--max-prompts",
                "4",
                "--temperature",
                "1.0",
                "--top-p",
                "1.0",
                "--max-new-tokens",
                "64",
            ]
        )
        == 0
    )
    assert "generates through lmforge's serving engine" in capsys.readouterr().err  # the one log line
    rep = json.loads((tmp_path / "synth.jsonl.report.json").read_text())
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == rep["kept"] and rep["candidates"] == rep["kept"] + sum(rep["rejected"].values())
    for r in rows:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
    assert main(["synth", str(tmp_path), "--seeds", str(seeds), "--out", str(out)]) == 2  # not a model folder
