"""Newton-Schulz, Muon, and the schedules."""

import pytest
import torch

import train_gpt as T
from conftest import small_hp


@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (32, 512)])
def test_newton_schulz_output_is_close_to_orthogonal(shape):
    torch.manual_seed(0)
    grad = torch.randn(shape)
    singular = torch.linalg.svdvals(T.newton_schulz(grad, 5))
    # The quintic trades exactness for speed: five steps land every singular value in about [0.68, 1.13].
    assert singular.min() > 0.6 and singular.max() < 1.25


def test_newton_schulz_keeps_the_singular_vectors_of_an_ill_conditioned_matrix():
    torch.manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(128, 64))
    v, _ = torch.linalg.qr(torch.randn(64, 64))
    grad = u @ torch.diag(torch.logspace(0, -3, 64)) @ v.T  # condition number 1000
    out = T.newton_schulz(grad, 5)
    singular = torch.linalg.svdvals(out)
    assert singular.max() < 1.25 and singular.min() > 0.1
    polar = u @ v.T  # the exact orthogonalization
    cosine = (out * polar).sum() / (out.norm() * polar.norm())
    assert cosine > 0.95


def test_muon_descends_on_a_quadratic():
    torch.manual_seed(2)
    target = torch.randn(32, 16)
    weight = torch.nn.Parameter(torch.zeros(32, 16))
    opt = T.Muon([weight], lr=0.1, momentum=0.9, backend_steps=5)
    losses = []
    for step in range(150):
        opt.param_groups[0]["lr"] = 0.1 * (1 - step / 150)  # Muon's steps have a fixed size: decay to converge
        loss = (weight - target).square().sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 1e-3 * losses[0]


def test_optimizer_routing_covers_every_parameter_once():
    for tied in (True, False):
        hp = small_hp(num_layers=3, model_dim=64, tie_embeddings=tied, bigram_buckets=16, ve_layers="1,2",
                      value_residual=True, backout_layer=2)
        model = T.GPT(hp)
        optimizers = T.build_optimizers(model, hp, 0, 1)
        seen = [id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]]
        assert sorted(seen) == sorted(id(p) for p in model.parameters())
        muon = optimizers[1]
        assert all(p.ndim == 2 for p in muon.param_groups[0]["params"])
        # 6 matrices per block, the BigramHash and the value-embedding projections; never the untied head
        assert len(muon.param_groups[0]["params"]) == 6 * hp.num_layers + 2
        tables = optimizers[0].param_groups[0]["params"]
        assert [p.shape for p in tables] == [(64, 64), (16, 112), (64, 128)]


def test_lr_schedule_by_steps_and_by_wall_clock():
    hp = T.Hyperparameters(iterations=1000, warmdown_iters=200, max_wallclock_seconds=0)
    assert T.lr_multiplier(hp, 0, 0) == 1.0 and T.lr_multiplier(hp, 800, 0) == 1.0
    assert T.lr_multiplier(hp, 900, 0) == pytest.approx(0.5) and T.lr_multiplier(hp, 1000, 0) == 0.0
    timed = T.Hyperparameters(warmdown_iters=100, max_wallclock_seconds=12, gptq_reserve_seconds=2)
    # 10 ms per step so far: the warmdown spans the last 100 * 10 ms = 1 s of the 12 - 2 = 10 s training budget
    # (the GPTQ calibration reserve is not training time).
    assert T.lr_multiplier(timed, 500, 5000) == 1.0
    assert T.lr_multiplier(timed, 950, 9500) == pytest.approx(0.5)
    assert T.lr_multiplier(timed, 1000, 10000) == 0.0


def test_muon_momentum_warmup():
    hp = T.Hyperparameters(muon_momentum=0.95, muon_momentum_warmup_start=0.85, muon_momentum_warmup_steps=500)
    assert T.muon_momentum(hp, 0) == pytest.approx(0.85)
    assert T.muon_momentum(hp, 250) == pytest.approx(0.90)
    assert T.muon_momentum(hp, 10_000) == pytest.approx(0.95)
