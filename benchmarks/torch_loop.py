"""The PyTorch peers: an nn.Module, AdamW, the usual loop, fed by a DataLoader or from resident tensors.

Two data paths: `dataloader` (TensorDataset + DataLoader with shuffle: what most PyTorch code runs) and
`resident` (the whole training set as one float tensor in memory, each epoch a `torch.randperm`, each batch
gathered by index with `images[perm[i:i+B]]`: the advantage ours has, its data resident on the device, given to
the peer). Either eager or with `torch.compile` (TorchInductor).

Same architecture as mnist_flax's CNN and MLP (3x3 SAME convolutions, ReLU, 2x2 average pooling, dense layers,
dropout after each dense hidden layer), the same optimizer (AdamW, warmup + cosine schedule, weight decay 1e-4)
and the same data (the float conversion /255 is done once, as the usual TensorDataset pipeline does).
Imports NumPy and torch only.
"""

import math
import time

import numpy as np
import torch
from torch import nn


class TorchNet(nn.Module):
    """Conv(3x3, SAME) + ReLU + AvgPool(2) per stage, then Dense + ReLU + Dropout, then the classifier."""

    def __init__(self, conv_features=(32, 64), dense_features=(256,), dropout_rate=0.25, num_classes=10):
        super().__init__()
        layers, channels, side = [], 1, 28
        for features in conv_features:
            layers += [nn.Conv2d(channels, features, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2)]
            channels, side = features, side // 2
        layers.append(nn.Flatten())
        width = channels * side * side
        for features in dense_features:
            layers += [nn.Linear(width, features), nn.ReLU(), nn.Dropout(dropout_rate)]
            width = features
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


def warmup_cosine(step: int, peak: float, warmup_steps: int, total_steps: int) -> float:
    """optax.warmup_cosine_decay_schedule(0, peak, warmup_steps, total_steps) (end value 0)."""
    if step < warmup_steps:
        return peak * step / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


class TorchContender:
    """Trains `TorchNet` with the usual DataLoader loop; `run(steps)` continues where it stopped."""

    def __init__(
        self,
        architecture: dict,
        data,
        batch_size: int,
        *,
        threads: int | None = None,
        device: str = "cpu",
        learning_rate: float = 2e-3,
        weight_decay: float = 1e-4,
        label_smoothing: float = 0.0,
        num_epochs: int = 10,
        log_every_steps: int = 100,
        seed: int = 0,
        compile: bool = False,
        data_path: str = "dataloader",
    ):
        if data_path not in ("dataloader", "resident"):
            raise ValueError(f"data_path: {data_path!r} (dataloader or resident)")
        if threads:
            torch.set_num_threads(threads)
        torch.manual_seed(seed)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.log_every_steps = log_every_steps
        to_tensor = lambda images: torch.from_numpy(  # noqa: E731
            np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0
        )
        train = torch.utils.data.TensorDataset(
            to_tensor(data.train_images), torch.from_numpy(data.train_labels.astype(np.int64))
        )
        self.data_path = data_path
        self.loader = torch.utils.data.DataLoader(
            train, batch_size=batch_size, shuffle=True, drop_last=True, pin_memory=self.device.type == "cuda"
        )
        self.train_images, self.train_labels = (t.to(self.device) for t in train.tensors)
        self._order, self._position = None, 0  # the resident path's epoch permutation and place in it
        self.test_images = to_tensor(data.test_images)
        self.test_labels = torch.from_numpy(data.test_labels.astype(np.int64))
        self.net = TorchNet(
            architecture["conv_features"], architecture["dense_features"], architecture["dropout_rate"]
        ).to(self.device)
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=learning_rate, weight_decay=weight_decay)
        steps_per_epoch = len(self.loader)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: warmup_cosine(step, 1.0, steps_per_epoch, steps_per_epoch * num_epochs),
        )
        self.num_params = sum(p.numel() for p in self.net.parameters())
        self.label_smoothing = label_smoothing
        self.validation_images = to_tensor(data.validation_images)
        self.validation_labels = torch.from_numpy(data.validation_labels.astype(np.int64))
        # What a PyTorch user writes in 2026: torch.compile(model) (TorchInductor; it compiles on the first call,
        # in training mode and again in eval mode, and the optimizer stays eager).
        self.model = torch.compile(self.net) if compile else self.net
        self._batches = iter(self.loader)
        self._step = 0
        self._loss_sum = torch.zeros((), device=self.device)
        self.last_loss = float("nan")

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def run(self, steps: int) -> int:
        """Trains `steps` steps; returns the images processed."""
        self.net.train()
        for _ in range(steps):
            images, labels = self._next_batch()
            self.optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(self.model(images), labels, label_smoothing=self.label_smoothing)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            self._loss_sum += loss.detach()
            self._step += 1
            if self._step % self.log_every_steps == 0:
                self.last_loss = self._loss_sum.item() / self.log_every_steps
                self._loss_sum.zero_()
        self._sync()
        return steps * self.batch_size

    def _next_batch(self):
        if self.data_path == "resident":
            if self._order is None or self._position + self.batch_size > len(self._order):
                self._order, self._position = torch.randperm(len(self.train_labels), device=self.device), 0
            index = self._order[self._position : self._position + self.batch_size]
            self._position += self.batch_size
            return self.train_images[index], self.train_labels[index]
        try:
            images, labels = next(self._batches)
        except StopIteration:
            self._batches = iter(self.loader)
            images, labels = next(self._batches)
        return images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def evaluate(self, batch_size: int = 1000, split: str = "test") -> tuple[float, float]:
        """Forward pass over the test (or validation) set; returns (seconds, accuracy)."""
        test = split == "test"
        images_all = self.test_images if test else self.validation_images
        labels_all = self.test_labels if test else self.validation_labels
        start = time.perf_counter()
        self.net.eval()
        correct = 0
        with torch.no_grad():
            for first in range(0, len(labels_all), batch_size):
                images = images_all[first : first + batch_size].to(self.device, non_blocking=True)
                predicted = self.model(images).argmax(dim=1).cpu()
                correct += int((predicted == labels_all[first : first + batch_size]).sum())
        self.net.train()
        return time.perf_counter() - start, correct / len(labels_all)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader)
