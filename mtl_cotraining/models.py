"""MTL_VGG of Safarani et al. (NeurIPS 2021), "Towards robust vision by multi-task learning on monkey visual
cortex": a VGG-19 with batch norm trained from scratch on grayscale 64×64 images, whose early layers are shared
between Tiny-ImageNet classification and the prediction of monkey V1 responses (paper §3, Fig. 1).

    input 1×64×64 (grayscale, repeated to 3 channels)
      └─ shared core = vgg19_bn.features[0:17]  (conv1_1 … conv3_1 + BN + ReLU)     → 256×16×16, 556,608 params
           ├─ unshared = vgg19_bn.features[17:]                                     → 512×2×2
           │    └─ classification head (conv: 1×1 convs 512→4096→4096→classes, global max pool; or dense)
           └─ neural head: one Gaussian readout per recording session → ELU(y − 1) + 1 > 0

The original splits torchvision's vgg19_bn after index 16 (`v1_model_layer 17`, neural_cotraining
`models/mtl_vgg.py`); the readout is neuralpredictors' legacy `Gaussian2d` (`layers/legacy.py`).
The single-task models are the same class with one head switched off (`task="image"` / `task="neural"`), so a
neural-only checkpoint and an MTL checkpoint share the core's parameter names.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.vgg import cfgs, make_layers

SHARED_LAYERS = 17  # features[0:17] ends with the ReLU after conv3_1 (`v1_model_layer` 17 in the original)
TASKS = ("mtl", "image", "neural")
HEADS = ("conv", "dense")


def vgg19_bn_features() -> nn.Sequential:
    """The layers of torchvision's `vgg19_bn(weights=None).features` with its init rules (Kaiming fan_out convs, zero
    bias, unit BN), without building the 123M-parameter ImageNet classifier that this model replaces. The draws for
    a given seed differ from torchvision's, whose classifier constructors consume the RNG first."""
    features = make_layers(cfgs["E"], batch_norm=True)
    for m in features.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return features


class Gaussian2dReadout(nn.Module):
    """One neuron = one point of the feature map, read out with a per-neuron feature vector.

    Legacy neuralpredictors `Gaussian2d`: per neuron a position mu ∈ [−1, 1]² and a spread sigma (one value per
    axis), C feature weights and a bias, (C + 5)·N parameters. Training samples a position per image and neuron,
    clamp(mu + sigma·ε, ±1) with ε ~ N(0, I); evaluation reads out at clamp(mu, ±1). The map is sampled
    bilinearly with grid_sample(align_corners=True), as the original (neuralpredictors PR #54).
    Init: mu ~ U(±0.3), sigma ~ U(0, 0.6), features = 1/C, bias = the mean training response (`init_bias`).
    """

    def __init__(self, in_channels: int, n_neurons: int, mu_range: float = 0.3, sigma_range: float = 0.6):
        super().__init__()
        self.in_channels, self.n_neurons = in_channels, n_neurons
        self.mu = nn.Parameter(torch.empty(n_neurons, 2).uniform_(-mu_range, mu_range))
        self.sigma = nn.Parameter(torch.empty(n_neurons, 2).uniform_(0.0, sigma_range))
        self.features = nn.Parameter(torch.full((in_channels, n_neurons), 1.0 / in_channels))
        self.bias = nn.Parameter(torch.zeros(n_neurons))

    @torch.no_grad()
    def init_bias(self, mean_response: torch.Tensor) -> None:
        # The original takes the mean of one random training batch (a seed-dependent init); the mean over the whole
        # training set is the quantity that batch estimates (slug bias-init-random-batch).
        self.bias.copy_(torch.as_tensor(mean_response, dtype=self.bias.dtype))

    def grid(self, batch: int, sample: bool) -> torch.Tensor:
        with torch.no_grad():  # the legacy readout clamps its parameters in place on every forward
            self.mu.clamp_(-1.0, 1.0)
            self.sigma.clamp_(min=0.0)
        if sample:
            eps = torch.randn(batch, self.n_neurons, 2, device=self.mu.device, dtype=self.mu.dtype)
            pos = self.mu + self.sigma * eps
        else:
            pos = self.mu.expand(batch, -1, -1)
        return pos.clamp(-1.0, 1.0)

    def forward(self, x: torch.Tensor, sample: bool | None = None) -> torch.Tensor:
        """x: B × C × H × W → B × neurons (before the output nonlinearity)."""
        sample = self.training if sample is None else sample
        grid = self.grid(len(x), sample).to(x.dtype)[:, :, None, :]  # B × N × 1 × 2, (x, y) order
        v = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[..., 0]  # B × C × N
        return torch.einsum("bcn,cn->bn", v, self.features.to(v.dtype)) + self.bias.to(v.dtype)

    def l1(self) -> torch.Tensor:
        return self.features.abs().sum()


class ConvHead(nn.Module):
    """The recipe's classifier: VGG's fully connected layers as 1×1 convolutions, then a global max pool.

    Kaiming (fan_out) init and zero bias for the hidden convolutions, as the original. The original also gives the
    last (4096 → classes) convolution Kaiming fan_out init, whose std √(2/classes) makes the initial logits huge
    (cross-entropy ≈ 30 for 5 classes) and stalls short schedules; by default it gets N(0, 0.01²) like
    torchvision's VGG output layer. `kaiming_last=True` (`--kaiming_last_layer`, slug head-init-kaiming)
    reproduces the original."""

    def __init__(self, in_channels: int, n_classes: int, width: int = 4096, dropout: float = 0.5,
                 kaiming_last: bool = False):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_channels, width, 1), nn.ReLU(True), nn.Dropout(dropout),
                                 nn.Conv2d(width, width, 1), nn.ReLU(True), nn.Dropout(dropout),
                                 nn.Conv2d(width, n_classes, 1))
        for m in self.net:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        if not kaiming_last:
            nn.init.normal_(self.net[-1].weight, 0.0, 0.01)

    def forward(self, x):
        return torch.amax(self.net(x), dim=(2, 3))


class DenseHead(nn.Module):
    """VGG's dense classifier on the flattened 512×2×2 map (the original's `classification` alternative)."""

    def __init__(self, in_features: int, n_classes: int, width: int = 4096, dropout: float = 0.5):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, width), nn.ReLU(True), nn.Dropout(dropout),
                                 nn.Linear(width, width), nn.ReLU(True), nn.Dropout(dropout),
                                 nn.Linear(width, n_classes))

    def forward(self, x):
        return self.net(x)


class MTLVGG(nn.Module):
    """VGG-19-BN with a shared core, a classification head and per-session Gaussian readouts.

    task="mtl": both heads; task="image": the image-only baseline (no readouts); task="neural": core + readouts
    (the single-task V1 model whose predictions become the co-training targets).
    sessions: {data_key: n_neurons}. forward(x, task="image"|"neural", session=key).
    """

    def __init__(self, n_classes: int = 200, sessions: dict | None = None, task: str = "mtl", head: str = "conv",
                 image_size: int = 64, mu_range: float = 0.3, sigma_range: float = 0.6, elu_offset: float = -1.0,
                 kaiming_last: bool = False):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        self.task, self.head_type, self.elu_offset = task, head, elu_offset
        self.n_classes = n_classes
        features = vgg19_bn_features()  # random init, as the recipe (pretrained False)
        self.core = features[:SHARED_LAYERS]
        if task in ("mtl", "image"):
            self.unshared = features[SHARED_LAYERS:]
            final = image_size // 32
            self.classifier = ConvHead(512, n_classes, kaiming_last=kaiming_last) if head == "conv" else DenseHead(512 * final * final, n_classes)
        if task in ("mtl", "neural"):
            if not sessions:
                raise ValueError("a neural head needs sessions {data_key: n_neurons}")
            self.readouts = nn.ModuleDict({str(k): Gaussian2dReadout(256, int(n), mu_range, sigma_range)
                                           for k, n in sessions.items()})

    @staticmethod
    def _as_rgb(x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x  # grayscale repeated to the 3 VGG input channels

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        return self.core(self._as_rgb(x))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.unshared(self.shared(x)))

    def predict_neural(self, x: torch.Tensor, session: str) -> torch.Tensor:
        y = self.readouts[str(session)](self.shared(x))
        return F.elu(y + self.elu_offset) + 1.0  # ELU(y − 1) + 1 > 0: a valid Poisson / NB mean

    def forward(self, x: torch.Tensor, task: str = "image", session: str | None = None) -> torch.Tensor:
        return self.classify(x) if task == "image" else self.predict_neural(x, session)

    def readout_l1(self) -> torch.Tensor:
        if not hasattr(self, "readouts"):
            return torch.zeros(())
        return sum(r.l1() for r in self.readouts.values())


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
