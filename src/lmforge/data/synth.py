"""Synthetic instruction data, self-instruct style (Wang et al., 2023, arXiv:2212.10560).

Seed tasks -> few-shot prompt -> the model writes new tasks -> filters -> a growing pool.
Each round samples `num_seed_examples` human seed tasks and `num_machine_examples` tasks the
model already produced, numbers them in a prompt ("1. Instruction: ... Input: ... Output: ...")
and lets the model continue the list. Its continuation is parsed back into tasks; a task is kept
only if it passes the filters of the paper:

- it parses (an instruction, and an output unless outputs are not required),
- the instruction has 3..150 words and does not start with punctuation or a non-ASCII letter,
- it names none of the things a text model cannot handle (image, graph, file, map, draw, ...),
- its ROUGE-L F-score against every instruction already in the pool is below 0.7.

Every rejected candidate is counted under its reason; nothing is dropped silently. The output is
JSONL in the `messages` form that `lmforge sft --data FILE` reads, written atomically, plus a
`*.report.json` with the funnel.

The model can be any lmforge model folder (our own fast generation path) or any Hugging Face
causal LM folder that `transformers` loads (`backend: hf`), so a user can bootstrap data with a
stronger model than the one being trained.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..errors import ConfigError, DataError
from ..runs import atomic_write_json, atomic_write_text

# the self-instruct paper's blacklist: tasks a language model cannot do with text alone
BLACKLIST = (
    "image",
    "images",
    "graph",
    "graphs",
    "picture",
    "pictures",
    "file",
    "files",
    "map",
    "maps",
    "draw",
    "plot",
    "go to",
    "video",
    "audio",
    "music",
    "flowchart",
    "diagram",
)
HEADER = "Come up with a series of tasks. Each task has an instruction, an optional input and an output.\n"


@dataclass
class Task:
    instruction: str
    input: str = ""
    output: str = ""
    source: str = "seed"

    def messages(self) -> list[dict]:
        user = self.instruction if not self.input else f"{self.instruction}\n\n{self.input}"
        return [{"role": "user", "content": user}, {"role": "assistant", "content": self.output}]

    def render(self, i: int) -> str:
        return (
            f"{i}. Instruction: {self.instruction}\n{i}. Input: {self.input or '<noinput>'}\n"
            f"{i}. Output: {self.output}\n"
        )


# ----------------------------------------------------------------------------- seeds
def load_seed_tasks(path: str | Path) -> list[Task]:
    """Seed tasks from JSONL: the self-instruct seed format (`instruction` + `instances` of
    {input, output}), flat {instruction, input?, output}, or {prompt, completion}."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"synth seeds: {path} not found")
    tasks: list[Task] = []
    with open(path, encoding="utf-8", errors="strict") as f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{ln}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            if "instruction" in rec:
                inst = rec["instruction"]
                if not isinstance(inst, str) or not inst.strip():
                    raise DataError(f"{where}: field 'instruction' must be a non-empty string")
                if "instances" in rec:
                    inst_list = rec["instances"]
                    if not isinstance(inst_list, list) or not inst_list or not isinstance(inst_list[0], dict):
                        raise DataError(f"{where}: field 'instances' must be a non-empty list of objects")
                    first = inst_list[0]
                    inp, out = first.get("input", ""), first.get("output", "")
                else:
                    inp, out = rec.get("input", ""), rec.get("output", "")
            elif "prompt" in rec and "completion" in rec:
                inst, inp, out = rec["prompt"], "", rec["completion"]
            else:
                raise DataError(
                    f"{where}: need 'instruction' (+ 'instances' or 'output') or 'prompt'+'completion'"
                )
            if not isinstance(inp, str) or not isinstance(out, str):
                raise DataError(f"{where}: 'input' and 'output' must be strings")
            tasks.append(Task(inst.strip(), inp.strip(), out.strip(), "seed"))
    if not tasks:
        raise DataError(f"{path}: no seed tasks")
    return tasks


# ----------------------------------------------------------------------------- ROUGE-L
_TOKEN = re.compile(r"[a-z0-9]+")


def _tokens(text: str) -> list[str]:
    # the tokenisation of Google's `rouge_score` without stemming: lowercase alphanumeric runs
    return _TOKEN.findall(text.lower())


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F1 between two strings (longest common subsequence of word tokens)."""
    ta, tb = _tokens(a), _tokens(b)
    if not ta or not tb:
        return 0.0
    lcs = _lcs(ta, tb)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(tb), lcs / len(ta)
    return 2 * p * r / (p + r)


# ----------------------------------------------------------------------------- prompt / parse
def build_prompt(examples: Sequence[Task]) -> str:
    return (
        HEADER
        + "".join(t.render(i) for i, t in enumerate(examples, 1))
        + f"{len(examples) + 1}. Instruction:"
    )


_FIELD = re.compile(r"^\s*(\d+)\.\s*(Instruction|Input|Output)\s*:\s?(.*)$", re.IGNORECASE)


def parse_tasks(first_number: int, continuation: str) -> list[Task]:
    """Tasks from the model's continuation of a prompt that ended in "`N`. Instruction:".
    Lines are attributed to the field most recently opened; an unnumbered line continues it."""
    text = f"{first_number}. Instruction:" + continuation
    tasks: dict[int, dict[str, list[str]]] = {}
    cur: list[str] | None = None
    for line in text.splitlines():
        m = _FIELD.match(line)
        if m:
            n, name = int(m.group(1)), m.group(2).lower()
            cur = tasks.setdefault(n, {}).setdefault(name, [])
            cur.append(m.group(3))
        elif cur is not None:
            cur.append(line)
    out = []
    for n in sorted(tasks):
        if n < first_number:
            continue
        fields = {k: "\n".join(v).strip() for k, v in tasks[n].items()}
        inp = fields.get("input", "")
        if inp.lower() in ("<noinput>", "<no input>", "none", "n/a"):
            inp = ""
        out.append(Task(fields.get("instruction", ""), inp, fields.get("output", ""), "machine"))
    return out


def reject_reason(
    task: Task,
    pool_instructions: Sequence[str],
    *,
    require_output: bool = True,
    max_similarity: float = 0.7,
    min_words: int = 3,
    max_words: int = 150,
) -> str | None:
    """Why `task` is rejected, or None if it is kept."""
    inst = task.instruction.strip()
    if not inst:
        return "empty_instruction"
    if require_output and not task.output.strip():
        return "empty_output"
    words = inst.split()
    if len(words) < min_words:
        return "too_short"
    if len(words) > max_words:
        return "too_long"
    if not inst[0].isascii() or not inst[0].isalnum():
        return "bad_start"
    low = f" {inst.lower()} "
    if any(re.search(rf"\b{re.escape(w)}\b", low) for w in BLACKLIST):
        return "blacklisted_word"
    if any(rouge_l(inst, p) >= max_similarity for p in pool_instructions):
        return "too_similar"
    return None


# ----------------------------------------------------------------------------- backends
Generate = Callable[[list[str], int], list[str]]


def lmforge_backend(
    model_dir: str | Path,
    *,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int,
    device: str = "cpu",
) -> Generate:
    """Sampling with lmforge's own model and KV-cache generation (any model `load_pretrained` reads)."""
    from ..model.generate import SamplingParams, generate
    from ..model.hf import load_pretrained
    from ..tokenizer import LMTokenizer

    model = load_pretrained(model_dir, device=device).eval()
    tok = LMTokenizer.load(model_dir)
    stop = [t for t in (tok.eos_id,) if t is not None]
    context = model.cfg.max_seq_len
    calls = [0]

    def run(prompts: list[str], max_new: int) -> list[str]:
        max_new = min(max_new, max_new_tokens, context // 2)
        ids = [tok.encode(p, add_bos=True)[-(context - max_new) :] for p in prompts]
        params = SamplingParams(
            max_new_tokens=max_new,
            temperature=temperature,
            top_p=top_p,
            stop_token_ids=stop,
            seed=seed + calls[0],
        )
        calls[0] += 1
        outs = generate(model, ids, params)
        return [tok.decode(o, skip_special=True) for o in outs]

    return run


def hf_backend(
    model_dir: str | Path,
    *,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int,
    device: str = "cpu",
) -> Generate:
    """Sampling with `transformers` (any causal LM it can load from a local folder)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    # transformers types `.to` as a wrapper that expects the model again: a stub quirk
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()  # type: ignore[arg-type]
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"

    def run(prompts: list[str], max_new: int) -> list[str]:
        enc = tok(prompts, return_tensors="pt", padding=True).to(device)
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(
                **enc,
                do_sample=temperature > 0,
                temperature=temperature or None,
                top_p=top_p,
                max_new_tokens=min(max_new, max_new_tokens),
                pad_token_id=tok.pad_token_id,
            )
        return tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)

    return run


def make_backend(kind: Literal["auto", "lmforge", "hf"], model_dir: str | Path, **kw) -> Generate:
    if kind == "auto":
        from ..model.hf import SUPPORTED, read_hf_config

        kind = "lmforge" if read_hf_config(model_dir).get("model_type") in SUPPORTED else "hf"
    return lmforge_backend(model_dir, **kw) if kind == "lmforge" else hf_backend(model_dir, **kw)


# ----------------------------------------------------------------------------- the loop
@dataclass
class SynthReport:
    requested: int
    prompts: int = 0
    candidates: int = 0
    kept: int = 0
    rejected: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {
            "requested": self.requested,
            "prompts": self.prompts,
            "candidates": self.candidates,
            "kept": self.kept,
            "rejected": dict(self.rejected),
        }


def self_instruct(
    seeds: Sequence[Task],
    generate: Generate,
    num_tasks: int,
    *,
    seed: int = 0,
    num_seed_examples: int = 3,
    num_machine_examples: int = 2,
    batch_size: int = 4,
    max_new_tokens: int = 256,
    max_prompts: int | None = None,
    require_output: bool = True,
    max_similarity: float = 0.7,
    log: Callable[[str], None] = lambda s: None,
) -> tuple[list[Task], SynthReport]:
    """Grow a pool of `num_tasks` machine tasks from `seeds`. Stops after `max_prompts` prompts
    (default 20 per requested task) even if the target is not reached, and says so."""
    if not seeds:
        raise ConfigError("synth: no seed tasks")
    rng = random.Random(seed)
    report = SynthReport(requested=num_tasks)
    pool: list[Task] = []
    instructions = [t.instruction for t in seeds]
    budget = max_prompts if max_prompts is not None else 20 * num_tasks
    while len(pool) < num_tasks and report.prompts < budget:
        batch, firsts = [], []
        for _ in range(min(batch_size, budget - report.prompts)):
            ex = rng.sample(list(seeds), min(num_seed_examples, len(seeds)))
            if pool and num_machine_examples:
                ex += rng.sample(pool, min(num_machine_examples, len(pool)))
            rng.shuffle(ex)
            batch.append(build_prompt(ex))
            firsts.append(len(ex) + 1)
        report.prompts += len(batch)
        for first, text in zip(firsts, generate(batch, max_new_tokens)):
            for task in parse_tasks(first, text):
                report.candidates += 1
                why = reject_reason(
                    task, instructions, require_output=require_output, max_similarity=max_similarity
                )
                if why is None and len(pool) >= num_tasks:
                    why = "over_target"
                if why:
                    report.rejected[why] += 1
                    continue
                pool.append(task)
                instructions.append(task.instruction)
                report.kept += 1
        log(f"synth: {report.prompts} prompts, {report.candidates} candidates, {report.kept} kept")
    if len(pool) < num_tasks:
        log(
            f"synth: stopped after {report.prompts} prompts with {len(pool)} of {num_tasks} tasks "
            f"(rejected: {dict(report.rejected)})"
        )
    return pool, report


def write_tasks(
    tasks: Sequence[Task], out: str | Path, report: SynthReport, extra: dict | None = None
) -> Path:
    """JSONL of {messages, instruction, input, output, source} + `<out>.report.json`, atomically."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps(
            {
                "messages": t.messages(),
                "instruction": t.instruction,
                "input": t.input,
                "output": t.output,
                "source": t.source,
            },
            ensure_ascii=False,
        )
        + "\n"
        for t in tasks
    ]
    atomic_write_text(out, "".join(lines))
    atomic_write_json(out.with_name(out.name + ".report.json"), {**report.as_dict(), **(extra or {})})
    return out


# ----------------------------------------------------------------------------- CLI
def add_parser(sub) -> None:
    p = sub.add_parser(
        "synth",
        help="generate instruction data from seed tasks with a model (self-instruct)",
        description=__doc__.split("\n\n")[0].rstrip(".") + ". Writes JSONL in the messages form that "
        "`lmforge sft --data FILE` reads, and FILE.report.json with every "
        "rejected candidate counted by reason.",
    )
    p.add_argument("model", help="model folder: an lmforge model or any Hugging Face causal LM folder")
    p.add_argument(
        "--seeds",
        required=True,
        help="seed tasks JSONL (self-instruct seed_tasks.jsonl format, "
        "{instruction,input,output} or {prompt,completion})",
    )
    p.add_argument("--out", required=True, help="output JSONL file")
    p.add_argument("-n", "--num-tasks", type=int, default=100, help="machine tasks to keep (default 100)")
    p.add_argument(
        "--backend",
        choices=("auto", "lmforge", "hf"),
        default="auto",
        help="generation backend (auto: lmforge for Llama-family folders, else transformers)",
    )
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.5, help="nucleus sampling (the paper uses 0.5)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4, help="prompts generated together")
    p.add_argument("--max-prompts", type=int, default=None, help="prompt budget (default 20 per task)")
    p.add_argument("--max-similarity", type=float, default=0.7, help="ROUGE-L threshold against the pool")
    p.add_argument("--no-require-output", action="store_true", help="keep tasks without an output")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_synth)


def cmd_synth(a) -> int:
    import sys

    if a.num_tasks < 1:
        raise ConfigError("--num-tasks must be >= 1")
    if not 0 < a.max_similarity <= 1:
        raise ConfigError("--max-similarity must be in (0, 1]")
    if not Path(a.model, "config.json").exists():
        raise ConfigError(f"{a.model}: not a model folder (no config.json)")
    seeds = load_seed_tasks(a.seeds)
    gen = make_backend(
        a.backend,
        a.model,
        temperature=a.temperature,
        top_p=a.top_p,
        max_new_tokens=a.max_new_tokens,
        seed=a.seed,
        device=a.device,
    )
    tasks, report = self_instruct(
        seeds,
        gen,
        a.num_tasks,
        seed=a.seed,
        batch_size=a.batch_size,
        max_new_tokens=a.max_new_tokens,
        max_prompts=a.max_prompts,
        require_output=not a.no_require_output,
        max_similarity=a.max_similarity,
        log=lambda s: print(s, file=sys.stderr),
    )
    write_tasks(
        tasks, a.out, report, {"model": str(a.model), "seeds": str(a.seeds), "seed_tasks": len(seeds)}
    )
    print(json.dumps({"out": str(a.out), **report.as_dict()}, indent=2))
    return 0
