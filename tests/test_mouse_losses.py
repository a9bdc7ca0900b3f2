"""mouse_vision/losses.py: every formula against a direct numpy / loop computation on a tiny batch, the memory
bank and queue bookkeeping, and a few optimisation steps of every objective lowering its loss."""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from mouse_vision import losses
from mouse_vision.losses import LOSSES, build_objective


def rng(seed=0):
    return torch.Generator().manual_seed(seed)


def test_ir_nce_matches_numpy():
    g = rng()
    bank = torch.nn.functional.normalize(torch.randn(50, 16, generator=g), dim=1)
    v = torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=1)
    index, noise = torch.tensor([3, 7, 11, 49]), torch.randint(0, 50, (4, 6), generator=g)
    tau, Z = 0.07, 2876934.2 / 1281167 * 50
    got = losses.ir_nce_loss(v, bank, index, noise, tau, Z).item()
    B, V, N, m, eps = bank.double().numpy(), v.double().numpy(), 50, 6, 1e-7
    total = 0.0
    for b in range(4):
        pd = np.exp(V[b] @ B[index[b]] / tau) / Z
        total += np.log(pd / (pd + m / N + eps))
        for j in noise[b].tolist():
            pn = np.exp(V[b] @ B[j] / tau) / Z
            total += np.log((m / N) / (pn + m / N + eps))
    assert got == pytest.approx(-total / 4, rel=1e-5)


def test_ir_bank_init_update_and_nearest_entry():
    torch.manual_seed(0)
    ir = losses.InstanceRecognition(8, n_data=50, dim=16)
    assert torch.allclose(ir.bank.norm(dim=1), torch.ones(50), atol=1e-6)
    assert ir.Z == pytest.approx(2876934.2 / 1281167 * 50)  # the release's normaliser scaled to N = 50 rows
    old = ir.bank.clone()
    v = torch.nn.functional.normalize(torch.randn(2, 16), dim=1)
    ir._pending = (v, torch.tensor([5, 9]))
    ir.after_step()
    expect = torch.nn.functional.normalize(0.5 * old[[5, 9]] + 0.5 * v, dim=1)
    assert torch.allclose(ir.bank[[5, 9]], expect, atol=1e-6)
    assert torch.equal(ir.bank[:5], old[:5])  # other rows untouched
    # the nearest-bank monitor: with the bank equal to the embeddings every image finds itself
    assert torch.equal((ir.bank @ ir.bank.t()).argmax(1), torch.arange(50))


def test_nt_xent_matches_a_loop():
    z = torch.randn(6, 5, generator=rng(1))
    tau = 0.1
    zn = (z / z.norm(dim=1, keepdim=True)).double().numpy()
    total = 0.0
    for i in range(6):
        partner = i + 1 if i % 2 == 0 else i - 1
        sims = {j: zn[i] @ zn[j] / tau for j in range(6) if j != i}
        total += -sims[partner] + np.log(sum(np.exp(s) for s in sims.values()))
    assert losses.nt_xent(z, tau).item() == pytest.approx(total / 6, rel=1e-5)


def test_simsiam_minus_one_and_stop_gradient():
    p = torch.randn(4, 8, requires_grad=True)
    z = p.detach().clone().requires_grad_(True)
    loss = losses.simsiam_loss(p, p, z, z)
    assert loss.item() == pytest.approx(-1.0, abs=1e-6)
    loss.backward()
    assert z.grad is None or torch.all(z.grad == 0)  # stop-gradient on the targets


def _standardise_np(z):
    return (z - z.mean(0)) / np.sqrt(z.var(0) + 1e-5)


def test_barlow_matches_numpy():
    z1, z2 = torch.randn(8, 4, generator=rng(2)), torch.randn(8, 4, generator=rng(3))
    c = _standardise_np(z1.double().numpy()).T @ _standardise_np(z2.double().numpy()) / 8
    off = c - np.diag(np.diag(c))
    expect = ((np.diag(c) - 1) ** 2).sum() + 0.0051 * (off ** 2).sum()
    assert losses.barlow_loss(z1, z2).item() == pytest.approx(expect, rel=1e-4)
    c16 = c * 8 / 16  # --loss_batch_divisor 16 (slug fixed-batch-divisor)
    expect16 = ((np.diag(c16) - 1) ** 2).sum() + 0.0051 * ((c16 - np.diag(np.diag(c16))) ** 2).sum()
    assert losses.barlow_loss(z1, z2, divisor=16).item() == pytest.approx(expect16, rel=1e-4)


def test_vicreg_matches_numpy():
    x, y = torch.randn(8, 5, generator=rng(4)) * 0.5, torch.randn(8, 5, generator=rng(5)) * 2
    X, Y = x.double().numpy(), y.double().numpy()
    mse = ((X - Y) ** 2).mean()
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    std = lambda a: np.sqrt(a.var(0, ddof=1) + 1e-4)  # noqa: E731
    std_loss = np.maximum(0, 1 - std(Xc)).mean() / 2 + np.maximum(0, 1 - std(Yc)).mean() / 2
    cov = lambda a: a.T @ a / 7  # noqa: E731
    off = lambda c: (c ** 2).sum() - (np.diag(c) ** 2).sum()  # noqa: E731
    expect = 25 * mse + 25 * std_loss + (off(cov(Xc)) + off(cov(Yc))) / 5
    assert losses.vicreg_loss(x, y).item() == pytest.approx(expect, rel=1e-5)


class Tiny(nn.Module):
    """A small conv backbone standing in for the mouse models (objectives only need output_dim)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1),
                                 nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 32))
        self.output_dim = 32

    def forward(self, x):
        return self.net(x)


def test_moco_queue_order_and_momentum_encoder():
    torch.manual_seed(0)
    moco = losses.MoCoV2(Tiny(), 32, hidden=16, dim=4, queue_size=8)
    k1, k2 = torch.full((3, 4), 1.0), torch.full((3, 4), 2.0)
    moco.enqueue(k1)
    moco.enqueue(k2)
    assert int(moco.queue_ptr) == 6 and torch.equal(moco.queue[:3], k1) and torch.equal(moco.queue[3:6], k2)
    moco.enqueue(torch.full((3, 4), 3.0))  # wraps around: rows 6, 7, 0
    assert int(moco.queue_ptr) == 1 and moco.queue[0, 0] == 3 and moco.queue[7, 0] == 3 and moco.queue[1, 0] == 1
    backbone = Tiny()
    with torch.no_grad():
        for p in backbone.parameters():
            p.fill_(1.0)
    key_before = [p.clone() for p in moco.key_backbone.parameters()]
    moco.momentum_update(backbone)
    for before, after in zip(key_before, moco.key_backbone.parameters()):
        assert torch.allclose(after, 0.999 * before + 0.001)


SMALL = {"ir": dict(n_noise=16), "simclr": dict(hidden=32), "simsiam": dict(dim=32, pred_dim=8),
         "mocov2": dict(hidden=32, queue_size=64), "barlow": dict(dims=(32, 32, 32)), "vicreg": dict(dims=(32, 32, 32)),
         "relloc": dict(hidden=32, crop=64, jitter=21), "ae": dict(size=32), "depth": dict(size=32), "rotnet": {},
         "supervised": {}}


@pytest.mark.parametrize("name", LOSSES)
def test_a_few_steps_lower_every_loss(name):
    torch.manual_seed(0)
    backbone = Tiny()
    obj = build_objective(name, backbone, n_data=16, n_classes=4, **SMALL[name])
    px = 64 if name == "relloc" else 32  # the tiny backbone takes any size; RelLoc cuts 3 × 3 patches from 64 px
    x = [torch.randn(16, 3, px, px, generator=rng(10 + i)) for i in range(obj.n_views)]
    labels = torch.rand(16, 1, px, px) if name == "depth" else torch.arange(16) % 4
    index = torch.arange(16)
    params = [p for p in list(backbone.parameters()) + list(obj.parameters()) if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    if name == "mocov2":  # negatives = the other images' keys (a random queue is too easy to learn anything)
        with torch.no_grad():
            k = obj.keys(x[1])
            obj.queue.copy_(torch.cat([k.roll(r, 0) for r in (1, 2, 3, 4)]))
    frozen = {k: v.clone() for k, v in obj.named_buffers() if k in ("queue", "queue_ptr")}

    def measure():
        state = copy.deepcopy(obj.state_dict())
        torch.manual_seed(123)  # same noise draws / patches / dropout each time
        loss = obj(backbone, x, labels, index)[0].item()
        obj.load_state_dict(state)  # measuring must not move the queue
        obj._pending = None
        return loss

    first = measure()
    for _ in range(8):
        torch.manual_seed(123)  # the draws measured (RelLoc's patches on noise images are learnable only as a set)
        loss, _ = obj(backbone, x, labels, index)
        opt.zero_grad()
        loss.backward()
        opt.step()
        # IR's bank stays put here: with N = 16 every image is in every batch's noise, and a bank filled with
        # (still similar) embeddings raises the NCE value; the update itself is tested above
        obj._pending = None
        if frozen:  # MoCo: enqueuing this batch's keys would make its own positives negatives
            obj.queue.copy_(frozen["queue"])
            obj.queue_ptr.copy_(frozen["queue_ptr"])
    assert measure() < first, name


def test_gathers_are_identities_in_one_process():
    x = torch.randn(3, 2, requires_grad=True)
    assert losses.world_size() == 1
    assert losses.gather_with_grad(x) is x and losses.all_reduce_with_grad(x) is x
    assert losses.concat_all_gather(x) is x


DDP_SCRIPT = r'''
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[2])
from mouse_vision import losses
dist.init_process_group("gloo")
r, W = dist.get_rank(), dist.get_world_size()
g = torch.Generator().manual_seed(0)
full = {"z": torch.randn(8, 5, generator=g), "a": torch.randn(8, 6, generator=g), "b": torch.randn(8, 6, generator=g)}
out = {}
# SimCLR: this rank's interleaved pairs (rows 4r..4r+3); VICReg / Barlow: this rank's half of the batch
z = full["z"][4 * r:4 * r + 4].clone().requires_grad_(True)
losses.nt_xent(losses.gather_with_grad(z), 0.1).backward()
out["simclr"] = z.grad / W  # DDP averages over processes
a, b = (full[k][4 * r:4 * r + 4].clone().requires_grad_(True) for k in "ab")
losses.vicreg_loss(a, b).backward()
out["vicreg"] = a.grad / W
a2, b2 = (full[k][4 * r:4 * r + 4].clone().requires_grad_(True) for k in "ab")
loss = losses.barlow_loss(a2, b2)
loss.backward()
out["barlow_loss"], out["barlow"] = loss.detach(), a2.grad / W
# IR: every process applies the gathered update to its whole bank
torch.manual_seed(0)
ir = losses.InstanceRecognition(3, n_data=10, dim=6)
ir._pending = (torch.nn.functional.normalize(full["a"][4 * r:4 * r + 4], dim=1), torch.arange(4 * r, 4 * r + 4))
ir.after_step()
out["bank"] = ir.bank
# MoCo: keys of both processes enqueued in rank order, the queue identical everywhere
torch.manual_seed(0)
bb = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 6), torch.nn.BatchNorm1d(6))
bb.output_dim = 6
moco = losses.MoCoV2(bb, 6, hidden=8, dim=4, queue_size=16)
x = torch.randn(8, 3, 2, 2, generator=torch.Generator().manual_seed(1))[4 * r:4 * r + 4]
moco(bb, [x, x], None, None)
out["queue"], out["ptr"] = moco.queue, moco.queue_ptr
torch.save(out, f"{sys.argv[1]}/rank{r}.pt")
dist.destroy_process_group()
'''


def test_gathered_losses_under_torchrun_equal_one_process(tmp_path, repo_root):
    """2 CPU processes (gloo): gradients of SimCLR / VICReg (gathered with gradients) and Barlow Twins (C summed
    over processes), after DDP's averaging, equal the one-process gradients on the whole batch."""
    import os
    import subprocess
    import sys

    script = tmp_path / "ddp_losses.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), str(tmp_path), str(repo_root)], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    g = torch.Generator().manual_seed(0)
    z, a, b = torch.randn(8, 5, generator=g), torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    z.requires_grad_(True)
    losses.nt_xent(z, 0.1).backward()
    assert torch.allclose(torch.cat([r["simclr"] for r in ranks]), z.grad, atol=1e-6)
    a1 = a.clone().requires_grad_(True)
    losses.vicreg_loss(a1, b).backward()
    assert torch.allclose(torch.cat([r["vicreg"] for r in ranks]), a1.grad, atol=1e-6)
    # Barlow: each process standardises its own half (per-process BN); C is summed over processes
    a2 = a.clone().requires_grad_(True)
    halves = [losses._standardise(a2[i:i + 4]).t() @ losses._standardise(b[i:i + 4]) for i in (0, 4)]
    c = (halves[0] + halves[1]) / 8
    ref = (torch.diagonal(c) - 1).pow(2).sum() + 0.0051 * losses.off_diagonal(c).pow(2).sum()
    ref.backward()
    assert ranks[0]["barlow_loss"].item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(torch.cat([r["barlow"] for r in ranks]), a2.grad, atol=1e-6)
    torch.manual_seed(0)
    ir = losses.InstanceRecognition(3, n_data=10, dim=6)
    ir.update_bank(torch.nn.functional.normalize(a, dim=1), torch.arange(8))
    assert torch.allclose(ranks[0]["bank"], ir.bank, atol=1e-6) and torch.equal(ranks[0]["bank"], ranks[1]["bank"])
    assert int(ranks[0]["ptr"]) == int(ranks[1]["ptr"]) == 8 and torch.equal(ranks[0]["queue"], ranks[1]["queue"])
