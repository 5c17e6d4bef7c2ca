"""DHN-NCE and the losses it is compared with: hand-computed cases, a brute-force double loop, the
last partial batch, and the loss gathered over 2 processes (torch.distributed, gloo)."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.nn.functional as F

from mcs_batch.train.dhn_nce import ContrastiveLoss, DHNNCELoss, LossKind, all_gather_with_grad

KINDS = [k.value for k in LossKind]


def brute_force(images, texts, *, kind: str, tau: float, beta1: float, beta2: float):
    """METHOD.md's formula term by term, in plain Python loops over torch scalars (float64)."""
    b = images.shape[0]
    positive_in_denominator = kind in ("infonce", "hn_nce")
    hard = kind in ("dhn_nce", "hn_nce")
    s = images @ texts.T

    def direction(sim, beta):
        total = 0.0
        for i in range(b):
            z = sum(torch.exp(beta * sim[i, j] / tau) for j in range(b) if j != i)
            denominator = torch.exp(sim[i, i] / tau) if positive_in_denominator else 0.0
            for k in range(b):
                if k != i:
                    w = (b - 1) * torch.exp(beta * sim[i, k] / tau) / z if hard else 1.0
                    denominator = denominator + w * torch.exp(sim[i, k] / tau)
            total = total - torch.log(torch.exp(sim[i, i] / tau) / denominator)
        return total / b

    return direction(s, beta1) + direction(s.T, beta2)


def unit(rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float64), dim=-1)


def test_2x2_by_hand():
    # images e1, e2; texts (0.6, 0.8), (0, 1): s = [[0.6, 0], [0.8, 1]]. With B = 2 each row has one
    # negative, so w = 1 whatever beta, and the decoupled loss is -(1/2) sum_i (s_ii - s_ik) / tau.
    images, texts = unit([[1, 0], [0, 1]]), unit([[0.6, 0.8], [0, 1]])
    tau = 0.6
    v2t = -((0.6 - 0.0) + (1.0 - 0.8)) / (2 * tau)  # = -2/3
    t2v = -((0.6 - 0.8) + (1.0 - 0.0)) / (2 * tau)  # = -2/3
    for beta in (0.0, 0.15, 2.0):
        got = DHNNCELoss(temperature=tau, beta1=beta, beta2=beta)(images, texts)
        assert got.item() == pytest.approx(v2t + t2v, abs=1e-12) == pytest.approx(-4 / 3)
    # InfoNCE keeps the positive: row 0 of v2t is -log(e^(0.6/tau) / (e^(0.6/tau) + e^0)) = log(1 + e^-1)
    e = math.exp
    v2t = (math.log(1 + e(-1.0)) + math.log(1 + e((0.8 - 1.0) / tau))) / 2
    t2v = (math.log(1 + e((0.8 - 0.6) / tau)) + math.log(1 + e(-1.0 / tau))) / 2
    got = ContrastiveLoss("infonce", temperature=tau)(images, texts)
    assert got.item() == pytest.approx(v2t + t2v, abs=1e-12)


def test_3x3_by_hand():
    # images e1, e2, e3; texts are the columns of S = [[1, .6, 0], [0, .8, .6], [0, 0, .8]] (unit).
    images = unit([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    texts = unit([[1, 0, 0], [0.6, 0.8, 0], [0, 0.6, 0.8]])
    tau, b1, b2 = 0.5, 0.5, 1.0
    e = math.exp

    def row(pos, negs, beta):  # -log(e^(pos/tau) / sum_k w_k e^(neg_k/tau)), w_k = 2 e^(beta neg_k/tau) / Z
        z = sum(e(beta * n / tau) for n in negs)
        return -math.log(e(pos / tau) / sum(2 * e(beta * n / tau) / z * e(n / tau) for n in negs))

    v2t = (row(1.0, [0.6, 0.0], b1) + row(0.8, [0.0, 0.6], b1) + row(0.8, [0.0, 0.0], b1)) / 3
    t2v = (row(1.0, [0.0, 0.0], b2) + row(0.8, [0.6, 0.0], b2) + row(0.8, [0.0, 0.6], b2)) / 3
    got = DHNNCELoss(temperature=tau, beta1=b1, beta2=b2)(images, texts)
    assert got.item() == pytest.approx(v2t + t2v, abs=1e-12)
    # a row whose negatives are equal gets weights 1: row 3 of v2t is -log(e^(0.8/tau) / (e^0 + e^0))
    assert row(0.8, [0.0, 0.0], b1) == pytest.approx(-0.8 / tau + math.log(2))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("b", [2, 3, 7])
def test_matches_brute_force_values_and_gradients(kind, b):
    g = torch.Generator().manual_seed(b)
    images = F.normalize(torch.randn(b, 8, generator=g, dtype=torch.float64), dim=-1).requires_grad_(True)
    texts = F.normalize(torch.randn(b, 8, generator=g, dtype=torch.float64), dim=-1).requires_grad_(True)
    tau, beta1, beta2 = 0.6, 0.15, 0.4
    got = ContrastiveLoss(kind, temperature=tau, beta1=beta1, beta2=beta2)(images, texts)
    want = brute_force(images, texts, kind=kind, tau=tau, beta1=beta1, beta2=beta2)
    assert got.item() == pytest.approx(want.item(), rel=1e-10, abs=1e-12)
    grad_got = torch.autograd.grad(got, (images, texts))
    grad_want = torch.autograd.grad(want, (images, texts))
    for a, w in zip(grad_got, grad_want, strict=True):
        torch.testing.assert_close(a, w, rtol=1e-9, atol=1e-12)


def test_weights_are_one_when_beta_is_zero():
    g = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(6, 16, generator=g, dtype=torch.float64), dim=-1)
    texts = F.normalize(torch.randn(6, 16, generator=g, dtype=torch.float64), dim=-1)
    # beta 0: DHN-NCE is DCL (no weighting) and HN-NCE is InfoNCE, exactly
    assert DHNNCELoss(beta1=0.0, beta2=0.0)(images, texts).item() == pytest.approx(
        ContrastiveLoss("dcl")(images, texts).item(), rel=1e-12
    )
    assert ContrastiveLoss("hn_nce", beta1=0.0, beta2=0.0)(images, texts).item() == pytest.approx(
        ContrastiveLoss("infonce")(images, texts).item(), rel=1e-12
    )
    # and beta > 0 changes the value (the weights are not all 1 on random embeddings)
    assert DHNNCELoss()(images, texts).item() != pytest.approx(ContrastiveLoss("dcl")(images, texts).item())


def test_partial_last_batch_uses_its_own_size():
    # a set of 7 pairs in batches of 4: the last batch has 3 pairs and B = 3 in its formula
    g = torch.Generator().manual_seed(3)
    images = F.normalize(torch.randn(7, 8, generator=g, dtype=torch.float64), dim=-1)
    texts = F.normalize(torch.randn(7, 8, generator=g, dtype=torch.float64), dim=-1)
    loss = DHNNCELoss()
    last = loss(images[4:], texts[4:])
    assert last.item() == pytest.approx(brute_force(images[4:], texts[4:], kind="dhn_nce", tau=0.6, beta1=0.15,
                                                    beta2=0.15).item(), rel=1e-10)  # fmt: skip
    # the (B - 1) factor matters: padding the batch to 4 with a copy would give another value
    padded = loss(torch.cat([images[4:], images[4:5]]), torch.cat([texts[4:], texts[4:5]]))
    assert padded.item() != pytest.approx(last.item())


def test_a_batch_of_one_pair_is_refused_and_bad_settings_too():
    x = F.normalize(torch.randn(1, 4), dim=-1)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        DHNNCELoss()(x, x)
    with pytest.raises(ValueError, match="one shape"):
        DHNNCELoss()(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="temperature"):
        DHNNCELoss(temperature=0.0)
    with pytest.raises(ValueError, match="unknown loss"):
        ContrastiveLoss("triplet")


def test_stable_for_confident_embeddings_at_low_temperature():
    images = unit([[1, 0, 0], [0, 1, 0], [0, 0, 1]]).float()
    loss = DHNNCELoss(temperature=0.01, beta1=5.0, beta2=5.0)(images, images)
    # both negatives of every row have s = 0: L = 2 * (-(1 / tau) + log(B - 1))
    assert torch.isfinite(loss) and loss.item() == pytest.approx(2 * (-1.0 / 0.01 + math.log(2)), rel=1e-5)


def test_without_a_process_group_gather_is_the_identity():
    x = torch.randn(3, 4)
    assert all_gather_with_grad(x) is x


# -- 2 processes -------------------------------------------------------------------------------------

SPLIT = (3, 2)  # uneven shares of a global batch of 5 (a last partial batch)


def _global_batch():
    g = torch.Generator().manual_seed(11)
    inputs = torch.randn(sum(SPLIT), 6, generator=g, dtype=torch.float64)
    texts = F.normalize(torch.randn(sum(SPLIT), 4, generator=g, dtype=torch.float64), dim=-1)
    layer = torch.nn.Linear(6, 4, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(4, 6, generator=g, dtype=torch.float64))
        layer.bias.copy_(torch.randn(4, generator=g, dtype=torch.float64))
    return inputs, texts, layer


def _worker(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        inputs, texts, layer = _global_batch()
        lo, hi = sum(SPLIT[:rank]), sum(SPLIT[: rank + 1])
        images = F.normalize(layer(inputs[lo:hi]), dim=-1)  # this worker's share, through a shared model
        loss = DHNNCELoss(beta1=0.3, beta2=0.1)(images, texts[lo:hi])
        loss.backward()
        for p in layer.parameters():  # what DDP does: average the gradients over the workers
            dist.all_reduce(p.grad)
            p.grad /= world
        queue.put((rank, loss.item(), layer.weight.grad.tolist(), layer.bias.grad.tolist()))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gathered_loss_on_2_processes_equals_the_single_process_loss():
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    queue = context.Queue()
    port = _free_port()
    procs = [context.Process(target=_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    inputs, texts, layer = _global_batch()
    loss = DHNNCELoss(beta1=0.3, beta2=0.1, gather=False)(F.normalize(layer(inputs), dim=-1), texts)
    loss.backward()
    for _, value, weight_grad, bias_grad in results:
        assert value == pytest.approx(loss.item(), rel=1e-12)  # every worker has the global loss
        torch.testing.assert_close(
            torch.tensor(weight_grad, dtype=torch.float64), layer.weight.grad, rtol=1e-10, atol=1e-12
        )
        torch.testing.assert_close(
            torch.tensor(bias_grad, dtype=torch.float64), layer.bias.grad, rtol=1e-10, atol=1e-12
        )
