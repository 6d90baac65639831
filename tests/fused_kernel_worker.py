"""The fused kernels against the unfused math, in Triton's interpreter: run with TRITON_INTERPRET=1 set before
Triton is first imported (its own helper functions are interpreted only then), so the tests run it as a process of
its own. Exits with an AssertionError naming the first mismatch."""

import torch
import torch.nn.functional as F

from conftest import small_hp  # first: it puts the repository on sys.path
import train_gpt as T


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


if __name__ == "__main__":
    assert T.triton_drives(torch.device("cpu")), "run with TRITON_INTERPRET=1"
    fused = T.fused_softcapped_ce()
    for dtype, columns, tolerance in ((torch.float32, 1000, 1e-5), (torch.float32, 2049, 1e-5),
                                      (torch.bfloat16, 1500, 1e-2)):
        check_the_kernel(fused, dtype, columns, tolerance)
    check_a_model(fused)
    print("fused kernels: equal to the unfused math")
