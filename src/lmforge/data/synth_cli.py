"""`lmforge synth`: the self-instruct command (data/synth.py does the work). A tool command, so it
sits with the CLI in the layers and can hand synth the serving engine: a teacher lmforge can load
generates through `serve.batch.generate_batch` (the sampling every other surface uses); any other
Hugging Face causal LM folder through `transformers`. One log line says which."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError
from . import synth
from .synth import load_seed_tasks, make_backend, resolve_backend, self_instruct, write_tasks


def engine_sampler(
    model,
    prompts: list[list[int]],
    stops: list[int],
    max_new: int,
    temperature: float,
    top_p: float,
    seed: int,
) -> list[list[int]]:
    """`synth.SampleIds` on the serving engine: a seed per prompt, mix_seed(call seed, index)."""
    from ..serve.batch import generate_batch, mix_seed
    from ..serve.request import GenParams

    params = [
        GenParams(
            max_tokens=max_new,
            temperature=temperature,
            top_p=top_p,
            stop_token_ids=stops,
            seed=mix_seed(seed, i),
        )
        for i in range(len(prompts))
    ]
    comps = generate_batch(model, prompts, params, stop_token_ids=stops, fast_path=True)
    return [c.token_ids for c in comps]


def add_parser(sub) -> None:
    p = sub.add_parser(
        "synth",
        help="generate instruction data from seed tasks with a model (self-instruct)",
        description=(synth.__doc__ or "").split("\n\n")[0].rstrip(".")
        + ". Writes JSONL in the messages form that "
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
    kind = resolve_backend(a.backend, a.model)
    how = "lmforge's serving engine" if kind == "lmforge" else "transformers"
    why = "" if a.backend != "auto" or kind == "lmforge" else " (not a model family lmforge loads)"
    print(f"synth: {a.model} generates through {how}{why}", file=sys.stderr)
    gen = make_backend(
        kind,
        a.model,
        sample=engine_sampler,
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
