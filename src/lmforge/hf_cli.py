"""`lmforge import`, `lmforge export`, `lmforge merge`: Hugging Face checkpoints in and out.

    lmforge import ~/models/Qwen2.5-0.5B-Instruct models/qwen05      # HF folder -> lmforge folder
    lmforge export runs/tiny/sft/model out/tiny-chat --dtype bfloat16
    lmforge merge models/qwen05 runs/q/sft/adapter out/qwen05-merged  # base + LoRA -> one model
    lmforge merge runs/q/sft/adapter out/q-merged                     # the base the adapter names

lmforge model folders already are HF folders, so `export` is about dtype, sharding and merging
an adapter; `import` checks a foreign checkpoint tensor by tensor (missing shards, shape
mismatches and unsupported architectures are named) and keeps its tokenizer and chat template.
Supported families: Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3 (text), Phi-3, GPT-2 and
Mixtral; each
is written back in its own format. Mixture-of-Experts models go out and come in as Mixtral; an MoE that Mixtral cannot express
(sigmoid router, shared expert, capacity-limited routing, q/k/v bias) is refused by `export`
with the feature named.
"""

from __future__ import annotations

import argparse
import json


def _print(rep: dict) -> None:
    print(json.dumps(rep, indent=2))


def cmd_import(a) -> int:
    from .model.hf import import_hf

    rep = import_hf(a.source, a.out, dtype=a.dtype, max_shard_size=a.shard_size)
    _print(rep)
    return 0


def cmd_export(a) -> int:
    from .model.hf import export_hf
    from .peft.merge import export_merged

    if a.adapter:
        rep = export_merged(a.model, a.adapter, a.out, dtype=a.dtype, max_shard_size=a.shard_size)
    else:
        rep = export_hf(a.model, a.out, dtype=a.dtype, max_shard_size=a.shard_size)
    _print(rep)
    return 0


def cmd_merge(a) -> int:
    from .peft.merge import export_merged

    base, adapter, out = (a.base, a.adapter, a.out) if a.out else (None, a.base, a.adapter)
    _print(export_merged(base, adapter, out, dtype=a.dtype, max_shard_size=a.shard_size))
    return 0


def add_parser(subparsers) -> None:
    common = dict(formatter_class=argparse.RawDescriptionHelpFormatter)
    p = subparsers.add_parser(
        "import",
        help="import a Hugging Face checkpoint folder (native: Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3, "
        "GPT-2, Mixtral; any other causal LM that transformers loads runs through the generic path)",
        description="Copy a local HF checkpoint (config.json, *.safetensors or a sharded "
        "index, tokenizer files) into an lmforge model folder, checking every "
        "tensor.",
        **common,
    )
    p.add_argument("source", help="folder with config.json and model*.safetensors")
    p.add_argument("out", help="output model folder")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32)")
    p.add_argument("--shard-size", default="5GB", help="max shard size, e.g. 5GB (default 5GB)")
    p.set_defaults(func=cmd_import)

    e = subparsers.add_parser(
        "export",
        help="export an lmforge model folder for transformers / vLLM / llama.cpp",
        description="Write a model folder that AutoModelForCausalLM.from_pretrained loads, "
        "optionally merging a LoRA adapter first. Dense models are written in the family "
        "they were imported from (lmforge's own as Llama, Qwen2 with q/k/v biases, Mistral with a "
        "sliding window), MoE models as Mixtral.",
        **common,
    )
    e.add_argument("model", help="lmforge model folder (e.g. runs/tiny/sft/model)")
    e.add_argument("out", help="output folder")
    e.add_argument("--adapter", default=None, help="PEFT LoRA adapter folder to merge in")
    e.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: as stored)")
    e.add_argument("--shard-size", default="5GB", help="max shard size (default 5GB)")
    e.set_defaults(func=cmd_export)

    m = subparsers.add_parser(
        "merge",
        help="merge a LoRA adapter into its base model",
        description="base model folder + PEFT LoRA adapter folder -> one full model folder "
        "(DoRA included). For a QLoRA adapter pass the full-precision base.",
        **common,
    )
    m.add_argument(
        "base",
        help="base model folder the adapter was trained on (leave out for the base the adapter names)",
    )
    m.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    m.add_argument("out", nargs="?", help="output model folder")
    m.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16")
    m.add_argument("--shard-size", default="5GB")
    m.set_defaults(func=cmd_merge)
