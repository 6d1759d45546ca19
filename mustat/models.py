"""Model zoo: generalized linear models (no hidden layer), LeNet-300-100, LeNet-5,
the CNN of PyTorch's MNIST example, a small 1-D CNN and a small VGG-style CNN."""

from __future__ import annotations

from enum import Enum
from numbers import Integral

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mustat._checks import check_option, check_scalar


class Family(str, Enum):
    """GLM families and their (summed) negative log-likelihoods."""

    LOGISTIC = "logistic"
    """Bernoulli with logit link; one output; targets 0/1."""
    SOFTMAX = "softmax"
    """Multinomial with the first class as reference (logit fixed at 0), as statsmodels' MNLogit."""
    LINEAR = "linear"
    """Gaussian with identity link; the loss is ``0.5 * sum (y - f)^2`` (unit scale: see hessian_se)."""


class GLM(nn.Module):
    """A network with no hidden layer: ``Linear(n_features, k)`` plus a link.

    For ``"softmax"`` with ``n_classes`` classes the layer has ``n_classes - 1``
    outputs and class 0's logit is fixed at 0, which makes the parameters
    identifiable (the same parametrisation as ``statsmodels.MNLogit``; with one
    free logit per class the Hessian would be singular).
    """

    def __init__(self, n_features: int, family: str | Family = "logistic", n_classes: int = 2):
        super().__init__()
        check_scalar(n_features, "n_features", kind=Integral, low=1)
        self.family = check_option(family, "family", Family)
        if self.family is Family.SOFTMAX:
            check_scalar(n_classes, "n_classes", kind=Integral, low=2)
            out = n_classes - 1
        else:
            out = 1
        self.n_classes = n_classes
        self.linear = nn.Linear(n_features, out)

    def forward(self, x: Tensor) -> Tensor:
        z = self.linear(x)
        if self.family is Family.SOFTMAX:
            return torch.cat([torch.zeros_like(z[:, :1]), z], dim=1)
        return z.squeeze(-1)

    def nll(self, output: Tensor, target: Tensor) -> Tensor:
        """Summed negative log-likelihood of a batch (up to constants)."""
        return nll(self.family, output, target)


def nll(family: str | Family, output: Tensor, target: Tensor) -> Tensor:
    """Summed negative log-likelihood of ``family`` (see :class:`Family`)."""
    family = check_option(family, "family", Family)
    if family is Family.LOGISTIC:
        return F.binary_cross_entropy_with_logits(output, target.to(output.dtype), reduction="sum")
    if family is Family.SOFTMAX:
        return F.cross_entropy(output, target.long(), reduction="sum")
    return 0.5 * (output - target.to(output.dtype)).square().sum()


def mlp(input_shape: tuple[int, ...], n_outputs: int) -> nn.Module:
    """LeNet-300-100: ``input -> 300 -> 100 -> n_outputs`` with ReLU; the input is flattened."""
    d = int(torch.tensor(input_shape).prod())
    return nn.Sequential(
        nn.Flatten(), nn.Linear(d, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, n_outputs)
    )


def _flat_size(features: nn.Module, input_shape) -> int:
    with torch.no_grad():
        return int(features(torch.zeros(1, *input_shape)).numel())


def lenet5(input_shape: tuple[int, ...], n_outputs: int) -> nn.Module:
    """LeNet-5 (conv 6@5x5 pad 2, pool, conv 16@5x5, pool, 120, 84) for images ``(C, H, W)``, H, W >= 12."""
    if len(input_shape) != 3 or min(input_shape[1:]) < 12:
        raise ValueError(f"lenet5 needs images (C, H, W) with H, W >= 12, the data has shape {tuple(input_shape)}; use model='mlp'")
    features = nn.Sequential(
        nn.Conv2d(input_shape[0], 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
    )
    return nn.Sequential(
        *features, nn.Linear(_flat_size(features, input_shape), 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, n_outputs),
    )


def torch_example(input_shape: tuple[int, ...], n_outputs: int) -> nn.Module:
    """The CNN of PyTorch's MNIST example (``pytorch/examples``, ``mnist/main.py``): conv 32@3x3,
    conv 64@3x3, max-pool, dropout 0.25, 128, dropout 0.5; for 28x28 images (``(C, 28, 28)``)."""
    if len(input_shape) != 3 or tuple(input_shape[1:]) != (28, 28):
        raise ValueError(f"torch-example expects 28x28 images (C, 28, 28), the data has shape {tuple(input_shape)}")
    return nn.Sequential(
        nn.Conv2d(input_shape[0], 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Dropout(0.25), nn.Flatten(), nn.Linear(9216, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, n_outputs),
    )


def cnn1d(input_shape: tuple[int, ...], n_outputs: int) -> nn.Module:
    """A small 1-D CNN for sequences ``(L,)`` or ``(C, L)`` such as MNIST-1D (L = 40): conv 16@5,
    pool, conv 32@5, pool, 64, with ReLU."""
    if len(input_shape) not in (1, 2) or input_shape[-1] < 16:
        raise ValueError(f"cnn1d expects sequences (L,) or (C, L) with L >= 16, the data has shape {tuple(input_shape)}")
    channels = 1 if len(input_shape) == 1 else input_shape[0]
    features = nn.Sequential(
        nn.Unflatten(1, (channels, input_shape[-1])) if len(input_shape) == 1 else nn.Identity(),
        nn.Conv1d(channels, 16, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2),
        nn.Conv1d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2), nn.Flatten(),
    )
    return nn.Sequential(*features, nn.Linear(_flat_size(features, input_shape), 64), nn.ReLU(),
                         nn.Linear(64, n_outputs))


def vgg(input_shape: tuple[int, ...], n_outputs: int) -> nn.Module:
    """A small VGG-style CNN for 32x32 images: (conv3x3-ReLU)x2 + pool, three stages (32, 64, 128), then 256."""
    if len(input_shape) != 3 or tuple(input_shape[1:]) != (32, 32):
        raise ValueError(f"vgg expects 32x32 images (C, 32, 32), the data has shape {tuple(input_shape)}")
    layers, c = [], input_shape[0]
    for width in (32, 64, 128):
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        c = width
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(128 * 4 * 4, 256), nn.ReLU(), nn.Linear(256, n_outputs))


class _Residual(nn.Module):
    """``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``; the shortcut is the identity, or a
    strided 1x1 convolution with BatchNorm when the width or resolution changes (He et al. 2016)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet(input_shape: tuple[int, ...], n_outputs: int) -> nn.Module:
    """A small ResNet for images ``(C, H, W)``: conv 16@3x3 + BatchNorm, residual blocks of 16, 32
    (stride 2) and 32 channels, global average pooling, a linear head. Its identity shortcuts
    couple channels across blocks: what structured pruning must remove together."""
    if len(input_shape) != 3 or min(input_shape[1:]) < 8:
        raise ValueError(f"resnet needs images (C, H, W) with H, W >= 8, the data has shape {tuple(input_shape)}")
    return nn.Sequential(
        nn.Conv2d(input_shape[0], 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        _Residual(16, 16, 1), _Residual(16, 32, 2), _Residual(32, 32, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, n_outputs),
    )


def glm(input_shape: tuple[int, ...], n_outputs: int, *, task: str = "classification") -> GLM:
    """No hidden layer: logistic (2 classes), softmax (more) or linear regression."""
    d = int(torch.tensor(input_shape).prod())
    if task == "regression":
        return _Flat(GLM(d, "linear"))
    return _Flat(GLM(d, "logistic") if n_outputs == 2 else GLM(d, "softmax", n_classes=n_outputs))


class _Flat(nn.Sequential):
    """Flatten, then a GLM; keeps the GLM's ``nll``."""

    def __init__(self, glm_: GLM):
        super().__init__(nn.Flatten(), glm_)

    def nll(self, output: Tensor, target: Tensor) -> Tensor:
        return self[1].nll(output, target)


MODELS = {"mlp": mlp, "lenet5": lenet5, "torch-example": torch_example, "cnn1d": cnn1d, "vgg": vgg, "resnet": resnet, "glm": glm}


def build(name: str, input_shape: tuple[int, ...], n_outputs: int, *, task: str = "classification") -> nn.Module:
    """Build a model by name (see ``MODELS``); unknown names list the valid ones."""
    check_option(name, "model", MODELS)
    if name == "glm":
        return glm(input_shape, n_outputs, task=task)
    if task == "regression":
        raise ValueError(f"model={name!r} is a classifier; for a regression dataset use model='glm'")
    return MODELS[name](input_shape, n_outputs)


def flops(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, int]:
    """Multiply-accumulates of one forward pass through the ``Linear`` and ``Conv`` layers:
    ``(dense, sparse)``, where *sparse* counts only nonzero weights (each nonzero weight of a
    convolution is used once per output position). The theoretical speed-up of a pruned model is
    ``dense / sparse``; biases, activations and pooling are not counted. Read only: ``model``'s
    mode is restored."""
    sizes: dict[nn.Module, int] = {}
    hooks = [m.register_forward_hook(lambda mod, _, out: sizes.__setitem__(mod, out[0, 0].numel()))
             for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    mode = model.training
    try:
        model.eval()
        p = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, dtype=p.dtype, device=p.device))
    finally:
        model.train(mode)
        for h in hooks:
            h.remove()
    dense = sparse = 0
    for m, positions in sizes.items():
        w = m.weight
        dense += w.numel() * positions
        sparse += int((w != 0).sum()) * positions
    return dense, sparse


def loss_fn(model: nn.Module, output: Tensor, target: Tensor) -> Tensor:
    """Mean training loss: the model's own NLL when it has one (GLMs), else cross-entropy."""
    if hasattr(model, "nll"):
        return model.nll(output, target) / len(target)
    return F.cross_entropy(output, target)


def predict(model: nn.Module, output: Tensor) -> Tensor:
    """Class predictions from outputs (logistic GLMs output one logit)."""
    if output.ndim == 1:
        return (output > 0).long()
    return output.argmax(1)
