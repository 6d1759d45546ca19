"""Five architectures no test was written for before the functional view: an LSTM classifier,
a language model whose embedding is tied to its output head, a ResNet-style CNN with
BatchNorm and residual blocks, an ``nn.TransformerEncoder`` classifier, and a model with a
frozen (``requires_grad=False``) first layer. Each comes with tiny data and its mean loss."""

import torch
from torch import nn
from torch.nn import functional as F


class LSTMClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 6, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


class TiedLM(nn.Module):
    def __init__(self, vocab=11, dim=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, t):
        return self.head(torch.tanh(self.mix(self.emb(t))))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.blocks = nn.Sequential(Block(4), Block(4))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.head(x.mean((2, 3)))


class Transformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, t):
        return self.head(self.encoder(self.emb(t)).mean(1))


class Frozen(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
        self.head = nn.Linear(8, 3)
        self.body[0].requires_grad_(False)

    def forward(self, x):
        return self.head(self.body(x))


def lm_loss(out, t):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), t.reshape(-1))


def make(name: str, seed: int = 0):
    """``(model, (X, y), loss)`` for ``name`` in ARCHITECTURES."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if name == "lstm":
            return LSTMClassifier(), (torch.randn(24, 5, 4, generator=g), torch.randint(0, 3, (24,), generator=g)), \
                F.cross_entropy
        if name == "tied-lm":
            t = torch.randint(0, 11, (24, 5), generator=g)
            return TiedLM(), (t, torch.roll(t, -1, 1)), lm_loss
        if name == "resnet":
            return ResNet(), (torch.randn(24, 1, 6, 6, generator=g), torch.randint(0, 3, (24,), generator=g)), \
                F.cross_entropy
        if name == "transformer":
            return Transformer(), (torch.randint(0, 11, (24, 5), generator=g), torch.randint(0, 3, (24,), generator=g)), \
                F.cross_entropy
        if name == "frozen":
            return Frozen(), (torch.randn(24, 5, generator=g), torch.randint(0, 3, (24,), generator=g)), F.cross_entropy
    raise ValueError(name)


ARCHITECTURES = ["lstm", "tied-lm", "resnet", "transformer", "frozen"]


class LogSoftmaxCNN(nn.Module):
    """PyTorch's MNIST-example pattern in miniature: a CNN whose forward ends in ``log_softmax``
    (trained with ``nll_loss``) or, with ``log=False``, the same network returning its logits."""

    def __init__(self, log: bool):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc = nn.Linear(3 * 4 * 4, 4)
        self.log = log

    def forward(self, x):
        z = self.fc(torch.relu(self.conv(x)).flatten(1))
        return nn.functional.log_softmax(z, dim=1) if self.log else z


def log_softmax_pair(wd=1e-3):
    """The log-softmax network after 30 SGD steps of ``nll_loss``, and a logit network with its weights."""
    g = torch.Generator().manual_seed(7)
    X = torch.randn(60, 1, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (60,), generator=g)
    with torch.random.fork_rng():
        torch.manual_seed(7)
        logp = LogSoftmaxCNN(log=True).double()
    opt = torch.optim.SGD(logp.parameters(), lr=0.1, weight_decay=wd)
    for _ in range(30):
        opt.zero_grad()
        nn.functional.nll_loss(logp(X), y).backward()
        opt.step()
    logits = LogSoftmaxCNN(log=False).double()
    logits.load_state_dict(logp.state_dict())
    return logp, logits, X, y
