#!/usr/bin/env python
"""Crash harness: kill `lmforge run` at random points, re-run it, demand identical artifacts.

    python benchmarks/crash_harness.py --trials 24 --signal-trials 6 --root /tmp/crash [KEY=VALUE ...]

What it does, in order:

1. **Reference run**: the real `lmforge run tiny ...` in a subprocess (the default pipeline,
   shrunk by the overrides below so that a trial takes tens of seconds on a laptop CPU), with
   ``LMFORGE_FAULT_TRACE`` recording every write point it passes (`lmforge.runs.fault_point`)
   and the harness polling the manifests every 10 ms for each stage's time window. The stages
   are whatever the run directory's manifests show, so stages added later are covered too;
   ``--stages a,b,c`` restricts the pipeline (``stages=[...]`` override).
2. **Control run**: a second uninterrupted run. Whatever differs between the two is by nature
   not reproducible (wall-clock fields); the comparison below learns those fields and lines
   from it, and a control run that is not identical under the rules is itself reported.
3. **SIGKILL trials**: each in a fresh run directory, with the stages before its target copied
   from the reference (a finished stage is what the killed command would have found anyway;
   this only saves time). Two ways to pick the moment:
   - *time*: wait until the target stage's manifest says "running" in this attempt, then
     SIGKILL after a uniform random fraction of the stage's reference duration;
   - *write*: ``LMFORGE_FAULT=<point>@<n>`` makes the process SIGKILL itself at a write point
     drawn from the reference trace: a temporary file complete but not yet renamed
     (``atomic:train.bin``, ``atomic:shard-00000.jsonl``, ``atomic:manifest.json``...), a token
     shard half written (``tokens:train.bin``), a checkpoint folder with only its weights,
     assembled but not renamed, or renamed but older ones not yet pruned (``checkpoint:N:*``).
   Trials cycle over the stages, each pass with another kind: time, write point, then two
   time kills (the second while resuming); then every training stage gets one more trial
   killed right after its last checkpoint is renamed into place (finished training, stage
   not yet complete). Then the same command runs to completion and the run directory is
   compared with the reference.
4. **Signal trials**: SIGINT or SIGTERM at a random time in a stage. A clean stop means exit
   status 2 (training: checkpoint written, "run the same command again to resume") or 130
   (other stages: "interrupted"), the stage manifest says "failed" with the reason, no
   temporary file is left anywhere, and no traceback. Then re-run and compare as above.

What "identical" means (every file of the run directory except ``log.txt``, which is a
human log with clock times and, after a resume, extra lines, the run directory's lock file and
``.verified.json``, the cache of hashes a reader checked, whose presence depends on timing):
- ``*.safetensors``: same tensor names, every tensor bit-identical (``torch.equal``);
- ``manifest.json``: status "complete" in both; every field equal except wall-clock ones
  (``started_at``, ``seconds`` and metrics named like ``*_seconds``, ``*_per_s``,
  ``elapsed_s``, ``tflops``, ``mfu``, plus any field that differs between reference and
  control); ``resumed_from_step`` may appear only in the resumed run;
- other ``.json`` / ``.jsonl`` (metrics logs, results, funnel, checkpoint trainer state): equal
  after dropping the same wall-clock fields;
- ``pipeline.yaml`` and other text: byte-equal after replacing the run roots with ``<ROOT>``;
- rendered reports (``.md`` / ``.html``): the same lines in the same order, words and markup
  exact, numbers masked (stage times and tokens/s are printed there with a precision that
  depends on their value; every number in a report comes from a manifest or metrics log,
  which are compared exactly as above); a line naming ``resumed_from_step`` is ignored;
- everything else (token shards ``.bin`` / ``.idx.npy``, data shards, ``optimizer.pt``,
  ``rng.pt``, plots, parquet, npz): byte-identical;
- checkpoint folders: the latest must exist in both and match by the rules above; a signal
  stop adds a checkpoint at its own step, so other checkpoint folders are compared when both
  runs have them and otherwise listed as notes, not failures.

Results go to ``<root>/results.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

RUN_NAME = "tiny"
# The default pipeline, shrunk: same stages and code paths, minutes instead of tens of minutes.
SHRINK = [
    "run.device=cpu",
    "run.threads=1",
    "data.max_docs=300",
    "tokenizer.vocab_size=512",
    "pretrain.model.d_model=32",
    "pretrain.model.n_layers=2",
    "pretrain.model.n_heads=4",
    "pretrain.model.n_kv_heads=2",
    "pretrain.seq_len=64",
    "pretrain.batch_size=8",
    "pretrain.max_steps=40",
    "pretrain.warmup_steps=4",
    "pretrain.eval_every=20",
    "pretrain.eval_tokens=2048",
    "pretrain.checkpoint_every=10",
    "pretrain.log_every=5",
    "sft.max_steps=10",
    "sft.batch_size=4",
    "sft.max_examples=64",
    "sft.max_val_examples=8",
    "sft.num_samples=1",
    "sft.checkpoint_every=5",
    "eval.max_tokens=4096",
    "sample.max_new_tokens=8",
]
# Applied only when the pipeline has these stages (they arrived after the harness).
SHRINK_IF_PRESENT = {
    "reward": [
        "reward.max_examples=200",
        "reward.max_val_examples=32",
        "reward.max_steps=10",
        "reward.batch_size=4",
        "reward.seq_len=64",
        "reward.checkpoint_every=5",
    ],
    "align": [
        "align.max_examples=200",
        "align.max_val_examples=32",
        "align.max_steps=10",
        "align.batch_size=4",
        "align.seq_len=64",
        "align.checkpoint_every=5",
    ],
    "rl": [
        "rl.max_steps=4",
        "rl.batch_size=8",
        "rl.grpo.max_new_tokens=8",
        "rl.ppo.max_new_tokens=8",
        "rl.max_examples=64",
        "rl.max_val_examples=8",
        "rl.checkpoint_every=2",
        "rl.eval_every=0",
    ],
}
TIMING_KEYS = {"seconds", "started_at", "elapsed_s", "tokens_per_s", "tflops", "mfu", "requests_per_s"}
TIMING_SUFFIXES = ("_seconds", "_per_s", "_time_s", "_wall_s")
RESUME_ONLY_KEYS = {"resumed_from_step"}
SKIP_FILES = {"log.txt", ".verified.json", ".lmforge.lock"}  # human log, hash cache, lock
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- running
def command(root: Path, overrides: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lmforge.cli",
        "run",
        "tiny",
        f"run.root={root}",
        f"run.name={RUN_NAME}",
        *overrides,
    ]


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMFORGE_FAULT")}
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["COLUMNS"] = "160"
    env.update(extra)
    return env


def _default_sigint() -> None:
    """A harness started in the background (``cmd &``) has SIGINT ignored, and children inherit
    that; Python then never installs its KeyboardInterrupt handler. Give the child the default
    disposition, as a terminal would."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _manifest(stage_dir: Path) -> dict | None:
    try:
        return json.loads((stage_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def _mtime(p: Path) -> int:
    try:
        return p.stat().st_mtime_ns
    except OSError:
        return 0


def reference_run(root: Path, overrides: list[str], trace: Path | None, log: Path) -> tuple[dict, float]:
    """Run to completion, polling the manifests; returns {stage: [t_start, t_end]} and wall time."""
    run_dir = root / RUN_NAME
    env = _env(**({"LMFORGE_FAULT_TRACE": str(trace)} if trace else {}))
    t0 = time.time()
    windows: dict[str, list[float]] = {}
    with open(log, "w") as out:
        proc = subprocess.Popen(command(root, overrides), stdout=out, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            _poll_windows(run_dir, windows, time.time() - t0)
            time.sleep(0.01)
    _poll_windows(run_dir, windows, time.time() - t0)
    if proc.returncode != 0:
        raise SystemExit(f"reference run failed (exit {proc.returncode}); see {log}")
    return windows, time.time() - t0


def _poll_windows(run_dir: Path, windows: dict, now: float) -> None:
    if not run_dir.is_dir():
        return
    for d in run_dir.iterdir():
        m = _manifest(d) if d.is_dir() else None
        if not m:
            continue
        w = windows.setdefault(d.name, [now, None])
        if m.get("status") == "complete" and w[1] is None:
            w[1] = now


@dataclass
class Kill:
    mode: str  # time | write | sigint | sigterm
    stage: str  # the stage aimed at
    fraction: float = 0.0  # time/signal: share of the stage's reference duration to wait
    point: str = ""  # write: LMFORGE_FAULT value
    # filled in by the attempt
    rc: int | None = None
    landed_in: str = ""
    seconds: float = 0.0
    clean_stop: bool | None = None
    stop_problems: list[str] = field(default_factory=list)


def attempt(
    root: Path, overrides: list[str], kill: Kill, ref_seconds: dict[str, float], log: Path, timeout: float
) -> None:
    run_dir = root / RUN_NAME
    target = run_dir / kill.stage / "manifest.json"
    before = _mtime(target)
    env = _env(**({"LMFORGE_FAULT": kill.point} if kill.mode == "write" else {}))
    t0 = time.time()
    with open(log, "a") as out:
        out.write(f"\n===== attempt: {kill.mode} {kill.stage} {kill.point or kill.fraction}\n")
        out.flush()
        proc = subprocess.Popen(
            command(root, overrides),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_default_sigint,
        )
        if kill.mode != "write":
            while proc.poll() is None and time.time() - t0 < timeout:
                m = _manifest(run_dir / kill.stage)
                if _mtime(target) != before and m and m.get("status") == "running":
                    break
                time.sleep(0.005)
            deadline = time.time() + kill.fraction * ref_seconds.get(kill.stage, 0.0)
            while time.time() < deadline and proc.poll() is None:
                # a faster run than the reference finishes the stage early: kill at its end
                # rather than somewhere in a later stage
                if (_manifest(run_dir / kill.stage) or {}).get("status") == "complete":
                    break
                time.sleep(0.005)
            running = _running_stage(run_dir)
            if proc.poll() is None:
                sig = {"time": signal.SIGKILL, "sigint": signal.SIGINT, "sigterm": signal.SIGTERM}[kill.mode]
                if sig == signal.SIGKILL:
                    os.killpg(proc.pid, sig)  # a crash takes every process of the job
                else:
                    os.kill(proc.pid, sig)
                kill.landed_in = running or "(between stages)"
            else:
                kill.landed_in = "(finished before the kill)"
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            kill.landed_in += " (timed out)"
    kill.rc, kill.seconds = proc.returncode, round(time.time() - t0, 2)
    if kill.mode == "write":
        kill.landed_in = _running_stage(run_dir) or "(between stages)"
    if kill.mode in ("sigint", "sigterm") and kill.rc not in (0, None):
        kill.stop_problems = check_clean_stop(run_dir, kill.rc, log)
        kill.clean_stop = not kill.stop_problems


def _running_stage(run_dir: Path) -> str:
    for d in (
        sorted(run_dir.iterdir(), key=lambda p: _mtime(p / "manifest.json"), reverse=True)
        if run_dir.is_dir()
        else []
    ):
        m = _manifest(d)
        if m and m.get("status") in ("running", "failed"):
            return d.name
    return ""


def check_clean_stop(run_dir: Path, rc: int, log: Path) -> list[str]:
    """What is wrong with a SIGINT/SIGTERM stop (empty: clean and resumable)."""
    problems = []
    tail = log.read_text(errors="replace")[-4000:]
    if rc not in (2, 130):
        problems.append(f"exit status {rc}, expected 2 (training stop) or 130 (interrupt)")
    if "Traceback" in tail:
        problems.append("traceback printed")
    stage = _running_stage(run_dir)
    m = _manifest(run_dir / stage) if stage else None
    if not m or m.get("status") != "failed" or not m.get("error"):
        problems.append(f"manifest of {stage or '?'} does not record the stop: {m and m.get('status')}")
    elif "stopped by signal" in m["error"]:
        if "run the same command again to resume" not in tail:
            problems.append("no resume hint printed")
        if not list((run_dir / stage).rglob("checksums.json")):
            problems.append("training stopped without a checkpoint")
    elif m["error"] != "interrupted":
        problems.append(f"unexpected error recorded: {m['error'][:200]}")
    temps = [str(p.relative_to(run_dir)) for p in run_dir.rglob(".*.tmp*")]
    if temps:
        problems.append(f"temporary files left: {temps[:5]}")
    return problems


# ----------------------------------------------------------------------------- comparing
def _is_timing(key: str, learned: set[str]) -> bool:
    return key in TIMING_KEYS or key.endswith(TIMING_SUFFIXES) or key in learned


def _strip(obj, learned: set[str], drop_resume: bool = True):
    if isinstance(obj, dict):
        return {
            k: _strip(v, learned, drop_resume)
            for k, v in obj.items()
            if not _is_timing(k, learned) and not (drop_resume and k in RESUME_ONLY_KEYS)
        }
    if isinstance(obj, list):
        return [_strip(v, learned, drop_resume) for v in obj]
    return obj


def _norm(text: str, roots: list[str]) -> str:
    for r in sorted(roots, key=len, reverse=True):
        text = text.replace(r, "<ROOT>")
    return text


def _load_json(path: Path, roots: list[str]):
    text = _norm(path.read_text(errors="surrogateescape"), roots)
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def _json_diff_keys(a, b, out: set[str], key: str = "") -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in set(a) | set(b):
            _json_diff_keys(a.get(k), b.get(k), out, k)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for x, y in zip(a, b):
            _json_diff_keys(x, y, out, key)
    elif a != b and key:
        out.add(key)


def _files(run_dir: Path) -> dict[str, Path]:
    return {
        str(p.relative_to(run_dir)): p
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name not in SKIP_FILES
    }


@dataclass
class Learned:
    keys: set[str] = field(default_factory=set)
    lines: dict[str, set[int]] = field(default_factory=dict)


def learn_nondeterminism(ref: Path, control: Path, roots: list[str]) -> Learned:
    """Fields and report lines that differ between two uninterrupted runs."""
    learned = Learned()
    a, b = _files(ref), _files(control)
    for rel in sorted(set(a) & set(b)):
        pa, pb = a[rel], b[rel]
        if pa.suffix in (".json", ".jsonl"):
            try:
                _json_diff_keys(_load_json(pa, roots), _load_json(pb, roots), learned.keys)
            except ValueError:
                pass
        elif pa.suffix in (".md", ".html", ".yaml", ".txt"):
            la = _norm(pa.read_text(errors="replace"), roots).splitlines()
            lb = _norm(pb.read_text(errors="replace"), roots).splitlines()
            if la != lb:
                sm = difflib.SequenceMatcher(a=la, b=lb, autojunk=False)
                idx = {i for tag, i1, i2, _, _ in sm.get_opcodes() if tag != "equal" for i in range(i1, i2)}
                learned.lines[rel] = idx
    return learned


def _tensors_equal(a: Path, b: Path) -> str | None:
    import torch
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    if ta.keys() != tb.keys():
        return f"tensor names differ: {sorted(set(ta) ^ set(tb))[:3]}"
    bad = [
        k
        for k in ta
        if ta[k].dtype != tb[k].dtype or ta[k].shape != tb[k].shape or not torch.equal(ta[k], tb[k])
    ]
    return f"{len(bad)} tensor(s) differ, e.g. {bad[:3]}" if bad else None


def compare(ref: Path, other: Path, learned: Learned, roots: list[str]) -> tuple[list[str], list[str], dict]:
    """(problems, notes, counts) for `other` against `ref`."""
    problems, notes = [], []
    counts = {"files": 0, "tensors_files": 0, "byte_files": 0, "json_files": 0, "text_files": 0}
    a, b = _files(ref), _files(other)
    ckpt = re.compile(r"(^|.*/)checkpoints/(step_\d+)/")
    latest: dict[str, str] = {}
    for rel in list(a) + list(b):
        m = ckpt.match(rel)
        if m:
            latest[m.group(1)] = max(latest.get(m.group(1), ""), m.group(2))
    for rel in sorted(set(a) | set(b)):
        m = ckpt.match(rel)
        optional = m is not None and m.group(2) != latest.get(m.group(1))
        if rel not in a or rel not in b:
            msg = f"{rel}: only in the {'reference' if rel in a else 'resumed run'}"
            (notes if optional else problems).append(msg)
            continue
        counts["files"] += 1
        pa, pb = a[rel], b[rel]
        err = None
        try:
            if pa.suffix == ".safetensors":
                counts["tensors_files"] += 1
                err = _tensors_equal(pa, pb)
            elif pa.name == "manifest.json":
                counts["json_files"] += 1
                ma, mb = _load_json(pa, roots), _load_json(pb, roots)
                if ma.get("status") != "complete" or mb.get("status") != "complete":
                    err = f"status {ma.get('status')} / {mb.get('status')}"
                elif _strip(ma, learned.keys) != _strip(mb, learned.keys):
                    err = _first_json_diff(_strip(ma, learned.keys), _strip(mb, learned.keys))
                elif (
                    set(_strip(mb, learned.keys, False).get("metrics", {}))
                    - set(_strip(ma, learned.keys, False).get("metrics", {}))
                    - RESUME_ONLY_KEYS
                ):
                    err = "extra metrics"
            elif pa.suffix in (".json", ".jsonl"):
                counts["json_files"] += 1
                ja, jb = (
                    _strip(_load_json(pa, roots), learned.keys),
                    _strip(_load_json(pb, roots), learned.keys),
                )
                if ja != jb:
                    err = _first_json_diff(ja, jb)
            elif pa.suffix in (".md", ".html", ".yaml", ".txt"):
                counts["text_files"] += 1
                err = _text_diff(rel, pa, pb, learned, roots)
            else:
                counts["byte_files"] += 1
                if pa.stat().st_size != pb.stat().st_size or pa.read_bytes() != pb.read_bytes():
                    err = f"bytes differ ({pa.stat().st_size} vs {pb.stat().st_size})"
        except Exception as e:  # unreadable artifact: a failure, not a harness crash
            err = f"cannot compare: {type(e).__name__}: {e}"
        if err:
            problems.append(f"{rel}: {err}")
    return problems, notes, counts


def _first_json_diff(a, b, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if a.get(k) != b.get(k):
                return _first_json_diff(a.get(k), b.get(k), f"{path}.{k}")
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path or '(top)'}: {len(a)} vs {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_json_diff(x, y, f"{path}[{i}]")
    return f"{path or '(top)'}: {str(a)[:80]!r} vs {str(b)[:80]!r}"


NUMBER = re.compile(r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][+-]?\d+)?")  # 705.1, 1,566, 9.12e+07


def _text_diff(rel: str, pa: Path, pb: Path, learned: Learned, roots: list[str]) -> str | None:
    """Text files must match line for line after root normalisation. Rendered reports (.md /
    .html) show wall-clock figures (stage times, tokens/s) whose formatting varies with their
    value, so their lines are compared with numbers masked -- every number in them comes from
    a manifest or metrics log, which `compare` checks exactly. A report line naming
    ``resumed_from_step`` exists only in a resumed run and is ignored."""
    la = _norm(pa.read_text(errors="replace"), roots).splitlines()
    lb = _norm(pb.read_text(errors="replace"), roots).splitlines()
    if la == lb:
        return None
    report = pa.suffix in (".md", ".html")
    if report:
        la = [x for x in la if not any(k in x for k in RESUME_ONLY_KEYS)]
        lb = [x for x in lb if not any(k in x for k in RESUME_ONLY_KEYS)]
    if len(la) != len(lb):
        return f"text differs ({len(la)} vs {len(lb)} lines)"
    for i, (x, y) in enumerate(zip(la, lb)):
        if x != y and not (report and NUMBER.sub("#", x) == NUMBER.sub("#", y)):
            return f"line {i + 1} differs: {x[:80]!r} vs {y[:80]!r}"
    return None


# ----------------------------------------------------------------------------- trials
def read_trace(trace: Path, run_dir: Path) -> list[tuple[str, str]]:
    """[(point name, stage or '')] in the order the reference run passed them."""
    out = []
    for line in trace.read_text().splitlines():
        name, _, path = line.partition("\t")
        stage = ""
        if path:
            try:
                rel = Path(path).resolve().relative_to(run_dir.resolve())
                stage = rel.parts[0] if len(rel.parts) > 1 else ""
            except ValueError:
                pass
        out.append((name, stage))
    return out


def plan_trials(
    n_kill: int, n_signal: int, stages: list[str], trace: list[tuple[str, str]], rng: random.Random
) -> list[list[Kill]]:
    """SIGKILL trials cycle over the stages; on the k-th pass over them a stage gets a time
    kill (k % 3 == 0), a write-point kill (k % 3 == 1: a checkpoint or shard write point when
    the stage has one, 60% of the time) or two time kills, the second while it resumes."""
    trials: list[list[Kill]] = []
    n = len(stages)
    for i in range(n_kill):
        stage, cycle = stages[i % n], (i // n) % 3
        points = [(j, name) for j, (name, st) in enumerate(trace) if st == stage]
        if cycle == 1 and points:
            heavy = [
                p
                for p in points
                if p[1].startswith(("checkpoint:", "tokens:", "atomic:shard", "atomic:train", "atomic:model"))
            ]
            j, name = rng.choice(heavy if heavy and rng.random() < 0.6 else points)
            kills = [
                Kill(
                    "write", stage, point=f"{name}@{_nth_hit(trace, j, name, stages[: stages.index(stage)])}"
                )
            ]
        else:
            kills = [Kill("time", stage, fraction=round(rng.random(), 3))]
            if cycle == 2:  # killed again while resuming
                kills.append(Kill("time", stage, fraction=round(rng.random(), 3)))
        trials.append(kills)
    # and for every training stage, the riskiest moment: its last checkpoint is in place but the
    # stage (final model, samples, manifest) is not finished
    for stage in stages:
        last = [
            name
            for name, st in trace
            if st == stage and name.startswith("checkpoint:") and name.endswith(":renamed")
        ]
        if last:
            trials.append([Kill("write", stage, point=f"{last[-1]}@1")])
    for i in range(n_signal):
        stage = stages[(i * 3 + 1) % n]
        trials.append([Kill("sigint" if i % 2 == 0 else "sigterm", stage, fraction=round(rng.random(), 3))])
    return trials


def _nth_hit(trace: list[tuple[str, str]], j: int, name: str, skipped_stages: list[str]) -> int:
    """The hit count of `name` at trace entry j in a run where `skipped_stages` are already done."""
    return sum(1 for k in range(j + 1) if trace[k][0] == name and trace[k][1] not in skipped_stages)


def run_trial(
    idx: int, kills: list[Kill], args, overrides, stages, ref_dir, ref_seconds, learned, roots
) -> dict:
    root = Path(args.root) / f"trial-{idx:02d}"
    shutil.rmtree(root, ignore_errors=True)
    run_dir = root / RUN_NAME
    run_dir.mkdir(parents=True)
    for st in stages[: stages.index(kills[0].stage)]:
        shutil.copytree(ref_dir / st, run_dir / st)
    roots.append(str(root))
    log = root / "attempts.log"
    t0 = time.time()
    for k in kills:
        attempt(root, overrides, k, ref_seconds, log, args.timeout)
    final = Kill("final", "")
    with open(log, "a") as out:
        out.write("\n===== final run\n")
        out.flush()
        proc = subprocess.run(
            command(root, overrides), stdout=out, stderr=subprocess.STDOUT, env=_env(), timeout=args.timeout
        )
    final.rc = proc.returncode
    problems, notes, counts = (
        compare(ref_dir, run_dir, learned, roots)
        if final.rc == 0
        else ([f"final run failed with exit {final.rc}; see {log}"], [], {})
    )
    for k in kills:
        if k.mode in ("sigint", "sigterm") and k.clean_stop is False:
            problems += [f"unclean {k.mode} stop: {p}" for p in k.stop_problems]
    res = {
        "trial": idx,
        "kills": [asdict(k) for k in kills],
        "final_rc": final.rc,
        "identical": not problems,
        "problems": problems,
        "notes": notes,
        "compared": counts,
        "seconds": round(time.time() - t0, 1),
    }
    if not problems and not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("overrides", nargs="*", help="extra KEY=VALUE overrides for `lmforge run tiny`")
    ap.add_argument("--root", default="/tmp/lmforge-crash", help="scratch folder (wiped)")
    ap.add_argument("--trials", type=int, default=24, help="SIGKILL trials")
    ap.add_argument("--signal-trials", type=int, default=6, help="SIGINT / SIGTERM trials")
    ap.add_argument("--stages", help="comma-separated stages to run (default: the whole pipeline)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=900, help="seconds per lmforge invocation")
    ap.add_argument("--no-shrink", action="store_true", help="do not add the built-in shrinking overrides")
    ap.add_argument("--keep", action="store_true", help="keep the run directories of identical trials")
    args = ap.parse_args(argv)

    overrides = [] if args.no_shrink else list(SHRINK)
    if not args.no_shrink:
        sys.path.insert(0, str(REPO / "src"))
        from lmforge.pipeline import REGISTRY

        wanted = args.stages.split(",") if args.stages else list(REGISTRY)
        overrides += [
            o for st, extra in SHRINK_IF_PRESENT.items() if st in REGISTRY and st in wanted for o in extra
        ]
    overrides += list(args.overrides)
    if args.stages:
        overrides.append(f"stages=[{args.stages}]")
    root = Path(args.root)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    rng = random.Random(args.seed)
    print(f"# crash harness: {' '.join(command(Path('<root>'), overrides)[1:])}", flush=True)

    trace = root / "reference.trace"
    windows, ref_wall = reference_run(root / "reference", overrides, trace, root / "reference.log")
    ref_dir = root / "reference" / RUN_NAME
    stages = sorted(windows, key=lambda s: windows[s][0])
    ref_seconds = {s: float((_manifest(ref_dir / s) or {}).get("seconds", 0.0)) for s in stages}
    print(
        f"reference run: {ref_wall:.0f} s; stages " + ", ".join(f"{s} {ref_seconds[s]:.1f}s" for s in stages),
        flush=True,
    )
    _, control_wall = reference_run(root / "control", overrides, None, root / "control.log")
    control_dir = root / "control" / RUN_NAME
    for s in stages:  # the faster of two measurements: a loaded machine stretches one of them
        ref_seconds[s] = min(
            ref_seconds[s], float((_manifest(control_dir / s) or {}).get("seconds", ref_seconds[s]))
        )
    roots = [str(root / "reference"), str(root / "control")]
    learned = learn_nondeterminism(ref_dir, control_dir, roots)
    control_problems, _, control_counts = compare(ref_dir, control_dir, learned, roots)
    print(
        f"control run: {control_wall:.0f} s; {'identical' if not control_problems else control_problems}; "
        f"fields learned as wall-clock: {sorted(learned.keys)}; report lines differing between reference and control: "
        f"{ {k: len(v) for k, v in learned.lines.items()} }",
        flush=True,
    )

    points = read_trace(trace, ref_dir)
    trials = plan_trials(args.trials, args.signal_trials, stages, points, rng)
    results = []
    for i, kills in enumerate(trials):
        res = run_trial(i, kills, args, overrides, stages, ref_dir, ref_seconds, learned, roots)
        results.append(res)
        k = res["kills"]
        what = "; ".join(
            f"{x['mode']} {x['point'] or x['fraction']} -> {x['landed_in']} rc={x['rc']}" for x in k
        )
        print(
            f"trial {i:2d} [{kills[0].stage}] {what}: {'IDENTICAL' if res['identical'] else 'DIFFERENT'} "
            f"({res['seconds']} s){'' if res['identical'] else ' ' + '; '.join(res['problems'][:4])}",
            flush=True,
        )

    kill_res = [r for r in results if r["kills"][0]["mode"] in ("time", "write")]
    sig_res = [r for r in results if r["kills"][0]["mode"] in ("sigint", "sigterm")]
    summary = {
        "command": " ".join(command(Path("<root>"), overrides)[1:]),
        "stages": stages,
        "reference_seconds": ref_seconds,
        "control_identical": not control_problems,
        "control_problems": control_problems,
        "control_compared": control_counts,
        "learned_wallclock_fields": sorted(learned.keys),
        "masked_report_lines": {k: sorted(v) for k, v in learned.lines.items()},
        "sigkill_trials": len(kill_res),
        "sigkill_identical": sum(r["identical"] for r in kill_res),
        "sigkill_kills": sum(len(r["kills"]) for r in kill_res),
        "signal_trials": len(sig_res),
        "signal_identical": sum(r["identical"] for r in sig_res),
        "signal_clean_stops": sum(all(k["clean_stop"] is not False for k in r["kills"]) for r in sig_res),
        "trials": results,
    }
    (root / "results.json").write_text(json.dumps(summary, indent=2))
    print()
    print("| trial | target stage | disruption | landed in | exit | re-run identical |")
    print("|---|---|---|---|---|---|")
    for r in results:
        for j, k in enumerate(r["kills"]):
            print(
                f"| {r['trial'] if j == 0 else ''} | {k['stage']} | {k['mode']} {k['point'] or k['fraction']} | "
                f"{k['landed_in']} | {k['rc']} | {('yes' if r['identical'] else 'NO') if j == 0 else ''} |"
            )
    print(
        f"\nSIGKILL: {summary['sigkill_identical']}/{summary['sigkill_trials']} trials identical "
        f"({summary['sigkill_kills']} kills); SIGINT/SIGTERM: {summary['signal_clean_stops']}/{len(sig_res)} "
        f"clean stops, {summary['signal_identical']}/{len(sig_res)} identical after re-run; "
        f"results: {root / 'results.json'}"
    )
    return 0 if all(r["identical"] for r in results) and not control_problems else 1


if __name__ == "__main__":
    sys.exit(main())
