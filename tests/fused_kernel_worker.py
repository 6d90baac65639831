"""The fused kernels (softcapped cross-entropy, LeakyReLU^2 MLP) against the unfused math, in Triton's interpreter:
run with TRITON_INTERPRET=1 set before Triton is first imported (its own helper functions are interpreted only then),
so the tests run it as a process of its own. Exits with an AssertionError naming the first mismatch, or with
INTERPRETER_CANNOT where the interpreter itself cannot run a loop over a runtime bound (see interpreter_problem)."""

import sys

import numpy as np
import torch
import torch.nn.functional as F

from conftest import small_hp  # first: it puts the repository on sys.path
import train_gpt as T


INTERPRETER_CANNOT = 77  # the exit status for "skipped": the interpreter, not the kernels, failed


def interpreter_problem():
    """None, or why this Triton's interpreter cannot run any kernel that loops over a runtime bound, as both kernels
    do. The interpreter of Triton 3.6 and older hands such a bound to range() as a one-element array, which NumPy 2.4
    and newer no longer turn into a Python int. Triton 3.7.1 and 3.9.0 run them with NumPy 2.5 and 2.4."""
    triton, tl = T.triton_language()

    @triton.jit
    def count_blocks(out, columns, BLOCK: tl.constexpr):
        blocks = 0
        for _ in range(0, columns, BLOCK):
            blocks += 1
        tl.store(out, blocks)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        count_blocks[(1,)](out, 10, BLOCK=4)
    except Exception as error:  # InterpreterError, whose module moved between Triton versions
        if "only 0-dimensional arrays can be converted to Python scalars" not in str(error):
            raise
        return (f"the interpreter of Triton {triton.__version__} cannot loop over a runtime bound with NumPy "
                f"{np.__version__} ({error}); NumPy < 2.4 or Triton 3.7 and newer run these checks")
    assert out.item() == 3, f"the interpreter counted {out.item()} blocks of 4 in 10 columns"
    return None


def unfused(raw, targets, softcap):
    return F.cross_entropy(softcap * torch.tanh(raw.float() / softcap), targets, reduction="none")


def losses_and_grads(loss_of, raw, targets, weights):
    leaf = raw.clone().requires_grad_(True)
    losses = loss_of(leaf, targets, 30.0)
    (losses * weights).sum().backward()
    return losses.detach(), leaf.grad


def check_the_kernel(fused, dtype, columns, tolerance):
    """Logits far beyond the softcap (tanh saturates), a vocabulary that is not a multiple of the block."""
    generator = torch.Generator().manual_seed(columns)
    raw = (torch.randn(37, columns, generator=generator) * 20).to(dtype)
    targets = torch.randint(0, columns, (37,), generator=generator)
    weights = torch.rand(37, generator=generator)  # a different gradient for every row
    fused_losses, fused_grad = losses_and_grads(fused, raw, targets, weights)
    losses, grad = losses_and_grads(unfused, raw, targets, weights)
    assert fused_losses.dtype == torch.float32 and fused_grad.dtype == dtype
    torch.testing.assert_close(fused_losses, losses, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(fused_grad.float(), grad.float(), rtol=tolerance, atol=tolerance * 1e-2)


def check_a_model(fused):
    """A model's loss and every gradient, with and without the fused loss; scoring never takes the fused path."""
    torch.manual_seed(0)
    model = T.GPT(small_hp(num_layers=2, vocab_size=64))
    inputs, targets = torch.randint(0, 64, (2, 32)), torch.randint(0, 64, (2, 32))
    results = []
    for loss_of in (None, fused):
        model.fused_ce = loss_of
        model.zero_grad()
        loss = model(inputs, targets)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (plain, plain_grads), (fused_loss, fused_grads) = results
    torch.testing.assert_close(fused_loss, plain, rtol=1e-6, atol=1e-6)
    assert len(plain_grads) == len(fused_grads) > 5
    for a, b in zip(plain_grads, fused_grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    per_token = F.cross_entropy(model.logits(inputs).flatten(0, 1), targets.flatten(), reduction="none")
    torch.testing.assert_close(model(inputs, targets, reduction="none"), per_token.view(2, 32))


def unfused_mlp(x, up, down, slope):
    h = F.linear(x, up)
    return F.linear((F.leaky_relu(h, slope) if slope else F.relu(h)).square(), down)


def mlp_output_and_grads(mlp, x, up, down, slope, weights, frozen=False):
    leaves = [x.clone().requires_grad_(True)] + [w.clone().requires_grad_(not frozen) for w in (up, down)]
    out = mlp(*leaves, slope)
    (out.float() * weights).sum().backward()
    return [out.detach().float()] + [leaf.grad.float() for leaf in leaves if leaf.grad is not None]


def check_the_mlp_kernels(fused):
    """fp32: equal to the unfused math (edges of every block masked: sizes that are not multiples of a block); bf16:
    about as close to the fp32 math of the same inputs as the unfused bf16 ops are; frozen weights: x's gradient
    alone."""
    generator = torch.Generator().manual_seed(1)
    # 2 x 600 rows: ten row blocks, so the last group of GROUP_M = 8 row blocks is a partial one
    for slope, (tokens, dim, hidden) in ((0.5, (37, 48, 200)), (0.0, (130, 64, 256)), (0.3, (600, 72, 130))):
        x = torch.randn(2, tokens, dim, generator=generator)
        up, down = torch.randn(hidden, dim, generator=generator) / dim ** 0.5, \
            torch.randn(dim, hidden, generator=generator) / hidden ** 0.5
        weights = torch.randn(2, tokens, dim, generator=generator)
        reference = mlp_output_and_grads(unfused_mlp, x, up, down, slope, weights)
        for a, b in zip(mlp_output_and_grads(fused, x, up, down, slope, weights), reference):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        frozen = mlp_output_and_grads(fused, x, up, down, slope, weights, frozen=True)
        assert len(frozen) == 2
        torch.testing.assert_close(frozen[1], reference[1], rtol=1e-4, atol=1e-4)
        exact = mlp_output_and_grads(unfused_mlp, *(t.bfloat16().float() for t in (x, up, down)), slope, weights)
        low = [mlp_output_and_grads(mlp, *(t.bfloat16() for t in (x, up, down)), slope, weights)
               for mlp in (unfused_mlp, fused)]
        for name, truth, plain, ours in zip(("out", "dx", "dup", "ddown"), exact, *low):
            plain_error, fused_error = (plain - truth).norm() / truth.norm(), (ours - truth).norm() / truth.norm()
            # The interpreter truncates fp32 to bf16 (a GPU rounds to nearest): twice the rounding error, about.
            assert fused_error <= 3 * plain_error, f"bf16 {name}: {fused_error:.2e} vs {plain_error:.2e}"


def check_a_model_with_the_fused_mlp(fused):
    """A model's loss and every gradient with and without the fused MLP, which every layer takes in training and
    none under no_grad (scoring, calibration)."""
    torch.manual_seed(0)
    model = T.GPT(small_hp(num_layers=2, vocab_size=64))
    inputs, targets = torch.randint(0, 64, (2, 32)), torch.randint(0, 64, (2, 32))
    calls, results = [], []
    counted = lambda *args: calls.append(1) or fused(*args)
    for mlp in (None, counted):
        for block in model.blocks:
            block.mlp.fused = mlp
        model.zero_grad()
        loss = model(inputs, targets)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert len(calls) == len(model.blocks)
    (plain, plain_grads), (fused_loss, fused_grads) = results
    torch.testing.assert_close(fused_loss, plain, rtol=1e-6, atol=1e-6)
    assert len(plain_grads) == len(fused_grads) > 5
    for a, b in zip(plain_grads, fused_grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        model(inputs, targets)
    assert len(calls) == len(model.blocks)


if __name__ == "__main__":
    assert T.triton_drives(torch.device("cpu")), "run with TRITON_INTERPRET=1"
    problem = interpreter_problem()
    if problem:
        print(problem)
        sys.exit(INTERPRETER_CANNOT)
    if sys.argv[1:] == ["--probe"]:  # the interpreter only
        sys.exit(0)
    fused = T.fused_softcapped_ce()
    for dtype, columns, tolerance in ((torch.float32, 1000, 1e-5), (torch.float32, 2049, 1e-5),
                                      (torch.bfloat16, 1500, 1e-2)):
        check_the_kernel(fused, dtype, columns, tolerance)
    check_a_model(fused)
    check_the_mlp_kernels(T.fused_leaky_relu2_mlp())
    check_a_model_with_the_fused_mlp(T.fused_leaky_relu2_mlp())
    print("fused kernels: equal to the unfused math")
