"""The GPT: causality, parameter counts, the loss, and the attention backend choice."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import train_gpt as T

SMALL = T.Hyperparameters(num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2, vocab_size=97, train_seq_len=48)


def randomized(model, seed=0):
    """Zero-initialized projections would hide attention entirely; give every weight a random value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3 + (1.0 if p.ndim == 1 else 0.0))
    return model


@pytest.mark.parametrize("hp", [SMALL, dataclasses.replace(SMALL, num_layers=5, tie_embeddings=False, num_kv_heads=4)])
def test_a_future_token_never_changes_earlier_logits(hp):
    torch.manual_seed(0)
    model = randomized(T.GPT(hp)).eval()
    tokens = torch.randint(0, hp.vocab_size, (2, hp.train_seq_len))
    base = model(tokens)
    for position in (0, 17, hp.train_seq_len - 1):
        changed = tokens.clone()
        changed[:, position] = (changed[:, position] + 1) % hp.vocab_size
        out = model(changed)
        assert torch.allclose(out[:, :position], base[:, :position], atol=1e-5, rtol=0)
        assert not torch.allclose(out[:, position], base[:, position], atol=1e-3)


def test_baseline_parameter_count_matches_the_challenge_record():
    # The challenge's naive baseline (9x512, 8/4 heads, MLP 2x, vocab 1024, tied) has 17,059,912 parameters.
    total, embedding, non_embedding = T.count_parameters(T.GPT(T.Hyperparameters()))
    assert (total, embedding, non_embedding) == (17_059_912, 524_288, 16_535_624)


@pytest.mark.parametrize("layers, dim, heads, kv_heads, mult, vocab, tied", [(4, 64, 4, 2, 2, 97, True), (5, 96, 6, 3, 3, 300, False)])
def test_parameter_count_closed_form(layers, dim, heads, kv_heads, mult, vocab, tied):
    hp = T.Hyperparameters(num_layers=layers, model_dim=dim, num_heads=heads, num_kv_heads=kv_heads,
                           mlp_mult=mult, vocab_size=vocab, tie_embeddings=tied)
    kv_dim = dim // heads * kv_heads
    block = 2 * dim * dim + 2 * dim * kv_dim + heads + 2 * mult * dim * dim + 4 * dim
    expected = layers * block + vocab * dim * (1 if tied else 2) + min(layers // 2, layers - layers // 2) * dim
    assert T.count_parameters(T.GPT(hp))[0] == expected


def test_loss_is_the_cross_entropy_of_the_softcapped_logits():
    torch.manual_seed(1)
    model = randomized(T.GPT(SMALL))
    tokens = torch.randint(0, SMALL.vocab_size, (3, 20))
    targets = torch.randint(0, SMALL.vocab_size, (3, 20))
    logits = model(tokens)
    assert logits.abs().max() <= SMALL.logit_softcap
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    assert torch.allclose(model(tokens, targets), expected, atol=1e-6)
    per_token = model(tokens, targets, reduction="none")
    assert per_token.shape == targets.shape and torch.allclose(per_token.mean(), expected, atol=1e-6)


def test_output_projections_start_at_zero_so_blocks_start_as_identity():
    model = T.GPT(SMALL)
    for block in model.blocks:
        assert block.attn.proj.weight.abs().max() == 0 and block.mlp.proj.weight.abs().max() == 0


def test_attention_backend_selection_on_cpu():
    assert T.select_attention("auto", "cpu")[0] == "sdpa"
    for backend in ("fa3", "fa2"):
        with pytest.raises(T.ConfigError, match="ATTN_BACKEND"):
            T.select_attention(backend, "cpu")


def test_sdpa_grouped_query_attention_matches_repeated_heads():
    torch.manual_seed(2)
    q, k, v = torch.randn(2, 10, 4, 8), torch.randn(2, 10, 2, 8), torch.randn(2, 10, 2, 8)
    expected = T._sdpa(q, k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2))
    assert torch.allclose(T._sdpa(q, k, v), expected, atol=1e-6)
