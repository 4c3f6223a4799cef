"""The one training loop.

Pretraining, SFT, reward modelling and preference optimisation all run here; what differs is
the *objective*, a small object that turns a micro-batch and the model into a summed loss, a
count of the units that loss is summed over (tokens, pairs...), and metrics. The engine owns
everything else:

- batching with gradient accumulation, normalised by the total count over all micro-batches of
  the step (so a step's gradient does not depend on how it was split into micro-batches);
- AdamW, warmup + cosine / WSD / constant schedule, gradient-norm clipping;
- bf16 autocast where the device supports it;
- bad steps -- a non-finite loss or gradient norm, or a loss spike over `spike_factor` x the
  median of the last `spike_window` good losses -- are skipped (no update) and logged; after
  `rollback_after` in a row the run rolls back to its last checkpoint (weights, optimizer,
  RNG) but keeps its data position, so the offending batches are never replayed; once
  `max_rollbacks` are spent, `max_bad_steps` in a row stop it with the last good checkpoint
  intact (see `_on_bad_step` for why spike detection is on by default);
- periodic evaluation with optional early stopping on the eval loss;
- metrics to `metrics.jsonl`, a progress line, throughput and FLOPs utilisation: processed
  tokens/s (`tokens_per_s`, every non-padding token the model ran over) for every stage, the
  objective's loss units (`assistant_tokens`, `pairs`) under their own name, and peak memory
  (CUDA `max_memory_allocated`, CPU peak RSS);
- no host synchronisation inside a micro-batch: losses and metrics stay on the device and are
  read back once per step (objectives get counts and gather indices from their collators);
- atomic checkpoints (weights, optimizer, RNG, data position) and *exact* resume: a run killed
  at any point and restarted produces the same weights as one that was never interrupted;
- SIGINT / SIGTERM: finish the current step, checkpoint, stop.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..runs import atomic_write_text, read_jsonl
from .bad_steps import BadStepGuard
from .checkpoint import (
    list_checkpoints,
    load_checkpoint,
    load_sharded_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    save_sharded_checkpoint,
)
from .config import StatefulIterator, TrainConfig
from .device import autocast_dtype, peak_memory
from .distributed import (
    DistInfo,
    all_reduce_sum,
    apply_activation_checkpointing,
    barrier,
    grad_sync,
    resolve_strategy,
    wrap,
)
from .modules import to_device
from .objectives import Objective
from .optim import build_optimizer, lr_multiplier
from .outcomes import StepOutcome, TrainingStopped, TrainResult
from .tracking import MetricsWriter


class Trainer(BadStepGuard):
    def __init__(
        self,
        model: torch.nn.Module,
        objective: Objective,
        data: StatefulIterator,
        cfg: TrainConfig,
        out_dir: Path,
        *,
        device: torch.device,
        dtype: str = "auto",
        evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
        log: Callable[[str], None] = print,
        dist_info: DistInfo | None = None,
        optimizer: str | None = None,
    ):
        """`model` is the plain module; with `cfg.parallel` under torchrun it is wrapped here
        (DDP, or sharded in place by FSDP2) before the optimizer is built. `data` must already
        yield this rank's share of each global batch (see `TokenLoader(rank=, world=)`).
        `optimizer` overrides `cfg.optimizer` (a stage's QLoRA choice: adamw8bit, paged_adamw8bit);
        the engine builds and owns it either way."""
        self.model, self.objective, self.data, self.cfg = model, objective, data, cfg
        self.dist = dist_info or DistInfo()
        self.strategy = resolve_strategy(cfg.parallel, self.dist.world)
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.metrics = MetricsWriter(self.metrics_path)  # also feeds the stage's run.trackers
        self.device, self.evaluate = device, evaluate
        self.log = log if self.dist.is_main else (lambda msg: None)
        self.amp = autocast_dtype(device, dtype)
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        if cfg.activation_checkpointing:
            apply_activation_checkpointing(model)
        wrapped = wrap(
            model,
            self.strategy,
            self.dist,
            device=device,
            amp_dtype=self.amp,
            cpu_offload=cfg.fsdp_cpu_offload,
        )
        if self.strategy == "fsdp":
            self.amp = None  # FSDP2's mixed-precision policy casts; autocast would be redundant
        # torch.optim.Optimizer, or Muon + AdamW behind one interface (CombinedOptimizer)
        self.optimizer: Any = build_optimizer(model, cfg, optimizer, self.log)
        self.wrapped = wrapped
        # what objectives call: the wrapped module, compiled when asked (a callable, not a Module)
        compiled = cfg.compile == "auto" and device.type == "cuda" or cfg.compile is True
        self.forward_model: Any = torch.compile(wrapped) if compiled else wrapped
        self.step = 0
        self.tokens = 0  # processed tokens
        self.units = 0  # loss units (= tokens for pretraining)
        self.unit_name = getattr(objective, "unit_name", "tokens")
        self.train_seconds = 0.0
        self.best_eval: float | None = None
        self.evals_without_improvement = 0
        self.rollbacks = 0
        self.recent_losses: list[float] = []  # the last spike_window good losses, oldest first
        self._bad: list[str] = []  # reasons of the current run of consecutive bad steps
        self.last_loss = float("nan")  # the loss of the last step and the last evaluation: kept in
        self.last_eval: dict[str, float] = {}  # checkpoints so a run resumed at its end reports them
        self._stop_signal: int | None = None

    # ------------------------------------------------------------------ state
    def _state(self) -> dict:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "units": self.units,
            "train_seconds": self.train_seconds,
            "data": self.data.state_dict(),
            "best_eval": self.best_eval,
            "evals_without_improvement": self.evals_without_improvement,
            "rollbacks": self.rollbacks,
            "recent_losses": list(self.recent_losses),
            "last_loss": self.last_loss,
            "last_eval": dict(self.last_eval),
        }

    def _load_last(self, restore_data: bool = True) -> dict | None:
        """Restore model, optimizer, RNG and trainer state from the newest checkpoint."""
        ckpts = list_checkpoints(self.ckpt_dir)
        if not ckpts:
            return None
        if (ckpts[-1] / "dcp").is_dir():
            state = load_sharded_checkpoint(ckpts[-1], self.model, self.optimizer)
        else:
            state = load_checkpoint(ckpts[-1], self.model, self.optimizer)
        self.step, self.tokens = state["step"], state["tokens"]
        self.units = state.get("units", self.tokens)
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.best_eval = state.get("best_eval")
        self.evals_without_improvement = state.get("evals_without_improvement", 0)
        self.rollbacks = state.get("rollbacks", 0)
        self.recent_losses = [float(x) for x in state.get("recent_losses", [])]
        self.last_loss = float(state.get("last_loss", float("nan")))
        self.last_eval = dict(state.get("last_eval", {}))
        if restore_data:
            self.data.load_state_dict(state["data"])
        # drop metric lines logged after the checkpoint by the interrupted (or rolled back) run
        if self.dist.is_main:
            kept = [r for r in read_jsonl(self.metrics_path) if r.get("step", 0) <= self.step]
            atomic_write_text(self.metrics_path, "".join(_json_line(r) for r in kept))
        barrier()
        return state

    def resume(self) -> int | None:
        if self._load_last() is None:
            return None
        if self.dist.is_main:  # a kill between placing a checkpoint and pruning left extras
            prune_checkpoints(self.ckpt_dir, self.cfg.keep_checkpoints)
        return self.step

    def save(self) -> Path:
        if self.strategy == "fsdp":
            return save_sharded_checkpoint(
                self.ckpt_dir,
                self.step,
                self.model,
                self.optimizer,
                self._state(),
                is_main=self.dist.is_main,
                keep=self.cfg.keep_checkpoints,
            )
        path = self.ckpt_dir / f"step_{self.step:08d}"
        if self.dist.is_main:
            path = save_checkpoint(
                self.ckpt_dir,
                self.step,
                self.model,
                self.optimizer,
                self._state(),
                keep=self.cfg.keep_checkpoints,
            )
        barrier()
        return path

    def _record(self, rec: dict) -> None:
        if self.dist.is_main:
            self.metrics.write(rec)

    # ------------------------------------------------------------------ loop
    def _set_lr(self) -> float:
        mult = lr_multiplier(
            self.step,
            max_steps=self.cfg.max_steps,
            warmup_steps=self.cfg.warmup_steps,
            schedule=self.cfg.schedule,
            min_lr_ratio=self.cfg.min_lr_ratio,
            decay_fraction=self.cfg.decay_fraction,
        )
        lr = self.cfg.lr * mult
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        return lr

    def _batch_tokens(self, batch: Any) -> int:
        fn = getattr(self.objective, "tokens", None)
        return fn(batch) if fn is not None else self.objective.count(batch)

    def _train_step(self, batches: list) -> StepOutcome:
        local = sum(self.objective.count(b) for b in batches)
        local_tokens = sum(self._batch_tokens(b) for b in batches)
        # units and processed tokens over all ranks
        total, tokens = all_reduce_sum([float(local), float(local_tokens)], self.device)
        total, tokens = int(total), int(tokens)
        if total == 0:
            return StepOutcome(None, {"empty_batch": 1.0}, 0)
        self.model.train()
        # DDP/FSDP average gradients over ranks; scaling by world makes the result the
        # gradient of (sum of unit losses over all ranks) / (units over all ranks).
        scale = self.dist.world / total
        loss_acc: Any = 0.0
        acc: dict[str, Any] = {}
        for i, b in enumerate(batches):
            b = to_device(b, self.device)
            with grad_sync(self.wrapped, self.strategy, sync=i == len(batches) - 1):
                with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                    loss, _, metrics = self.objective(self.forward_model, b)
                (loss * scale).backward()
            loss_acc = loss_acc + loss.detach().float()  # stays on the device until the step ends
            for k, v in metrics.items():
                acc[k] = acc.get(k, 0.0) + (v.detach() if isinstance(v, torch.Tensor) else v) / len(batches)
        extra = {k: float(v) for k, v in acc.items()}  # the step's one read-back
        (loss_sum,) = all_reduce_sum([float(loss_acc)], self.device)
        mean = loss_sum / total  # identical on every rank, so every rank takes the same decision
        if not math.isfinite(mean):
            self.optimizer.zero_grad(set_to_none=True)
            return StepOutcome(mean, extra, total, "non-finite", tokens)
        limit = self._spike_limit()
        if limit is not None and mean > limit:
            self.optimizer.zero_grad(set_to_none=True)
            return StepOutcome(mean, extra, total, "spike", tokens)
        if self.cfg.grad_clip > 0:
            gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            if hasattr(gn, "full_tensor"):  # FSDP2: a DTensor holding the global norm
                gn = gn.full_tensor()
            extra["grad_norm"] = float(gn)
            if not math.isfinite(extra["grad_norm"]):
                self.optimizer.zero_grad(set_to_none=True)
                return StepOutcome(mean, extra, total, "non-finite", tokens)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.cfg.spike_factor:
            self.recent_losses = (self.recent_losses + [mean])[-self.cfg.spike_window :]
        return StepOutcome(mean, extra, total, None, tokens)

    def _run_eval(self) -> dict[str, float]:
        if self.evaluate is None:
            return {}
        self.model.eval()
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            res = self.evaluate(self.forward_model)
        self.model.train()
        return res

    _window: tuple[float, int, int]  # (time, tokens, units) at the start of the logging interval

    def _on_signal(self, signum, frame):
        self._stop_signal = signum

    def _log_step(self, loss: float, lr: float, extra: dict, t0: float) -> None:
        """One metrics line and progress line: throughput over the interval since the last one."""
        t_log, tok_log, unit_log = self._window
        now = time.time()
        tps = (self.tokens - tok_log) / max(now - t_log, 1e-9)
        ups = (self.units - unit_log) / max(now - t_log, 1e-9)
        mem, _ = peak_memory(self.device)
        rec = {
            "step": self.step,
            "loss": round(loss, 5),
            "lr": lr,
            "tokens": self.tokens,
            "tokens_per_s": round(tps, 1),
            "elapsed_s": round(now - t0, 2),
            "peak_memory_gib": round(mem / 2**30, 3),
            **extra,
        }
        units_note = ""
        if self.unit_name != "tokens":
            rec[self.unit_name] = self.units
            rec[f"{self.unit_name}_per_s"] = round(ups, 2)
            units_note = f"  {ups:,.1f} {self.unit_name}/s"
        if self.flops_per_token:
            rec["tflops"] = round(tps * self.flops_per_token / 1e12, 4)
            if self.peak_flops:
                rec["mfu"] = round(tps * self.flops_per_token / self.peak_flops, 4)
        self._record(rec)
        self.log(
            f"step {self.step:>6}/{self.cfg.max_steps}  loss {loss:.4f}  lr {lr:.2e}  "
            f"{tps:,.0f} tokens/s{units_note}  peak mem {mem / 2**30:.2f} GiB"
        )
        self._window = (now, self.tokens, self.units)

    def _evaluate_step(self) -> bool:
        """Evaluate, record, track the best eval loss; True when early stopping says stop."""
        cfg = self.cfg
        last_eval = self._run_eval()
        if not last_eval:
            return False
        self.last_eval = last_eval
        self._record({"step": self.step, **{f"eval/{k}": v for k, v in last_eval.items()}})
        self.log(f"step {self.step:>6}  eval " + "  ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
        ev = last_eval.get("loss")
        if ev is not None:
            if self.best_eval is None or ev < self.best_eval - 1e-4:
                self.best_eval, self.evals_without_improvement = ev, 0
            else:
                self.evals_without_improvement += 1
        if cfg.early_stopping_patience and self.evals_without_improvement >= cfg.early_stopping_patience:
            self.log(
                f"early stopping: eval loss has not improved for {cfg.early_stopping_patience} evaluations"
            )
            return True
        return False

    def fit(self, resume: bool = True) -> TrainResult:
        cfg = self.cfg
        resumed = self.resume() if resume else None
        if resumed is not None:
            self.log(f"resumed from checkpoint at step {resumed}")
        old_handlers = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                old_handlers[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not in the main thread
                pass
        t0 = time.time()
        self._window = (t0, self.tokens, self.units)  # start of the current logging interval
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        progress = _progress_bar(cfg.max_steps, self.step) if self.dist.is_main else None
        it = iter(self.data)
        self._bad = []  # reasons of the current run of consecutive bad steps
        stopped_early = False
        try:
            while self.step < cfg.max_steps:
                lr = self._set_lr()
                batches = [next(it) for _ in range(cfg.grad_accum)]
                t_step = time.time()
                out = self._train_step(batches)
                self.train_seconds += time.time() - t_step
                loss, extra, units = out.loss, out.extra, out.units
                if loss is None:
                    self.log(f"step {self.step}: no trainable units in the batch; skipped")
                    continue
                if out.bad is not None:
                    self._on_bad_step(out)
                    continue
                self._bad = []
                self.last_loss = loss
                self.step += 1
                self.tokens += out.tokens
                self.units += units
                if progress is not None:
                    progress.update(0, completed=self.step, loss=loss)

                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    self._log_step(loss, lr, extra, t0)

                is_last = self.step == cfg.max_steps
                if (cfg.eval_every and self.step % cfg.eval_every == 0) or is_last:
                    stopped_early = self._evaluate_step()
                if (
                    (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0)
                    or is_last
                    or stopped_early
                ):
                    self.save()
                if stopped_early:
                    break
                if self._stop_signal is not None:
                    path = self.save()
                    raise TrainingStopped(
                        f"stopped by signal {self._stop_signal} at step {self.step}; "
                        f"checkpoint {path}; run the same command again to resume"
                    )
        finally:
            if progress is not None:
                progress.stop()
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
        if self._stop_signal is not None:
            # it arrived after the last check (during the final save or evaluation): training is
            # complete and checkpointed, so hand the signal on to whoever handled it before fit
            # (the pipeline turns it into an interrupt) instead of swallowing the user's Ctrl-C
            os.kill(os.getpid(), self._stop_signal)
        final = {"loss": self.last_loss, **{f"eval_{k}": v for k, v in self.last_eval.items()}}
        mem, mem_kind = peak_memory(self.device)
        return TrainResult(
            step=self.step,
            tokens=self.tokens,
            seconds=time.time() - t0,
            final=final,
            best_eval_loss=self.best_eval,
            stopped_early=stopped_early,
            resumed_from=resumed,
            units=self.units,
            unit_name=self.unit_name,
            train_seconds=self.train_seconds,
            peak_memory_bytes=mem,
            peak_memory_kind=mem_kind,
        )


def _progress_bar(total: int, done: int):
    """A live progress bar on interactive terminals; None when output is a file or pipe
    (CI logs get the periodic log lines instead)."""
    from rich import get_console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = get_console()
    if not console.is_terminal:
        return None
    p = Progress(
        TextColumn("train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    p.add_task("train", total=total, completed=done, loss=float("nan"))
    p.start()
    return p


def _json_line(rec: dict) -> str:
    return json.dumps(rec) + "\n"
