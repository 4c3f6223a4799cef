"""`lmforge data`: gather documents, deduplicate exactly, split train/val, write JSONL.

This is the stage's first cut: read the configured inputs (the built-in corpus by default, or
the user's text/JSONL/Parquet/Hugging Face data), drop exact duplicates (whitespace-normalised
hash) and empty documents with counted reasons, split deterministically by a seeded hash, and
write `train.jsonl` / `val.jsonl`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator

from pydantic import BaseModel, ConfigDict, Field

from ..data.builtin import split_train_val
from ..data.readers import ReadStats, format_read_stats, iter_documents
from ..errors import DataError
from ..pipeline import StageContext, register_stage
from ..runs import atomic_path


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: list[str] = Field(default_factory=lambda: ["builtin"],
                              description="files, folders, globs, 'builtin', 'hf:NAME[:SPLIT]'")
    text_field: str = "text"
    val_fraction: float = Field(0.05, gt=0, lt=1)
    max_docs: int | None = Field(None, ge=1, description="keep at most this many documents")


def iter_output_texts(out_dir: Path, split: str) -> Iterator[str]:
    path = Path(out_dir) / f"{split}.jsonl"
    if not path.exists():
        raise DataError(f"{path}: missing; run `lmforge data` first")
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


@register_stage("data", DataConfig, help="gather, clean and split the text corpus")
def data_stage(ctx: StageContext) -> dict:
    cfg: DataConfig = ctx.cfg
    stats = ReadStats()
    seen, docs, dup = set(), [], 0
    for doc in iter_documents(cfg.inputs, text_field=cfg.text_field, stats=stats):
        key = hashlib.sha1(" ".join(doc.text.split()).encode()).digest()
        if key in seen:
            dup += 1
            continue
        seen.add(key)
        docs.append(doc)
        if cfg.max_docs and len(docs) >= cfg.max_docs:
            break
    if not docs:
        raise DataError(f"no documents in {cfg.inputs}: {format_read_stats(stats)}")
    train, val = split_train_val(docs, cfg.val_fraction, ctx.seed)
    for split, part in (("train", train), ("val", val)):
        with atomic_path(ctx.dir / f"{split}.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as f:
            for d in part:
                f.write(json.dumps({"text": d.text, "source": d.source}, ensure_ascii=False) + "\n")
    dropped = dict(stats.dropped)
    if dup:
        dropped["exact_duplicate"] = dup
    nbytes = sum(len(d.text.encode()) for d in docs)
    ctx.log(f"{len(docs):,} documents ({nbytes / 1e6:.1f} MB): {len(train):,} train / {len(val):,} val; "
            f"dropped {sum(dropped.values()):,} {dropped or ''}")
    if stats.replaced_bytes:
        ctx.log(f"{stats.replaced_bytes:,} undecodable bytes replaced with U+FFFD")
    return {"docs": len(docs), "train_docs": len(train), "val_docs": len(val), "bytes": nbytes,
            "dropped": dropped, "replaced_bytes": stats.replaced_bytes}
