"""The training objectives of Nayebi, Kong et al. (PLOS CB 2023), each with its head and the release's
hyperparameters (neuroailab/mouse-vision `loss_functions/`), correct in one process and under torchrun.

An objective is an nn.Module called as `objective(backbone, views, labels, index) -> (loss, stats)`:
`views` is the list of augmented batches data.py produced (`objective.n_views` of them), `labels` the class
labels (depth maps for `depth`), `index` the dataset indices (the IR memory bank needs them). After the
optimizer step the training loop calls `objective.after_step()` (IR's memory-bank update).

Under DDP the objective sits inside the wrapped module with the backbone, so its heads' gradients are
averaged like the backbone's. Where the original gathers across processes (SimCLR, VICReg: embeddings with
their gradients; MoCo: keys for the queue and shuffle-BN; Barlow Twins: the cross-correlation matrix; IR:
embeddings and indices for the bank update) we do too; on one process every gather is a no-op, so the loss
equals the single-process formula (tests compare with numpy). The release called torch.distributed even on one
GPU (slug dist-required).
"""
from __future__ import annotations

import copy
import math
from collections import OrderedDict

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from common.runtime import UserError

# ----------------------------------------------------------------------------- distributed helpers


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x (same shape on every rank) over ranks, rank order; no gradient. Identity on one process."""
    if world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient of the gathered tensor and returns this rank's slice
    (SimCLR's GatherLayer / VICReg's FullGatherLayer). Every rank computes the same loss on the gathered batch,
    so after DDP averages the parameter gradients they equal the one-process gradient on the full batch."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        g = torch.stack(grads)
        dist.all_reduce(g)
        return g[dist.get_rank()]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    return x if world_size() == 1 else torch.cat(_GatherWithGrad.apply(x))


class _AllReduceWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g)
        return g


def all_reduce_with_grad(x: torch.Tensor) -> torch.Tensor:
    return x if world_size() == 1 else _AllReduceWithGrad.apply(x)


def fp32(t: torch.Tensor):
    """Leave autocast for the loss arithmetic: exp(s/τ) with τ = 0.07 and Gram matrices need fp32 precision."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def _linear_init(m: nn.Module, std: float) -> None:
    for mod in m.modules():
        if isinstance(mod, nn.Linear):
            nn.init.normal_(mod.weight, 0.0, std)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)


# ----------------------------------------------------------------------------- Instance Recognition


def ir_nce_loss(v, bank, index, noise_idx, tau: float, Z: float, eps: float = 1e-7):
    """Wu et al. (2018) eq. 5-8 with the release's constants: P(i|v) = exp(v·m_i/τ)/Z with a fixed Z;
    NCE against m noise samples from the uniform P_n = 1/N (the positive is not excluded):
    −[log P_d/(P_d + m/N + ε) + Σ_noise log (m/N)/(P_n + m/N + ε)], averaged over the batch."""
    n, m = bank.shape[0], noise_idx.shape[1]
    k = m / n  # m · P_n(i)
    with fp32(v):
        v, bank = v.float(), bank.float()
        p_d = torch.exp((v * bank[index]).sum(1) / tau) / Z
        p_n = torch.exp(torch.einsum("bd,bmd->bm", v, bank[noise_idx]) / tau) / Z
        return -(torch.log(p_d / (p_d + k + eps)) + torch.log(k / (p_n + k + eps)).sum(1)).mean()


class InstanceRecognition(nn.Module):
    """IR: Linear(backbone → 128), L2-normalised; memory bank N × 128 initialised U(±sqrt(3/128)) and normalised;
    τ = 0.07, m = 4096 uniform noise samples, fixed normaliser Z = 2876934.2/1281167 · N (the release's
    ImageNet value scaled to the dataset); after each step m_i ← normalise(0.5·m_i + 0.5·v_i)."""

    n_views = 1

    def __init__(self, in_dim: int, n_data: int, dim: int = 128, n_noise: int = 4096, tau: float = 0.07,
                 bank_momentum: float = 0.5, z_per_item: float = 2876934.2 / 1281167):
        super().__init__()
        self.head = nn.Linear(in_dim, dim)
        self.n_noise, self.tau, self.bank_momentum = n_noise, tau, bank_momentum
        self.Z = z_per_item * n_data
        stdv = math.sqrt(3.0 / dim)
        self.register_buffer("bank", F.normalize(torch.rand(n_data, dim).mul_(2 * stdv).add_(-stdv), dim=1))
        self._pending = None

    def embed(self, features):
        return F.normalize(self.head(features).float(), dim=1)

    def forward(self, backbone, views, labels, index):
        v = self.embed(backbone(views[0]))
        noise = torch.randint(0, self.bank.shape[0], (v.shape[0], self.n_noise), device=v.device)
        loss = ir_nce_loss(v, self.bank, index, noise, self.tau, self.Z)
        self._pending = (v.detach(), index)
        return loss, {}

    @torch.no_grad()
    def update_bank(self, v, index):
        new = F.normalize(self.bank_momentum * self.bank[index] + (1 - self.bank_momentum) * v, dim=1)
        self.bank.index_copy_(0, index, new)

    @torch.no_grad()
    def after_step(self):
        if self._pending is None:
            return
        v, index = self._pending
        self._pending = None
        self.update_bank(concat_all_gather(v), concat_all_gather(index))  # every rank keeps the whole bank


# ----------------------------------------------------------------------------- SimCLR


def nt_xent(z: torch.Tensor, tau: float) -> torch.Tensor:
    """NT-Xent (Chen et al. 2020 eq. 1) on 2N embeddings with the two views of image i at rows 2i, 2i+1: cosine
    similarities / τ, the row itself excluded, cross-entropy towards the partner, averaged over all 2N rows."""
    with fp32(z):
        z = F.normalize(z.float(), dim=1)
        sim = z @ z.t() / tau
        sim = sim.masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf"))
        target = torch.arange(len(z), device=z.device) ^ 1
        return F.cross_entropy(sim, target)


class SimCLR(nn.Module):
    """Neck fc0(no bias)-bn0-ReLU-fc1(no bias)-bn1, D → 2048 → 128, Linear init N(0, 0.01); NT-Xent τ = 0.1 over
    the embeddings of every process (gathered with gradients). The two views go through the backbone as one
    interleaved batch, as in the release."""

    n_views = 2

    def __init__(self, in_dim: int, hidden: int = 2048, dim: int = 128, tau: float = 0.1):
        super().__init__()
        self.neck = nn.Sequential(OrderedDict(fc0=nn.Linear(in_dim, hidden, bias=False), bn0=nn.BatchNorm1d(hidden),
                                              relu=nn.ReLU(inplace=True), fc1=nn.Linear(hidden, dim, bias=False),
                                              bn1=nn.BatchNorm1d(dim)))
        _linear_init(self.neck, 0.01)
        self.tau = tau

    def forward(self, backbone, views, labels, index):
        x = torch.stack(views, 1).flatten(0, 1)  # (2B, C, H, W): image i's views at 2i, 2i+1
        z = self.neck(backbone(x))
        return nt_xent(gather_with_grad(z.float()), self.tau), {}


# ----------------------------------------------------------------------------- SimSiam


def simsiam_loss(p1, p2, z1, z2):
    """½[D(p1, sg z2) + D(p2, sg z1)], D = −cosine similarity averaged over the batch (Chen & He 2021 eq. 4)."""
    d = lambda p, z: -F.cosine_similarity(p.float(), z.detach().float(), dim=1).mean()  # noqa: E731
    return 0.5 * (d(p1, z2) + d(p2, z1))


class SimSiam(nn.Module):
    """Projector 3 × [Linear-BN(-ReLU)] to 2048 (the last without ReLU), predictor 2048 → 512-BN-ReLU → 2048.
    Each view is its own backbone batch (BN statistics per view); no gathering."""

    n_views = 2

    def __init__(self, in_dim: int, dim: int = 2048, pred_dim: int = 512):
        super().__init__()
        self.projector = nn.Sequential(nn.Linear(in_dim, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
                                       nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
                                       nn.Linear(dim, dim), nn.BatchNorm1d(dim))
        self.predictor = nn.Sequential(nn.Linear(dim, pred_dim), nn.BatchNorm1d(pred_dim), nn.ReLU(inplace=True),
                                       nn.Linear(pred_dim, dim))

    def forward(self, backbone, views, labels, index):
        z1, z2 = self.projector(backbone(views[0])), self.projector(backbone(views[1]))
        return simsiam_loss(self.predictor(z1), self.predictor(z2), z1, z2), {}


# ----------------------------------------------------------------------------- MoCo v2


class MoCoV2(nn.Module):
    """Neck Linear-ReLU-Linear (D → 2048 → 128); key encoder = a momentum copy (0.999) of backbone + neck; queue of
    65,536 normalised keys; τ = 0.2; InfoNCE with the positive key at logit 0 (He et al. 2020, Chen et al. 2020b).
    Under torchrun the keys are computed with shuffle-BN (the key batch is permuted across processes, so BN
    statistics cannot leak which key belongs to which query) and every process's keys are enqueued in rank order.
    In one process there is nothing to shuffle across, and the keys are computed directly."""

    n_views = 2

    def __init__(self, backbone: nn.Module, in_dim: int, hidden: int = 2048, dim: int = 128, queue_size: int = 65536,
                 momentum: float = 0.999, tau: float = 0.2):
        super().__init__()
        self.neck = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))
        self.key_backbone = copy.deepcopy(backbone)
        self.key_neck = copy.deepcopy(self.neck)
        for p in list(self.key_backbone.parameters()) + list(self.key_neck.parameters()):
            p.requires_grad = False
        self.momentum, self.tau = momentum, tau
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def momentum_update(self, backbone):
        pairs = [(backbone, self.key_backbone), (self.neck, self.key_neck)]
        for q_mod, k_mod in pairs:
            for pq, pk in zip(q_mod.parameters(), k_mod.parameters()):
                pk.mul_(self.momentum).add_(pq.detach(), alpha=1 - self.momentum)

    @torch.no_grad()
    def keys(self, x):
        if world_size() == 1:
            return F.normalize(self.key_neck(self.key_backbone(x)).float(), dim=1)
        # shuffle-BN: a random permutation of the global key batch (rank 0's, broadcast), each rank encodes its
        # slice of the shuffled batch, then the keys are gathered and un-shuffled
        x_all = concat_all_gather(x)
        perm = torch.randperm(len(x_all), device=x.device)
        dist.broadcast(perm, 0)
        b, r = len(x), dist.get_rank()
        k = F.normalize(self.key_neck(self.key_backbone(x_all[perm[r * b:(r + 1) * b]])).float(), dim=1)
        gathered = concat_all_gather(k)  # row j = key of global image perm[j]
        k_all = torch.empty_like(gathered)
        k_all[perm] = gathered
        return k_all[r * b:(r + 1) * b]

    @torch.no_grad()
    def enqueue(self, k):
        k = concat_all_gather(k)
        n, size, ptr = len(k), len(self.queue), int(self.queue_ptr)
        idx = (ptr + torch.arange(n, device=k.device)) % size
        self.queue[idx] = k.to(self.queue.dtype)
        self.queue_ptr.fill_((ptr + n) % size)

    def forward(self, backbone, views, labels, index):
        q = F.normalize(self.neck(backbone(views[0])).float(), dim=1)
        self.momentum_update(backbone)
        k = self.keys(views[1])
        with fp32(q):
            logits = torch.cat([(q * k).sum(1, keepdim=True), q @ self.queue.clone().float().t()], 1) / self.tau
            loss = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))
        self.enqueue(k)
        return loss, {}


# ----------------------------------------------------------------------------- Barlow Twins and VICReg


def _standardise(z, eps=1e-5):
    """BatchNorm1d(affine=False) in training mode: per-feature (z − mean)/sqrt(biased var + eps)."""
    return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + eps)


def off_diagonal(c):
    n = c.shape[0]
    return c.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def barlow_loss(z1, z2, lambd: float = 0.0051, divisor: float | None = None):
    """Zbontar et al. (2021) eq. 1: C = BN(z1)ᵀ BN(z2) / batch (summed over processes),
    Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij². `divisor` defaults to the global batch size."""
    with fp32(z1):
        c = _standardise(z1.float()).t() @ _standardise(z2.float())
        divisor = divisor or len(z1) * world_size()
        c = all_reduce_with_grad(c) / divisor
        return (torch.diagonal(c) - 1).pow(2).sum() + lambd * off_diagonal(c).pow(2).sum()


def vicreg_loss(x, y, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0, divisor: float | None = None):
    """Bardes et al. (2022), as released: 25·MSE(x, y) + 25·(mean std-hinge of x + of y)/2 + 1·(off-diagonal
    cov² of x + of y)/num_features, std = sqrt(var + 1e-4), cov = centred xᵀx/(batch − 1), over the embeddings
    of every process (gathered with gradients). `divisor` (batch) defaults to the gathered batch size."""
    with fp32(x):
        return _vicreg(gather_with_grad(x.float()), gather_with_grad(y.float()), sim_coeff, std_coeff, cov_coeff, divisor)


def _vicreg(x, y, sim_coeff, std_coeff, cov_coeff, divisor):
    n = divisor or len(x)
    repr_loss = F.mse_loss(x, y)
    x, y = x - x.mean(0), y - y.mean(0)
    std_x, std_y = torch.sqrt(x.var(0) + 1e-4), torch.sqrt(y.var(0) + 1e-4)
    std_loss = F.relu(1 - std_x).mean() / 2 + F.relu(1 - std_y).mean() / 2
    cov_x, cov_y = x.t() @ x / (n - 1), y.t() @ y / (n - 1)
    f = x.shape[1]
    cov_loss = off_diagonal(cov_x).pow(2).sum() / f + off_diagonal(cov_y).pow(2).sum() / f
    return sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * cov_loss


def _projector(in_dim, dims, bias_hidden: bool, bias_last: bool):
    layers, prev = [], in_dim
    for i, d in enumerate(dims):
        last = i == len(dims) - 1
        layers.append(nn.Linear(prev, d, bias=bias_last if last else bias_hidden))
        if not last:
            layers += [nn.BatchNorm1d(d), nn.ReLU(inplace=True)]
        prev = d
    return nn.Sequential(*layers)


class BarlowTwins(nn.Module):
    """Projector 8192-8192-8192 without biases (BN-ReLU between), λ = 0.0051. Two asymmetric views, each its own
    backbone batch. The release divides C by the configured batch size (2048) whatever the actual batch; the kit
    divides by the actual global batch unless `divisor` is given (--loss_batch_divisor, slug fixed-batch-divisor)."""

    n_views = 2

    def __init__(self, in_dim: int, dims=(8192, 8192, 8192), lambd: float = 0.0051, divisor: float | None = None):
        super().__init__()
        self.projector = _projector(in_dim, dims, bias_hidden=False, bias_last=False)
        self.lambd, self.divisor = lambd, divisor

    def forward(self, backbone, views, labels, index):
        z1, z2 = self.projector(backbone(views[0])), self.projector(backbone(views[1]))
        return barlow_loss(z1, z2, self.lambd, self.divisor), {}


class VICReg(nn.Module):
    """Projector 8192-8192-8192 with biases except on its last layer; the released loss coefficients 25/25/1."""

    n_views = 2

    def __init__(self, in_dim: int, dims=(8192, 8192, 8192), divisor: float | None = None):
        super().__init__()
        self.projector = _projector(in_dim, dims, bias_hidden=True, bias_last=False)
        self.divisor = divisor

    def forward(self, backbone, views, labels, index):
        x, y = self.projector(backbone(views[0])), self.projector(backbone(views[1]))
        return vicreg_loss(x, y, divisor=self.divisor), {}


# ----------------------------------------------------------------------------- pretext tasks


class RotNet(nn.Module):
    """Gidaris et al. (2018): every image at 0/90/180/270°, Linear(D → 4), cross-entropy on the rotation."""

    n_views = 1

    def __init__(self, in_dim: int):
        super().__init__()
        self.fc = nn.Linear(in_dim, 4)

    def forward(self, backbone, views, labels, index):
        x = views[0]
        x4 = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])
        y4 = torch.arange(4, device=x.device).repeat_interleave(len(x))
        logits = self.fc(backbone(x4)).float()
        return F.cross_entropy(logits, y4), {"acc": (logits.argmax(1) == y4).float().mean().item()}


def relative_location_patches(x, jitter: int, out_size: int = 64, generator=None):
    """Doersch et al. (2015): split each image into a 3×3 grid, cut a patch (cell − jitter pixels, at a random
    offset of up to `jitter`) from the centre cell and from one random neighbour; the label is the neighbour's
    position 0..7 (row-major, centre skipped). Patches are resized to the models' `out_size`."""
    b, _, s, _ = x.shape
    cell = s // 3
    p = cell - jitter
    if p < 4:
        raise UserError(f"relative location: images of {s} px leave {p}-px patches (cell {cell}, jitter {jitter})")
    label = torch.randint(0, 8, (b,), generator=generator)
    pos = torch.where(label >= 4, label + 1, label)  # skip the centre (4)
    off = torch.randint(0, jitter + 1, (b, 2, 2), generator=generator)
    centres, neigh = [], []
    for i in range(b):
        for (r, c), o, out in (((1, 1), off[i, 0], centres), ((int(pos[i]) // 3, int(pos[i]) % 3), off[i, 1], neigh)):
            y0, x0 = r * cell + int(o[0]), c * cell + int(o[1])
            out.append(x[i, :, y0:y0 + p, x0:x0 + p])
    resize = lambda t: F.interpolate(torch.stack(t), size=out_size, mode="bilinear", align_corners=False)  # noqa: E731
    return resize(centres), resize(neigh), label.to(x.device)


class RelativeLocation(nn.Module):
    """Centre and neighbour patch features concatenated → fc 4096-BN-ReLU-Dropout → 8-way cross-entropy.
    Jitter 21 px at the 224-px crop (scaled with the crop)."""

    n_views = 1

    def __init__(self, in_dim: int, hidden: int = 4096, jitter: int = 21, crop: int = 224, out_size: int = 64):
        super().__init__()
        self.head = nn.Sequential(nn.Linear(2 * in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                  nn.Dropout(), nn.Linear(hidden, 8))
        self.jitter, self.out_size = max(1, round(jitter * crop / 224)), out_size

    def forward(self, backbone, views, labels, index):
        c, n, y = relative_location_patches(views[0], self.jitter, self.out_size)
        f = backbone(torch.cat([c, n]))
        logits = self.head(torch.cat([f[:len(c)], f[len(c):]], 1)).float()
        return F.cross_entropy(logits, y), {"acc": (logits.argmax(1) == y).float().mean().item()}


def _decoder(in_dim: int, out_channels: int, size: int = 64, width: int = 256):
    """Linear → width×4×4 → transposed-conv upsampling ×2 to size×size → 3×3 conv to out_channels. A generic
    hour-glass half that fits any backbone (the release mirrors each encoder; see README)."""
    layers = [nn.Linear(in_dim, width * 16), nn.Unflatten(1, (width, 4, 4)), nn.ReLU(inplace=True)]
    s, c = 4, width
    while s < size:
        nc = max(c // 2, 32)
        layers += [nn.ConvTranspose2d(c, nc, 4, 2, 1), nn.BatchNorm2d(nc), nn.ReLU(inplace=True)]
        s, c = s * 2, nc
    layers.append(nn.Conv2d(c, out_channels, 3, padding=1))
    return nn.Sequential(*layers)


class AutoEncoding(nn.Module):
    """128-d code (Linear on the backbone output), decoder back to the 64×64 image;
    0.5·MSE(reconstruction, input) + 5e-4·mean|code| (the release's sparsity term)."""

    n_views = 1

    def __init__(self, in_dim: int, code_dim: int = 128, l1: float = 5e-4, size: int = 64):
        super().__init__()
        self.code = nn.Linear(in_dim, code_dim)
        self.decoder = _decoder(code_dim, 3, size)
        self.l1 = l1

    def forward(self, backbone, views, labels, index):
        x = views[0]
        code = self.code(backbone(x))
        rec = self.decoder(code).float()
        if rec.shape[-2:] != x.shape[-2:]:
            rec = F.interpolate(rec, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return 0.5 * F.mse_loss(rec, x.float()) + self.l1 * code.float().abs().mean(), {}


class DepthPrediction(nn.Module):
    """Depth from the backbone output through a decoder ending in a 3×3 conv to one channel; 0.5·MSE against the
    depth map (`labels`: B × 1 × H × W, data.DepthPairs)."""

    n_views = 1

    def __init__(self, in_dim: int, size: int = 64):
        super().__init__()
        self.decoder = _decoder(in_dim, 1, size)

    def forward(self, backbone, views, labels, index):
        pred = self.decoder(backbone(views[0])).float()
        if pred.shape[-2:] != labels.shape[-2:]:
            pred = F.interpolate(pred, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        return 0.5 * F.mse_loss(pred, labels.float()), {}


class CrossEntropy(nn.Module):
    """Supervised: Linear(D → classes), cross-entropy."""

    n_views = 1

    def __init__(self, in_dim: int, n_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_dim, n_classes)

    def forward(self, backbone, views, labels, index):
        logits = self.fc(backbone(views[0])).float()
        return F.cross_entropy(logits, labels), {"acc": (logits.argmax(1) == labels).float().mean().item()}


# ----------------------------------------------------------------------------- registry

LOSSES = ("ir", "simclr", "simsiam", "mocov2", "barlow", "vicreg", "rotnet", "relloc", "ae", "depth", "supervised")


def build_objective(name: str, backbone: nn.Module, n_data: int, n_classes: int, **kw) -> nn.Module:
    """The objective `name` for `backbone` (its `output_dim`), with the release's hyperparameters unless `kw`
    overrides them (e.g. smaller projectors for tests: dims=(64, 64, 64), hidden=256, queue_size=512)."""
    d = backbone.output_dim
    kw = {k: v for k, v in kw.items() if v is not None}
    makers = {
        "ir": lambda: InstanceRecognition(d, n_data, **kw),
        "simclr": lambda: SimCLR(d, **kw),
        "simsiam": lambda: SimSiam(d, **kw),
        "mocov2": lambda: MoCoV2(backbone, d, **kw),
        "barlow": lambda: BarlowTwins(d, **kw),
        "vicreg": lambda: VICReg(d, **kw),
        "rotnet": lambda: RotNet(d, **kw),
        "relloc": lambda: RelativeLocation(d, **kw),
        "ae": lambda: AutoEncoding(d, **kw),
        "depth": lambda: DepthPrediction(d, **kw),
        "supervised": lambda: CrossEntropy(d, n_classes, **kw),
    }
    if name not in makers:
        raise UserError(f"unknown loss {name!r}; expected one of {', '.join(LOSSES)}")
    try:
        obj = makers[name]()
    except TypeError as e:
        raise UserError(f"loss {name}: {e}") from None
    obj.name = name
    return obj


def ddp_ignored(objective: nn.Module, prefix: str = "objective.") -> list[str]:
    """Buffers DDP must not broadcast every step (the IR bank, the MoCo queue): each process keeps them in step
    itself through gathered updates."""
    return [prefix + n for n, _ in objective.named_buffers() if n in ("bank", "queue", "queue_ptr")]
