"""Generation backends for rollouts: `generate(prompts, n, params) -> completions` (n samples
per prompt, prompt-major; a completion keeps its stop token so the policy learns to stop) and
`sync(model)` (the policy's weights changed).

`LmforgeBackend` generates through the serving engine (`serve.batch.generate_batch`) on the
policy module itself, so every rollout sees the current weights (LoRA and MoE policies alike),
with the engine's continuous batching, shared prefill of a GRPO group's identical prompts and
its sampler; each sequence has its own seed, `mix_seed(call seed, index)`, so a rollout is
reproducible whatever the batching. `VLLMBackend` is used only when asked for and `vllm`
imports on a CUDA machine. Kept apart from the rollout loop so a new engine is one class here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Protocol

import torch

from ..errors import ConfigError
from ..serve.batch import generate_batch, mix_seed  # noqa: F401  (mix_seed: the rollout's seeds too)
from ..serve.request import GenParams


class GenerationBackend(Protocol):
    def generate(self, prompts: Sequence[Sequence[int]], n: int, params: GenParams) -> list[list[int]]:
        """n completions per prompt, prompt-major (out[i * n + j]); each ends with its stop
        token when one was sampled. `params.max_tokens` is the budget, `params.stop_token_ids`
        the stops."""

    def sync(self, model: torch.nn.Module) -> None:
        """The policy's weights changed; refresh the backend's copy (if it keeps one)."""


class LmforgeBackend:
    """The serving engine on the policy itself (no copy of the weights: `sync` only swaps the
    module), at most `batch_size` sequences in flight; the slot cache lives for one call."""

    name = "lmforge"

    def __init__(self, model: torch.nn.Module, batch_size: int = 64):
        self.model, self.batch_size = model, batch_size

    def sync(self, model: torch.nn.Module) -> None:
        self.model = model

    def generate(self, prompts: Sequence[Sequence[int]], n: int, params: GenParams) -> list[list[int]]:
        seqs = [list(p) for p in prompts for _ in range(n)]
        seed = params.seed
        each = [replace(params, seed=None if seed is None else mix_seed(seed, k)) for k in range(len(seqs))]
        comps = generate_batch(
            self.model, seqs, each, stop_token_ids=params.stop_token_ids, max_batch=self.batch_size
        )
        return [c.token_ids + ([] if c.stop_token_id is None else [c.stop_token_id]) for c in comps]


class VLLMBackend:
    """vLLM for rollouts on a GPU machine (optional; never needed by tests). The policy's
    weights are pushed into the vLLM engine before each rollout (`sync`). vLLM's internal API
    for this has moved between versions; the paths tried are listed in `_load_weights`."""

    name = "vllm"

    def __init__(
        self, model_dir: str, model: torch.nn.Module, seed: int, gpu_memory_utilization: float = 0.3
    ):
        from vllm import LLM  # noqa: F401  (guarded by make_backend)

        self.llm = LLM(
            model=str(model_dir),
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_prefix_caching=True,
        )
        self.sync(model)

    def sync(self, model: torch.nn.Module) -> None:
        state = _merged_state(model)
        self._load_weights(list(state.items()))

    def _load_weights(self, items) -> None:
        eng = self.llm.llm_engine
        paths = (
            lambda: eng.model_executor.driver_worker.model_runner.model,
            lambda: eng.model_executor.driver_worker.worker.model_runner.model,
        )
        for get in paths:
            try:
                target = get()
            except AttributeError:
                continue
            target.load_weights(items)
            return
        if hasattr(self.llm, "collective_rpc"):
            self.llm.collective_rpc(lambda self_: self_.model_runner.model.load_weights(items))
            return
        raise ConfigError(
            "rl backend vllm: this vLLM version offers no known way to load updated weights; "
            "use backend=lmforge"
        )

    def generate(self, prompts: Sequence[Sequence[int]], n: int, params: GenParams) -> list[list[int]]:
        from vllm import SamplingParams as VSP

        vp = VSP(
            n=n,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k or -1,
            max_tokens=params.max_tokens,
            stop_token_ids=list(params.stop_token_ids),
            seed=params.seed,
            skip_special_tokens=False,
        )
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], vp, use_tqdm=False)
        stops = set(params.stop_token_ids)
        res = []
        for o in outs:
            for c in o.outputs:
                ids = list(c.token_ids)
                if c.finish_reason == "stop" and (not ids or ids[-1] not in stops) and stops:
                    ids.append(min(stops))
                res.append(ids)
        return res


def _merged_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """HF-named weights of the policy with any LoRA update folded in (for an external engine)."""
    from ..peft.lora import LoraLinear

    out = {}
    lora = {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    for name, m in lora.items():
        out[f"{name}.weight"] = m.merged_weight()
    for k, v in model.state_dict().items():
        if ".lora_" in k or k.startswith("v_head") or ".base_layer." in k:
            continue
        out[k] = v
    return out


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001  (any import failure means: not usable here)
        return False
    return torch.cuda.is_available()


def make_backend(
    kind: str,
    model: torch.nn.Module,
    *,
    model_dir: str,
    seed: int,
    batch_size: int,
    log: Callable[[str], None],
) -> GenerationBackend:
    if kind == "vllm" or (kind == "auto" and vllm_available()):
        if not vllm_available():
            raise ConfigError("backend=vllm needs the `vllm` package and a CUDA GPU; use backend=lmforge")
        log("generation backend: vLLM")
        return VLLMBackend(model_dir, model, seed)
    log(f"generation backend: the lmforge serving engine on the policy, {batch_size} sequences at once")
    return LmforgeBackend(model, batch_size)
