"""A few training steps of a small model with the real optimizers, each rank on its share of one fixed global
batch. Under torchrun every rank saves its parameters to <prefix>.rank<r>.pt; the tests import `train` for the
one-process reference."""

import sys

import torch
import torch.distributed as dist

from conftest import small_hp  # first: it puts the repository on sys.path
import train_gpt as T

STEPS, GLOBAL_ROWS = 4, 12  # 12 rows: 6 per rank at 2 processes, 4 at 3


def config(bf16=False, local_clip=False):
    # 5 layers: banks of 10 and 5 matrices, which neither 2 nor 3 processes divide; a clip norm small enough to act.
    # bf16: the records' precision of state (MUON_BF16_STATE, EMBED_BF16); local_clip: GRAD_CLIP_LOCAL.
    return small_hp(num_layers=5, model_dim=64, num_heads=4, num_kv_heads=2, grad_clip_norm=0.05,
                    muon_bf16_state=bf16, embed_bf16=bf16, grad_clip_local=local_clip)


def adam_after_muon(optimizers):
    """Runs every AdamW step after Muon's, the other extreme of the side stream's overlap (ADAMW_SIDE_STREAM)."""
    adam_step, muon_step, deferred = optimizers.adam.step, optimizers.muon.step, []
    optimizers.adam.step = lambda: deferred.append(adam_step)

    def muon_then_adam():
        muon_step()
        while deferred:
            deferred.pop()()
    optimizers.muon.step = muon_then_adam


def train(rank, world_size, adam_last=False, bf16=False, local_clip=False):
    hp = config(bf16, local_clip)
    torch.manual_seed(0)
    model = T.GPT(hp)
    optimizers = T.Optimizers(model, hp, rank, world_size)
    if adam_last:
        adam_after_muon(optimizers)
    batches = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        tokens = torch.randint(hp.vocab_size, (GLOBAL_ROWS, hp.train_seq_len + 1), generator=batches)
        mine = tokens.chunk(world_size)[rank]  # equal shares: the mean of the rank means is the global mean
        model(mine[:, :-1], mine[:, 1:]).backward()
        optimizers.step(lr_scale=1.0 - step / STEPS, momentum=T.muon_momentum(hp, step))
        optimizers.zero_grad()
    return {name: p.detach().clone() for name, p in model.named_parameters()}, optimizers.muon.momentum_bytes()


def train_with_clipped_shares(world_size):
    """One process restating GRAD_CLIP_LOCAL at `world_size` ranks: each rank's share of the batch has its gradient
    clipped by its own norm, and the optimizers (their clip off) step on the mean of the clipped gradients."""
    hp = config()
    torch.manual_seed(0)
    model = T.GPT(hp)
    params = list(model.parameters())
    optimizers = T.Optimizers(model, T.dataclasses.replace(hp, grad_clip_norm=0.0), 0, 1)
    batches = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        tokens = torch.randint(hp.vocab_size, (GLOBAL_ROWS, hp.train_seq_len + 1), generator=batches)
        mean = [torch.zeros_like(p) for p in params]
        for share in tokens.chunk(world_size):
            optimizers.zero_grad()
            model(share[:, :-1], share[:, 1:]).backward()
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            norm = torch.stack([g.square().sum() for g in grads]).sum().sqrt()
            factor = (hp.grad_clip_norm / (norm + 1e-6)).clamp(max=1.0)
            assert factor < 1  # the clip acts
            for total, g in zip(mean, grads):
                total.add_(g * factor / world_size)
        for p, g in zip(params, mean):
            if p.grad is None:
                p.grad = g
            else:
                p.grad.copy_(g)  # in place: a banked matrix's gradient is a view of its bank's
        optimizers.step(lr_scale=1.0 - step / STEPS, momentum=T.muon_momentum(hp, step))
        optimizers.zero_grad()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


if __name__ == "__main__":  # argv: the output prefix, then variants to train too: adam_last (AdamW after Muon), bf16,
    # local_clip
    dist.init_process_group("gloo")
    params, momentum_bytes = train(dist.get_rank(), dist.get_world_size())
    torch.save(dict(params=params, momentum_bytes=momentum_bytes), f"{sys.argv[1]}.rank{dist.get_rank()}.pt")
    for variant in sys.argv[2:]:
        params, _ = train(dist.get_rank(), dist.get_world_size(), **{variant: True})
        torch.save(dict(params=params), f"{sys.argv[1]}.{variant}.rank{dist.get_rank()}.pt")
    dist.barrier()
    dist.destroy_process_group()
