"""Local distillation loss (docs/algorithms.md §3) against an independent naive re-computation, and
EsViT similarity matching (§2)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from glsd_cli.geometry import match_geometric
from glsd_cli.losses.local import LocalDistillationLoss, match_similarity

D, K = 8, 16
GRIDS = [(3, 3), (3, 3), (2, 2), (2, 2)]  # 2 global views, 2 local views
B = 2
ST, TT = 0.1, 0.04


def _last(seed: int, bias: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    return weight_norm(nn.Linear(D, K, bias=bias))


def _views(seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    student = [F.normalize(torch.randn(B, r * c, D, generator=g), dim=-1).requires_grad_() for r, c in GRIDS]
    # requires_grad on the teacher too, to prove that the loss sends it nothing
    teacher = [F.normalize(torch.randn(B, r * c, D, generator=g), dim=-1).requires_grad_() for r, c in GRIDS[:2]]
    return student, teacher


def _geometric_matches(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    sizes = [100, 100, 40, 40]
    boxes = [torch.cat((torch.randint(0, 80, (B, 2), generator=g), torch.full((B, 2), s)), 1).double() for s in sizes]
    flips = [torch.rand(B, generator=g) < 0.5 for _ in sizes]
    return {(t, s): match_geometric(boxes[s], flips[s], GRIDS[s], boxes[t], flips[t], GRIDS[t])
            for t in range(2) for s in range(4) if s != t}


def _random_matches(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {(t, s): (torch.randint(0, 9, (B, GRIDS[s][0] * GRIDS[s][1]), generator=g), None)
            for t in range(2) for s in range(4) if s != t}


def _naive(student_z, teacher_z, student_last, teacher_last, matches, center, tt=TT, st=ST) -> torch.Tensor:
    """Straight from the formula: loop over pairs, images and tokens, one token at a time."""
    pair_losses = []
    for (t, s), (index, valid) in matches.items():
        n_tokens = student_z[s].shape[1]
        image_losses = []
        for b in range(student_z[s].shape[0]):
            terms = []
            for i in range(n_tokens):
                with torch.no_grad():
                    target = F.softmax((teacher_last(teacher_z[t][b, int(index[b, i])]) - center[0]) / tt, dim=-1)
                log_q = F.log_softmax(student_last(student_z[s][b, i]) / st, dim=-1)
                mask = 1.0 if valid is None else float(valid[b, i])
                terms.append(-(target * log_q).sum() * mask)
            image_losses.append(torch.stack(terms).sum() / n_tokens)  # masked tokens count as zero
        pair_losses.append(torch.stack(image_losses).mean())
    return torch.stack(pair_losses).mean()


def _grads(tensors, module) -> list[torch.Tensor]:
    out = [x.grad.clone() for x in tensors] + [p.grad.clone() for p in module.parameters()]
    for x in tensors:
        x.grad = None
    module.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("matches_fn", [_geometric_matches, _random_matches], ids=["geometric", "no_mask"])
def test_loss_and_gradients_match_naive(matches_fn) -> None:
    student_z, teacher_z = _views(0)
    student_last, teacher_last = _last(1), _last(2)
    matches = matches_fn(3)
    loss_fn = LocalDistillationLoss(K, student_temp=ST, chunk_tokens=5)  # 5 < 2*9 and 2*4 tokens
    loss_fn.center.copy_(torch.randn(1, K) * 0.3)

    loss, stats = loss_fn(student_z, teacher_z, student_last, teacher_last, matches, TT)
    loss.backward()
    got = _grads(student_z, student_last)
    ref = _naive(student_z, teacher_z, student_last, teacher_last, matches, loss_fn.center)
    ref.backward()
    want = _grads(student_z, student_last)

    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert len(got) == len(want) == 4 + 2  # 4 student views + weight_norm's g and v
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # The teacher gets nothing.
    assert all(z.grad is None for z in teacher_z)
    assert all(p.grad is None for p in teacher_last.parameters())

    masks = [v for _, v in matches.values()]
    if masks[0] is None:
        assert stats["local_valid_fraction"] == 1.0
    else:
        expected = sum(float(v.float().mean()) for v in masks) / len(masks)
        assert stats["local_valid_fraction"] == pytest.approx(expected)
        assert 0.0 < expected < 1.0  # the fixture really exercises the hinge


@pytest.mark.parametrize("chunk", [1, 7, 18, 10_000, None])  # None: auto (16 MiB)
def test_chunk_size_does_not_change_the_loss(chunk: int) -> None:
    student_z, teacher_z = _views(4)
    student_last, teacher_last = _last(5), _last(6)
    matches = _geometric_matches(7)
    ref, _ = LocalDistillationLoss(K, chunk_tokens=3)(student_z, teacher_z, student_last, teacher_last, matches, TT)
    got, _ = LocalDistillationLoss(K, chunk_tokens=chunk, recompute_above_mib=0)(
        student_z, teacher_z, student_last, teacher_last, matches, TT)
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    with torch.no_grad():  # no checkpointing without grad: same value
        plain, _ = LocalDistillationLoss(K, chunk_tokens=chunk)(student_z, teacher_z, student_last, teacher_last, matches, TT)
    assert plain.item() == pytest.approx(ref.item(), rel=1e-6)


@pytest.mark.parametrize("recompute_above_mib", [0.0, 32.0])  # checkpointed chunks, stored logits
def test_center_update_before_backward_does_not_change_gradients(recompute_above_mib: float) -> None:
    # DINO updates its centre inside the loss forward, i.e. before backward; the checkpointed
    # recomputation must still use the centre of the forward pass.
    student_z, teacher_z = _views(8)
    student_last, teacher_last = _last(9), _last(10)
    matches = _geometric_matches(11)
    loss_fn = LocalDistillationLoss(K, chunk_tokens=4, recompute_above_mib=recompute_above_mib)
    loss, _ = loss_fn(student_z, teacher_z, student_last, teacher_last, matches, TT)
    loss.backward()
    want = _grads(student_z, student_last)
    loss, _ = loss_fn(student_z, teacher_z, student_last, teacher_last, matches, TT)
    loss_fn.center.add_(5.0 * torch.randn(1, K))
    loss.backward()
    for a, b in zip(_grads(student_z, student_last), want):
        torch.testing.assert_close(a, b)


def test_checkpointing_does_not_keep_logits() -> None:
    # Count the bytes autograd saves for backward outside the checkpointed chunks: with K = 4096
    # the full student logits of one pair would be 2 * 64 * 4096 * 4 B = 2 MiB.
    k, n = 4096, 64
    student = [torch.randn(2, n, D, requires_grad=True) for _ in range(2)]
    teacher = [torch.randn(2, n, D) for _ in range(2)]
    last_s, last_t = weight_norm(nn.Linear(D, k, bias=False)), weight_norm(nn.Linear(D, k, bias=False))
    idx = torch.randint(0, n, (2, n))
    matches = {(0, 1): (idx, None), (1, 0): (idx, torch.rand(2, n) < 0.5)}
    saved: list[int] = []

    def pack(x: torch.Tensor) -> torch.Tensor:
        saved.append(x.numel() * x.element_size())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        # A chunk's logits are 16 x 4096 x 4 B = 0.25 MiB: above 0.1 MiB they are recomputed.
        loss, _ = LocalDistillationLoss(k, chunk_tokens=16, recompute_above_mib=0.1)(
            student, teacher, last_s, last_t, matches, TT)
    loss.backward()
    assert sum(saved) < 2 * n * k * 4 / 8
    assert student[0].grad is not None and last_s.parametrizations.weight.original1.grad is not None


def test_loss_runs_under_autocast() -> None:
    student_z, teacher_z = _views(12)
    student_last, teacher_last = _last(13), _last(14)
    matches = _geometric_matches(15)
    ref, _ = LocalDistillationLoss(K, chunk_tokens=5)(student_z, teacher_z, student_last, teacher_last, matches, TT)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = LocalDistillationLoss(K, chunk_tokens=5)(student_z, teacher_z, student_last, teacher_last, matches, TT)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(ref.item(), rel=5e-2)
    got.backward()
    assert all(z.grad is not None for z in student_z)


def test_input_errors() -> None:
    student_z, teacher_z = _views(16)
    loss_fn = LocalDistillationLoss(K)
    with pytest.raises(ValueError):
        loss_fn(student_z, teacher_z, _last(1), _last(2), {}, TT)
    with pytest.raises(ValueError):
        loss_fn(student_z, teacher_z, _last(1), _last(2), {(0, 2): (torch.zeros(B, 9, dtype=torch.long), None)}, TT)


# --------------------------------------------------------------------------- update_center


def _naive_center(center, teacher_z, teacher_last, m) -> torch.Tensor:
    with torch.no_grad():
        logits = torch.cat([teacher_last(z[b, i]).reshape(1, -1) for z in teacher_z
                            for b in range(z.shape[0]) for i in range(z.shape[1])])
    return m * center + (1 - m) * logits.mean(0, keepdim=True)


@pytest.mark.parametrize("kind", ["weight_norm", "linear_bias", "mlp"])
def test_update_center_matches_naive_mean(kind: str) -> None:
    torch.manual_seed(0)
    if kind == "weight_norm":
        last = weight_norm(nn.Linear(D, K, bias=False))  # the shortcut W mean(z)
    elif kind == "linear_bias":
        last = nn.Linear(D, K)  # fallback: chunked sum
    else:
        last = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, K, bias=False))  # fallback, non-linear
    _, teacher_z = _views(17)
    loss_fn = LocalDistillationLoss(K, center_momentum=0.8, chunk_tokens=4)
    expected = torch.zeros(1, K)
    for _ in range(2):
        expected = _naive_center(expected, teacher_z, last, 0.8)
        loss_fn.update_center(teacher_z, last)
        torch.testing.assert_close(loss_fn.center, expected, rtol=1e-5, atol=1e-6)
    assert loss_fn.center.shape == (1, K)
    assert all(p.grad is None for p in last.parameters()) and all(z.grad is None for z in teacher_z)


# --------------------------------------------------------------------------- match_similarity


def test_match_similarity_hand_case() -> None:
    student = torch.tensor([[[1.0, 0.2], [0.0, 1.0], [1.0, 1.0]]])
    teacher = torch.tensor([[[10.0, 10.0], [1.0, 0.0]]])
    # cosines: s0 -> (0.83, 0.98) -> 1 (a raw dot product would pick 0: 12 > 1);
    # s1 -> (0.71, 0) -> 0; s2 -> (1.0, 0.71) -> 0.
    assert match_similarity(student, teacher).tolist() == [[1, 0, 0]]
    # a scaled copy of the teacher token is still the best match
    assert match_similarity(teacher * 3, teacher).tolist() == [[0, 1]]


def test_match_similarity_vs_loop() -> None:
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 11, 6, generator=g), torch.randn(3, 7, 6, generator=g)
    got = match_similarity(student, teacher)
    assert got.dtype == torch.long and got.shape == (3, 11)
    for b in range(3):
        for i in range(11):
            sims = [F.cosine_similarity(student[b, i], teacher[b, j], dim=0).item() for j in range(7)]
            assert int(got[b, i]) == max(range(7), key=lambda j: sims[j])
    with pytest.raises(ValueError):
        match_similarity(student, teacher[:2])


def test_recomputed_and_stored_logits_give_the_same_loss_and_gradients(monkeypatch) -> None:
    import glsd_cli.losses.local as local

    calls = []
    real_checkpoint = local.checkpoint
    monkeypatch.setattr(local, "checkpoint", lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k))
    results = []
    for recompute_above_mib in (0.0, 1.0):  # every chunk recomputed; every chunk (< 1 MiB) stored
        student_z, teacher_z = _views(12)
        student_last, teacher_last = _last(13), _last(14)
        calls.clear()
        loss, _ = LocalDistillationLoss(K, chunk_tokens=5, recompute_above_mib=recompute_above_mib)(
            student_z, teacher_z, student_last, teacher_last, _geometric_matches(15), TT)
        loss.backward()
        results.append((loss.detach(), _grads(student_z, student_last), len(calls)))
    (loss_r, grads_r, n_r), (loss_s, grads_s, n_s) = results
    assert n_r > 0 and n_s == 0  # the threshold really switches the path
    torch.testing.assert_close(loss_s, loss_r)
    for a, b in zip(grads_s, grads_r):
        torch.testing.assert_close(a, b)


def test_each_token_goes_through_its_prototype_layer_once() -> None:
    # The pairs of one student view are merged: the student's prototype layer sees every student token
    # once (not once per teacher view) and the teacher's every teacher token once, whatever the pairs.
    student_z, teacher_z = _views(18)
    seen = {"student": 0, "teacher": 0}

    def counting(module: nn.Module, name: str) -> nn.Module:
        module.register_forward_hook(lambda m, args, out: seen.__setitem__(name, seen[name] + args[0].shape[0]))
        return module

    student_last, teacher_last = counting(_last(19), "student"), counting(_last(20), "teacher")
    matches = _geometric_matches(21)  # 6 pairs: locals have two teachers, each global the other one
    loss, _ = LocalDistillationLoss(K, chunk_tokens=5, recompute_above_mib=1.0)(
        student_z, teacher_z, student_last, teacher_last, matches, TT)
    assert seen == {"student": B * sum(r * c for r, c in GRIDS), "teacher": B * 2 * 9}
    pair_tokens = sum(B * GRIDS[s][0] * GRIDS[s][1] for _, s in matches)
    assert pair_tokens > seen["student"]  # what one pass per pair would have cost
    loss.backward()
