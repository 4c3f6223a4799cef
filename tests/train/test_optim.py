"""Muon for the hidden matrices, AdamW for the rest: the parameter split, the orthogonalised
update, a tiny model that learns with it, and an exact checkpoint round trip."""

from types import SimpleNamespace

import pytest
import torch

from lmforge.errors import CheckpointError
from lmforge.model import ModelConfig, Transformer
from lmforge.train.checkpoint import load_checkpoint, save_checkpoint
from lmforge.train.optim import CombinedOptimizer, build_optimizer, muon_param_names

pytestmark = pytest.mark.skipif(
    not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9"
)


def _cfg(**kw):
    base = dict(optimizer="muon", lr=3e-3, muon_lr=None, weight_decay=0.0, beta1=0.9, beta2=0.95)
    base.update(kw)
    return SimpleNamespace(**base)


def _model(**kw):
    torch.manual_seed(0)
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32)
    base.update(kw)
    return Transformer(ModelConfig(**base))


def test_split_hidden_matrices_to_muon_rest_to_adamw():
    m = _model(n_experts=4, experts_top_k=2, shared_expert=True)
    opt = build_optimizer(m, _cfg(muon_lr=0.02))
    assert isinstance(opt, CombinedOptimizer)
    names = set(muon_param_names(m))
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert "model.layers.1.mlp.shared_expert.down_proj.weight" in names
    assert not any(
        n.endswith(("mlp.gate.weight", "norm.weight")) or "embed" in n or "lm_head" in n or "experts." in n
        for n in names
    )
    muon_ids = {id(p) for g in opt.parts["muon"].param_groups for p in g["params"]}
    adam_ids = {id(p) for g in opt.parts["adamw"].param_groups for p in g["params"]}
    params = {id(p) for p in m.parameters()}
    assert muon_ids | adam_ids == params and not muon_ids & adam_ids
    assert [g["lr_scale"] for g in opt.parts["muon"].param_groups] == [pytest.approx(0.02 / 3e-3)]
    assert {g["lr_scale"] for g in opt.parts["adamw"].param_groups} == {1.0}
    assert len(opt.param_groups) == 3  # adamw decay + no-decay, muon
    plain = build_optimizer(m, _cfg(optimizer="adamw"))
    assert isinstance(plain, torch.optim.AdamW)


def test_muon_update_is_orthogonalised():
    """First step: the update of a hidden matrix is NS5(grad) * 0.2 * sqrt(max(rows, cols)) * lr;
    its singular values sit in a band around 1 (the quintic iteration lands in ~[0.68, 1.2]).
    Rectangular matrices only: a random square gradient can have a singular value near 0, which
    five iterations do not lift all the way (by design: speed over exactness)."""
    m = _model()
    opt = build_optimizer(m, _cfg(lr=1.0))
    g = torch.Generator().manual_seed(0)
    for p in m.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    w = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt.step()
    for name in (
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.1.self_attn.v_proj.weight",
        "model.layers.1.mlp.gate_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
    ):
        p = dict(m.named_parameters())[name]
        delta = (w[name] - p.detach()) / (0.2 * max(p.shape) ** 0.5)
        s = torch.linalg.svdvals(delta.float())
        assert len(s) == min(p.shape)
        assert 0.5 < float(s.min()) and float(s.max()) < 1.3, (name, s.min(), s.max())


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 64, (4, 9), generator=g)
    return [base for _ in range(n)]  # a fixed batch: the loss must fall fast


def _train(m, opt, batches):
    losses = []
    for x in batches:
        loss = m.loss(x[:, :-1], x[:, 1:])
        loss.backward()
        loss = loss.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_tiny_model_learns_with_muon():
    m = _model()
    losses = _train(m, build_optimizer(m, _cfg(lr=3e-3, muon_lr=0.02, weight_decay=0.1)), _batches(30))
    assert losses[-1] < 0.5 * losses[0], losses


def test_checkpoint_round_trip_is_exact(tmp_path):
    cfg = _cfg(weight_decay=0.1, muon_lr=0.01)
    m = _model(n_experts=2, experts_top_k=1)
    opt = build_optimizer(m, cfg)
    _train(m, opt, _batches(3))
    path = save_checkpoint(tmp_path, 3, m, opt, {"step": 3})
    _train(m, opt, _batches(2, seed=1))
    ref = {k: v.clone() for k, v in m.state_dict().items()}

    m2 = _model(n_experts=2, experts_top_k=1)
    opt2 = build_optimizer(m2, cfg)
    assert load_checkpoint(path, m2, opt2)["step"] == 3
    assert opt2.parts["muon"].state  # momentum buffers restored
    _train(m2, opt2, _batches(2, seed=1))
    for k, v in m2.state_dict().items():
        assert torch.equal(v, ref[k]), k

    # an AdamW checkpoint cannot silently seed a Muon run
    plain = build_optimizer(m2, _cfg(optimizer="adamw"))
    with pytest.raises(CheckpointError, match="single optimizer"):
        opt2.load_state_dict(plain.state_dict())


def test_pretrain_stage_with_muon_resumes_exactly(clone_run):
    """The real stage with optimizer=muon: a run cut after its step-10 checkpoint and re-run ends
    with the same weights as an uninterrupted one."""
    import json
    import shutil

    from safetensors.torch import load_file

    from lmforge.cli import main
    from tests.conftest import tiny_args

    extra = [
        "pretrain.optimizer=muon",
        "pretrain.muon_lr=0.01",
        "pretrain.max_steps=20",
        "pretrain.checkpoint_every=10",
    ]
    root = clone_run("full")
    clone_run("cut")
    assert main(["pretrain", *tiny_args(root, "full", *extra)]) == 0
    assert main(["pretrain", *tiny_args(root, "cut", *extra)]) == 0
    pre = root / "cut" / "pretrain"
    shutil.rmtree(pre / "checkpoints" / "step_00000020")
    shutil.rmtree(pre / "model")
    m = json.loads((pre / "manifest.json").read_text())
    m["status"] = "running"
    (pre / "manifest.json").write_text(json.dumps(m))
    assert main(["pretrain", *tiny_args(root, "cut", *extra)]) == 0
    assert json.loads((pre / "manifest.json").read_text())["metrics"]["resumed_from_step"] == 10
    a = load_file(str(root / "full" / "pretrain" / "model" / "model.safetensors"))
    b = load_file(str(pre / "model" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_stage_optimizer_choice_is_built_by_the_engine(monkeypatch, tmp_path):
    """QLoRA's 8-bit / paged choices go to the engine (reward and align used to ignore them);
    without bitsandbytes it is AdamW, and the log says so."""
    import sys

    from lmforge.train.config import TrainConfig
    from lmforge.train.engine import Trainer
    from lmforge.train.objectives.pretrain import pretrain_objective
    from tests.conftest import TokenRows

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` fails as if absent
    notes: list[str] = []
    opt = build_optimizer(_model(), _cfg(optimizer="adamw"), "paged_adamw8bit", notes.append)
    assert (
        type(opt) is torch.optim.AdamW
        and "paged_adamw8bit unavailable" in notes[0]
        and notes[0].endswith("using AdamW")
    )
    logged: list[str] = []
    cfg = TrainConfig(
        max_steps=1, batch_size=2, warmup_steps=0, eval_every=0, checkpoint_every=0, log_every=1
    )
    t = Trainer(
        _model(vocab_size=64), pretrain_objective(), TokenRows(), cfg, tmp_path,
        device=torch.device("cpu"), log=logged.append, optimizer="adamw8bit",
    )  # fmt: skip
    assert type(t.optimizer) is torch.optim.AdamW
    assert any("adamw8bit unavailable" in line for line in logged)
    with pytest.raises(Exception, match="not known"):
        build_optimizer(_model(), _cfg(), "lion")
