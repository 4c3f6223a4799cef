"""Bad steps: skip, roll back, stop.

A step whose loss or gradient norm is not finite, or whose loss spikes far over the recent
median, applies no update (the engine's `_train_step` decides that and says why). What happens
next is this module's: the step is logged and counted; after `rollback_after` bad steps in a row
the run goes back to its last checkpoint but keeps its data position; after `max_bad_steps` in a
row it stops with the last good checkpoint intact. `BadStepGuard` is the part of the `Trainer`
that does this; it uses the trainer's state, checkpoints and metrics file.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from pathlib import Path

from .checkpoint import list_checkpoints
from .config import StatefulIterator, TrainConfig
from .outcomes import StepOutcome, TrainingStopped


class BadStepGuard:
    # the Trainer's state this part reads and writes
    cfg: TrainConfig
    step: int
    rollbacks: int
    recent_losses: list[float]
    ckpt_dir: Path
    data: StatefulIterator
    log: Callable[[str], None]
    _bad: list[str]

    def _record(self, rec: dict) -> None:
        raise NotImplementedError

    def _load_last(self, restore_data: bool = True) -> dict | None:
        raise NotImplementedError

    def save(self) -> Path:
        raise NotImplementedError

    def _spike_limit(self) -> float | None:
        """The loss above which a step counts as a spike, once the window of good losses is full:
        `spike_factor` x the median *and* `spike_min_excess` above it. A ratio alone is
        meaningless for losses that approach or cross 0 (preference and RL objectives), so a
        median <= 0 turns detection off and the absolute margin guards small positive ones."""
        if not self.cfg.spike_factor or len(self.recent_losses) < self.cfg.spike_window:
            return None
        med = statistics.median(self.recent_losses)
        if med <= 0:
            return None
        return max(self.cfg.spike_factor * med, med + self.cfg.spike_min_excess)

    def _on_bad_step(self, out: StepOutcome) -> None:
        """Skip, then roll back, then stop: the escalation for steps that applied no update.

        Why spike detection is on by default (`spike_factor` 4 over the median of the last 32
        good steps, only once that window is full, and at least `spike_min_excess` = 1 nat
        above it): in healthy language-model training the loss never jumps to 4x its recent
        median -- even early on, the median lags a *falling* loss -- while such a step is how
        most divergences start, and letting it update the weights can wreck them in one step.
        Skipping costs one batch. The absolute margin keeps objectives whose losses sit near 0
        (DPO, reward models) from tripping it on ordinary noise; RL, whose loss changes sign,
        turns it off (`spike_factor: 0`).

        Why roll back *and keep the data position*: a streak of bad steps usually means the
        weights or optimizer moments are already damaged (restoring fixes that) or a stretch of
        the data is poisonous (replaying it would fail again forever). Restoring the checkpoint
        but not the loader position skips every batch drawn since that checkpoint (PaLM's
        recipe); the checkpoint is then rewritten with the new position so a crash after the
        rollback cannot replay them either.
        """
        cfg = self.cfg
        assert out.bad is not None and out.loss is not None  # only steps that applied no update come here
        self._bad.append(out.bad)
        n = len(self._bad)
        what = (
            "non-finite loss or gradient"
            if out.bad == "non-finite"
            else f"loss {out.loss:.4g} is over {cfg.spike_factor:g}x the median of the last "
            f"{len(self.recent_losses)} steps ({statistics.median(self.recent_losses):.4g}); a spike"
        )
        self.log(f"step {self.step}: {what}; step skipped ({n}/{cfg.max_bad_steps} in a row)")
        self._record(
            {
                "step": self.step,
                "skipped": out.bad,
                **({"loss": round(out.loss, 5)} if math.isfinite(out.loss) else {}),
            }
        )
        if n >= cfg.max_bad_steps:
            kinds = (
                "non-finite losses"
                if set(self._bad) == {"non-finite"}
                else "bad steps (non-finite or spiking loss)"
            )
            raise TrainingStopped(
                f"{n} consecutive {kinds} at step {self.step}"
                + (f" after {self.rollbacks} rollback(s)" if self.rollbacks else "")
                + f"; stopped. Last good checkpoint: {_last(self.ckpt_dir)}. Lower the learning "
                f"rate (or raise warmup / grad_clip) or check the data."
            )
        if cfg.rollback_after and n >= cfg.rollback_after and self.rollbacks < cfg.max_rollbacks:
            self._rollback()

    def _rollback(self) -> None:
        if not list_checkpoints(self.ckpt_dir):
            self.log(f"step {self.step}: no checkpoint to roll back to yet; still skipping bad steps")
            return
        bad_at, bad_steps = self.step, len(self._bad)
        data_state = self.data.state_dict()  # past the offending batches
        rollbacks = self.rollbacks + 1
        self._load_last(restore_data=False)
        self.rollbacks = rollbacks
        self.data.load_state_dict(data_state)
        self._bad = []
        self._record({"step": self.step, "rollback": rollbacks, "from_step": bad_at, "bad_steps": bad_steps})
        self.log(
            f"rolled back to the checkpoint at step {self.step} after {bad_steps} bad steps at step "
            f"{bad_at} (rollback {rollbacks}/{self.cfg.max_rollbacks}); the batches drawn since "
            f"that checkpoint are skipped"
        )
        self.save()  # the same step, with the new data position: a crash now cannot replay them


def _last(ckpt_dir: Path) -> str:
    c = list_checkpoints(ckpt_dir)
    return str(c[-1]) if c else "none"
