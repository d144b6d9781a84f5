"""Local distillation loss (docs/algorithms.md §3) against an independent naive re-computation, its memory
plan, its low-precision path against float32, and EsViT similarity matching (§2)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from glsd_cli.geometry import match_geometric
from glsd_cli.losses.local import LocalDistillationLoss, plan_chunks
from glsd_cli.matching import TokenMatches, match_similarity

D, K = 8, 16
GRIDS = [(3, 3), (3, 3), (2, 2), (2, 2)]  # 2 global views, 2 local views
SIZES = [r * c for r, c in GRIDS]
B = 2
ST, TT = 0.1, 0.04


def _last(seed: int, bias: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    return weight_norm(nn.Linear(D, K, bias=bias))


def _views(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Student tokens (B, N, D) of all views and teacher tokens (B, 2*9, D) of the globals, as leaves."""
    g = torch.Generator().manual_seed(seed)
    student = F.normalize(torch.randn(B, sum(SIZES), D, generator=g), dim=-1).requires_grad_()
    # requires_grad on the teacher too, to prove that the loss sends it nothing
    teacher = F.normalize(torch.randn(B, 2 * 9, D, generator=g), dim=-1).requires_grad_()
    return student, teacher


def _geometric_pairs(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    sizes = [100, 100, 40, 40]
    boxes = [torch.cat((torch.randint(0, 80, (B, 2), generator=g), torch.full((B, 2), s)), 1).double() for s in sizes]
    flips = [torch.rand(B, generator=g) < 0.5 for _ in sizes]
    return {(t, s): match_geometric(boxes[s], flips[s], GRIDS[s], boxes[t], flips[t], GRIDS[t])
            for t in range(2) for s in range(4) if s != t}


def _random_pairs(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {(t, s): (torch.randint(0, 9, (B, SIZES[s]), generator=g), None)
            for t in range(2) for s in range(4) if s != t}


def _table(pairs: dict) -> TokenMatches:
    return TokenMatches.from_pairs(pairs, SIZES, 2)


def _naive(student, teacher, student_last, teacher_last, pairs, center, tt=TT, st=ST) -> torch.Tensor:
    """Straight from the formula: loop over pairs, images and tokens, one token at a time."""
    student_z, teacher_z = student.split(SIZES, 1), teacher.split(9, 1)
    pair_losses = []
    for (t, s), (index, valid) in pairs.items():
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


@pytest.mark.parametrize("targets", ["gather", "through_prototypes", "general_layer"])
@pytest.mark.parametrize("chunk", [5, None, 10**9], ids=["small_chunks", "auto", "one_chunk"])
@pytest.mark.parametrize("pairs_fn", [_geometric_pairs, _random_pairs], ids=["geometric", "no_mask"])
def test_loss_and_gradients_match_naive(pairs_fn, chunk, targets) -> None:
    # The two ways to a bias-free prototype layer's (DINO's) targets: a gathered row per student token
    # (the CPU's) or through the prototypes (an accelerator's); any other layer gathers.
    bias = targets == "general_layer"
    student_z, teacher_z = _views(0)
    student_last, teacher_last = _last(1, bias), _last(2, bias)
    pairs = pairs_fn(3)
    # 5 < one image's 26 tokens: a chunk per image; 10**9: the whole batch in one chunk (a GPU's plan).
    loss_fn = LocalDistillationLoss(K, student_temp=ST, chunk_tokens=chunk,
                                    targets_through_prototypes=targets == "through_prototypes")
    loss_fn.center.copy_(torch.randn(1, K) * 0.3)

    loss, metrics = loss_fn(student_z, teacher_z, student_last, teacher_last, _table(pairs), TT)
    kept = metrics["local_valid_fraction"]
    loss.backward()
    got = _grads([student_z], student_last)
    ref = _naive(student_z, teacher_z, student_last, teacher_last, pairs, loss_fn.center)
    ref.backward()
    want = _grads([student_z], student_last)

    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert len(got) == len(want) == 1 + 2 + bias  # the student tokens + weight_norm's g and v (+ bias)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # The teacher gets nothing.
    assert teacher_z.grad is None
    assert all(p.grad is None for p in teacher_last.parameters())

    masks = [v for _, v in pairs.values()]
    if masks[0] is None:
        assert kept.item() == pytest.approx(1.0)
    else:
        expected = sum(float(v.float().mean()) for v in masks) / len(masks)
        assert kept.item() == pytest.approx(expected)
        assert 0.0 < expected < 1.0  # the fixture really exercises the hinge


@pytest.mark.parametrize("chunk", [1, 27, 52, 10_000, None])  # None: auto (16 MiB)
def test_chunk_size_does_not_change_the_loss(chunk: int) -> None:
    student_z, teacher_z = _views(4)
    student_last, teacher_last = _last(5), _last(6)
    matches = _table(_geometric_pairs(7))
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
    matches = _table(_geometric_pairs(11))
    loss_fn = LocalDistillationLoss(K, chunk_tokens=4, recompute_above_mib=recompute_above_mib)
    loss, _ = loss_fn(student_z, teacher_z, student_last, teacher_last, matches, TT)
    loss.backward()
    want = _grads([student_z], student_last)
    loss, _ = loss_fn(student_z, teacher_z, student_last, teacher_last, matches, TT)
    loss_fn.center.add_(5.0 * torch.randn(1, K))
    loss.backward()
    for a, b in zip(_grads([student_z], student_last), want):
        torch.testing.assert_close(a, b)


def test_checkpointing_does_not_keep_logits() -> None:
    # Count the bytes autograd saves for backward outside the checkpointed chunks: with K = 4096
    # the full student logits of one pair would be 2 * 64 * 4096 * 4 B = 2 MiB.
    k, n = 4096, 64
    student = torch.randn(2, 2 * n, D, requires_grad=True)
    teacher = torch.randn(2, 2 * n, D)
    last_s, last_t = weight_norm(nn.Linear(D, k, bias=False)), weight_norm(nn.Linear(D, k, bias=False))
    idx = torch.randint(0, n, (2, n))
    matches = TokenMatches.from_pairs({(0, 1): (idx, None), (1, 0): (idx, torch.rand(2, n) < 0.5)}, [n, n], 2)
    saved: list[int] = []

    def pack(x: torch.Tensor) -> torch.Tensor:
        saved.append(x.numel() * x.element_size())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        # A chunk (one image) has 128 x 4096 x 4 B = 2 MiB of logits: above 0.1 MiB they are recomputed.
        loss, _ = LocalDistillationLoss(k, chunk_tokens=16, recompute_above_mib=0.1)(
            student, teacher, last_s, last_t, matches, TT)
    loss.backward()
    assert sum(saved) < 2 * n * k * 4 / 8
    assert student.grad is not None and last_s.parametrizations.weight.original1.grad is not None


@pytest.mark.parametrize("through_prototypes", [False, True])
@pytest.mark.parametrize("centering", ["ema", "sinkhorn"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_path_stays_close_to_float32(dtype, centering, through_prototypes) -> None:
    # Under autocast the K-wide buffers are in the autocast dtype; the loss value and its gradient must
    # stay within rounding of that dtype of the float32 computation (the reference above).
    k = 512
    g = torch.Generator().manual_seed(12)
    student = F.normalize(torch.randn(B, sum(SIZES), D, generator=g), dim=-1).requires_grad_()
    teacher = F.normalize(torch.randn(B, 18, D, generator=g), dim=-1)
    torch.manual_seed(13)
    last_s, last_t = weight_norm(nn.Linear(D, k, bias=False)), weight_norm(nn.Linear(D, k, bias=False))
    matches = _table(_geometric_pairs(15))
    loss_fn = LocalDistillationLoss(k, chunk_tokens=10**9, centering=centering,
                                    targets_through_prototypes=through_prototypes)
    loss_fn.center.copy_(torch.randn(1, k) * 0.05)
    ref, _ = loss_fn(student, teacher, last_s, last_t, matches, TT)
    ref.backward()
    want = student.grad.clone()
    student.grad = None
    with torch.autocast("cpu", dtype=dtype):
        got, _ = loss_fn(student, teacher, last_s, last_t, matches, TT)
    got.backward()
    assert got.dtype == torch.float32 and got.item() == pytest.approx(ref.item(), rel=1e-2)
    cosine = F.cosine_similarity(student.grad.flatten(), want.flatten(), dim=0)
    assert cosine > 0.999 and student.grad.norm() == pytest.approx(want.norm().item(), rel=2e-2)


def test_memory_plan_follows_the_device() -> None:
    k, student_rows, teacher_rows = 8192, 680, 392  # ViT-S/16 shapes
    # CPU: 16 MiB of float32 logits per chunk (at least one image), kept for backward.
    cpu = plan_chunks(128, student_rows, teacher_rows, k, 4, free_bytes=None)
    assert cpu.images == 1 and not cpu.recompute
    # A GPU with 60 GiB free: the whole batch of 128 images in one chunk, kept (bf16 buffers).
    gpu = plan_chunks(128, student_rows, teacher_rows, k, 2, free_bytes=60 * 2**30)
    assert gpu.images == 128 and not gpu.recompute
    # 10 GiB free: a quarter holds 2.5 GiB of buffers per chunk; keeping every chunk's student softmax
    # and teacher targets (2.1 GiB) still fits.
    small = plan_chunks(128, student_rows, teacher_rows, k, 2, free_bytes=10 * 2**30)
    per_image = k * 2 * (4 * student_rows + 2 * teacher_rows)
    assert small.images == int(2.5 * 2**30) // per_image and not small.recompute
    # 4 GiB free: keeping them all would take over a quarter: recompute.
    assert plan_chunks(128, student_rows, teacher_rows, k, 2, free_bytes=4 * 2**30).recompute
    # Settings win over the device's budget.
    forced = plan_chunks(128, student_rows, teacher_rows, k, 2, free_bytes=60 * 2**30, chunk_tokens=10 * 680,
                         recompute_above_mib=0)
    assert forced == type(forced)(10, True)


def test_input_errors() -> None:
    student_z, teacher_z = _views(16)
    loss_fn = LocalDistillationLoss(K)
    with pytest.raises(ValueError):  # every pair must be given
        TokenMatches.from_pairs({(0, 2): (torch.zeros(B, 4, dtype=torch.long), None)}, SIZES, 2)
    with pytest.raises(ValueError):  # a table for other views
        loss_fn(student_z[:, :-1], teacher_z, _last(1), _last(2), _table(_random_pairs(0)), TT)


# --------------------------------------------------------------------------- update_center


def _naive_center(center, teacher_z, teacher_last, m) -> torch.Tensor:
    with torch.no_grad():
        logits = torch.cat([teacher_last(teacher_z[b, i]).reshape(1, -1)
                            for b in range(teacher_z.shape[0]) for i in range(teacher_z.shape[1])])
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
    assert all(p.grad is None for p in last.parameters()) and teacher_z.grad is None


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
            student_z, teacher_z, student_last, teacher_last, _table(_geometric_pairs(15)), TT)
        loss.backward()
        results.append((loss.detach(), _grads([student_z], student_last), len(calls)))
    (loss_r, grads_r, n_r), (loss_s, grads_s, n_s) = results
    assert n_r > 0 and n_s == 0  # the threshold really switches the path
    torch.testing.assert_close(loss_s, loss_r)
    for a, b in zip(grads_s, grads_r):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("through_prototypes", [False, True])
@pytest.mark.parametrize("chunk", [5, 10**9])
def test_each_token_goes_through_its_prototype_layer_once(chunk, through_prototypes) -> None:
    # The pairs of one student token are merged: the student's prototype layer sees every student token
    # once (not once per teacher view), whatever the pairs, and every teacher token passes the prototypes
    # once, or twice when its target is taken back through them (no student-sized target table).
    # Counted in matrix-product FLOPs of the forward pass: 2 * D * K per token through a prototype layer.
    from torch.utils.flop_counter import FlopCounterMode

    student_z, teacher_z = _views(18)
    pairs = _geometric_pairs(21)  # 6 pairs: locals have two teachers, each global the other one
    with FlopCounterMode(display=False) as counter:
        LocalDistillationLoss(K, chunk_tokens=chunk, targets_through_prototypes=through_prototypes)(
            student_z, teacher_z, _last(19), _last(20), _table(pairs), TT)
    tokens = counter.get_total_flops() / (2 * D * K)
    assert tokens == B * sum(SIZES) + (1 + through_prototypes) * B * 2 * 9
    pair_tokens = sum(B * SIZES[s] for _, s in pairs)
    assert pair_tokens > B * sum(SIZES)  # what one pass per pair would have cost the student alone



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_target_gather_is_the_weighted_sum_of_teacher_rows(dtype) -> None:
    import glsd_cli.losses.local as local

    g = torch.Generator().manual_seed(30)
    probs = torch.softmax(torch.randn(20, K, generator=g), -1).to(dtype)
    rows = torch.randint(0, 20, (33, 2), generator=g)
    weights = torch.rand(33, 2, generator=g).to(dtype)
    want = (probs.double()[rows] * weights.double()[..., None]).sum(1)
    got = local.gather_targets(probs, rows, weights)
    torch.testing.assert_close(got.double(), want, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)


def _naive_sinkhorn(logits: torch.Tensor, temp: float, iterations: int = 3) -> torch.Tensor:
    """DINOv2's `sinkhorn_knopp_teacher` in the probability domain and float64: prototypes' masses to
    1/K, tokens' to 1/N, `iterations` times, then every token a distribution."""
    q = torch.exp(logits.double() / temp).t()  # (K, N)
    q /= q.sum()
    n_protos, n_tokens = q.shape
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True) * n_protos
        q /= q.sum(dim=0, keepdim=True) * n_tokens
    return (q * n_tokens).t()


@pytest.mark.parametrize("through_prototypes", [False, True])
@pytest.mark.parametrize("chunk, recompute", [(5, 0.0), (5, None), (None, None), (10**9, None)],
                         ids=["per_image_recomputed", "per_image_kept", "auto", "one_chunk"])
def test_sinkhorn_targets_match_naive(chunk, recompute, through_prototypes) -> None:
    """centering="sinkhorn": every teacher token's target is balanced over ALL teacher tokens of the
    batch (not per chunk), whatever the chunking; loss and gradients as the direct formula."""
    student_z, teacher_z = _views(8)
    student_last, teacher_last = _last(9), _last(10)
    pairs = _geometric_pairs(11)
    loss_fn = LocalDistillationLoss(K, student_temp=ST, chunk_tokens=chunk, recompute_above_mib=recompute,
                                    centering="sinkhorn", targets_through_prototypes=through_prototypes)
    loss, _ = loss_fn(student_z, teacher_z, student_last, teacher_last, _table(pairs), TT)
    loss.backward()
    got = _grads([student_z], student_last)

    with torch.no_grad():
        logits = teacher_last(teacher_z.reshape(-1, D))
        table = _naive_sinkhorn(logits, TT).float().reshape(B, 2 * 9, K)
    # The prototypes' masses over the batch's teacher tokens are far more even than softmax's (3
    # iterations do not balance them exactly).
    assert table.sum((0, 1)).std() < 0.5 * F.softmax(logits / TT, -1).sum(0).std()
    student_parts = student_z.split(SIZES, 1)
    pair_losses = []
    for (t, s), (index, valid) in pairs.items():
        log_q = F.log_softmax(student_last(student_parts[s]) / ST, dim=-1)        # (B, N_s, K)
        target = torch.stack([table[b, t * 9 + index[b]] for b in range(B)])     # (B, N_s, K)
        ce = -(target * log_q).sum(-1) * (1.0 if valid is None else valid.float())
        pair_losses.append(ce.mean())  # masked tokens count as zero, as in the EMA formula
    ref = torch.stack(pair_losses).mean()
    ref.backward()
    want = _grads([student_z], student_last)

    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert teacher_z.grad is None
    centre = loss_fn.center.clone()
    loss_fn.update_center(teacher_z, teacher_last)  # no centre to move
    assert torch.equal(loss_fn.center, centre)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run by bench/gpu_session.sh)")
@pytest.mark.parametrize("centering", ["ema", "sinkhorn"])
def test_on_a_gpu_under_bf16_the_loss_and_gradients_follow_the_cpu(centering) -> None:
    """The GPU's default way (targets through the prototypes, one chunk, bf16) against the CPU's
    float32 loss and gradients."""
    k = 2048
    g = torch.Generator().manual_seed(40)
    student = F.normalize(torch.randn(B, sum(SIZES), D, generator=g), dim=-1)
    teacher = F.normalize(torch.randn(B, 18, D, generator=g), dim=-1)
    matches = _table(_geometric_pairs(41))
    results = []
    for device, dtype in ((torch.device("cpu"), None), (torch.device("cuda"), torch.bfloat16)):
        torch.manual_seed(42)
        last_s, last_t = (weight_norm(nn.Linear(D, k, bias=False)).to(device) for _ in range(2))
        s = student.to(device).clone().requires_grad_()  # a leaf of its own on each device
        m = TokenMatches(matches.index.to(device), matches.valid.to(device), matches.view_sizes)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss, _ = LocalDistillationLoss(k, centering=centering).to(device)(s, teacher.to(device), last_s, last_t, m, TT)
        loss.backward()
        results.append((loss.item(), s.grad.cpu()))
    (ref, want), (got, grad) = results
    assert got == pytest.approx(ref, rel=1e-2)
    assert F.cosine_similarity(grad.flatten(), want.flatten(), dim=0) > 0.999


@pytest.mark.parametrize("stats_rows", [2048, 7], ids=["every_token", "every_5th"])
@pytest.mark.parametrize("centering", ["ema", "sinkhorn"])
@pytest.mark.parametrize("chunk, recompute", [(5, 0.0), (10**9, None)], ids=["per_image_recomputed", "one_chunk"])
def test_dense_collapse_statistics_cover_the_teacher_tokens(centering, chunk, recompute, stats_rows,
                                                                  monkeypatch) -> None:
    """The dense head's collapse statistics are those of its targets over the B x 2 x 9 teacher tokens
    (every one, or every stride-th of the batch when there are more than STATS_ROWS), whatever the
    chunking and with checkpointed chunks."""
    import glsd_cli.losses.local as local
    from glsd_cli.engine.monitors import collapse_stats

    monkeypatch.setattr(local, "STATS_ROWS", stats_rows)
    stride = max(1, B * 18 // stats_rows)

    student_z, teacher_z = _views(50)
    student_last, teacher_last = _last(51), _last(52)
    loss_fn = LocalDistillationLoss(K, chunk_tokens=chunk, recompute_above_mib=recompute, centering=centering)
    loss_fn.center.copy_(torch.randn(1, K) * 0.3)
    loss, metrics = loss_fn(student_z, teacher_z, student_last, teacher_last, _table(_geometric_pairs(53)), TT)
    loss.backward()  # recomputes the chunks when they are checkpointed
    with torch.no_grad():
        logits = teacher_last(teacher_z.reshape(-1, D))
        targets = F.softmax((logits - loss_fn.center) / TT, -1) if centering == "ema" else _naive_sinkhorn(logits, TT)
    want = collapse_stats(targets.float()[::stride], "dense_")
    assert set(want) <= set(metrics)
    for key, value in want.items():
        assert metrics[key].item() == pytest.approx(value.item(), rel=1e-4, abs=1e-6)
