"""The fused Triton kernels against the unfused math they replace, run on the CPU in Triton's interpreter
(TRITON_INTERPRET=1). Without Triton installed these tests skip, saying so; CI installs it."""

import importlib.util
import re
import sys

import pytest
import torch
import torch.nn.functional as F

import train_gpt as T
from conftest import run_script, small_hp, tiny_env

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="Triton is not installed (pip install -r requirements-optional.txt)")


@pytest.fixture
def interpreted(monkeypatch):
    """The fused softcapped cross-entropy, its kernels built under Triton's interpreter (they run on the CPU)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert T.triton_drives(torch.device("cpu"))
    return T.fused_softcapped_ce()


def unfused(raw, targets, softcap):
    return F.cross_entropy(softcap * torch.tanh(raw.float() / softcap), targets, reduction="none")


@needs_triton
@pytest.mark.parametrize("dtype, columns, tolerance", [(torch.float32, 1000, 1e-5), (torch.float32, 2049, 1e-5),
                                                       (torch.bfloat16, 1500, 1e-2)])
def test_the_fused_softcapped_cross_entropy_equals_the_unfused_math_forward_and_backward(interpreted, dtype, columns,
                                                                                         tolerance):
    generator = torch.Generator().manual_seed(columns)
    raw = (torch.randn(37, columns, generator=generator) * 20).to(dtype)  # beyond the softcap: tanh saturates
    targets = torch.randint(0, columns, (37,), generator=generator)
    weights = torch.rand(37, generator=generator)  # a different gradient for every row
    grads = []
    for loss_of in (interpreted, unfused):
        leaf = raw.clone().requires_grad_(True)
        losses = loss_of(leaf, targets, 30.0)
        (losses * weights).sum().backward()
        grads.append((losses.detach(), leaf.grad))
    (fused_losses, fused_grad), (losses, grad) = grads
    assert fused_losses.dtype == torch.float32 and fused_grad.dtype == dtype
    torch.testing.assert_close(fused_losses, losses, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(fused_grad.float(), grad.float(), rtol=tolerance, atol=tolerance * 1e-2)


@needs_triton
def test_a_model_gives_the_same_loss_and_gradients_with_the_fused_loss(interpreted):
    hp = small_hp(num_layers=2, vocab_size=64)
    torch.manual_seed(0)
    model, inputs, targets = T.GPT(hp), torch.randint(0, 64, (2, 32)), torch.randint(0, 64, (2, 32))
    results = []
    for fused in (None, interpreted):
        model.fused_ce = fused
        model.zero_grad()
        loss = model(inputs, targets)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (plain, plain_grads), (fused, fused_grads) = results
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    assert len(plain_grads) == len(fused_grads) > 5
    for a, b in zip(plain_grads, fused_grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    model.fused_ce = interpreted  # scoring (per-token losses) and logits never take the fused path
    torch.testing.assert_close(model(inputs, targets, reduction="none"), F.cross_entropy(
        model.logits(inputs).flatten(0, 1), targets.flatten(), reduction="none").view(2, 32))


@needs_triton
@pytest.mark.cuda_path  # whole runs: CI's second step
def test_the_packed_file_trains_through_the_fused_kernel_as_the_unfused_run_does(sample, tmp_path):
    packed = tmp_path / "elsewhere" / "train_gpt.py"  # a packed file compiles its kernels from its own source
    packed.parent.mkdir()
    packed.write_bytes(T.pack_source(T.Path(T.__file__).read_bytes())[0])
    logs = {}
    for name, fused in (("fused", "1"), ("unfused", "0")):
        env = tiny_env(sample, RUN_ID=name, ITERATIONS=2, TRAIN_BATCH_TOKENS=512, GPTQ_CALIBRATION_BATCHES=1,
                       FUSED_CE_ENABLED=fused, TRITON_INTERPRET="1")
        result = run_script([sys.executable, str(packed)], env, tmp_path)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        logs[name] = (tmp_path / "logs" / f"{name}.txt").read_text()
    assert re.search(r"^fused_ce: on \(Triton\)$", logs["fused"], re.M) and not re.search("^fused_ce:", logs["unfused"], re.M)
    losses = {name: [float(x) for x in re.findall(r"^step:\d+/\d+ train_loss:(\S+)", log, re.M)]
              for name, log in logs.items()}
    assert len(losses["fused"]) == 2 and losses["fused"] == pytest.approx(losses["unfused"], abs=1e-4)


def test_without_a_device_triton_drives_the_fused_switch_runs_the_unfused_math_and_says_so(sample, tmp_path,
                                                                                             monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not T.triton_drives(torch.device("cpu"))
    result = run_script([sys.executable, str(T.Path(T.__file__))],
                        tiny_env(sample, RUN_ID="unfused", ITERATIONS=1, FUSED_CE_ENABLED=1), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^fused_ce: the same math unfused \(Triton (is not installed|does not drive cpu)\)$",
                     (tmp_path / "logs" / "unfused.txt").read_text(), re.M)


def test_the_fused_loss_and_mile_are_refused_together():
    with pytest.raises(T.ConfigError, match="FUSED_CE_ENABLED"):
        T.Hyperparameters.from_env({"FUSED_CE_ENABLED": "1", "MILE_GAMMA": "1.1"})
    with pytest.raises(T.ConfigError, match="FUSED_CE_ENABLED.*LOGIT_SOFTCAP"):
        T.Hyperparameters.from_env({"FUSED_CE_ENABLED": "1", "LOGIT_SOFTCAP": "0"})
