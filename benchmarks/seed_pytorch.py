"""The seed's PyTorch training script (../shared/seed/, PAPER.md section 5) without d2l.

For side-by-side comparison only; torch is not a dependency of vgg_jax. Same
network (VGG-A with conv widths / 4, FC 4096-4096-10, 1 input channel, ReLU,
dropout 0.5), same initialisation (Xavier uniform on conv and linear weights,
PyTorch's default biases), same optimiser (SGD lr 0.01, momentum 0.9), same
schedule (StepLR x0.9 every 3 epochs), batch 64, seed 42, and the same data:
Fashion-MNIST read from the IDX .gz files, resized bilinearly to the
resolution as d2l's `transforms.Resize` does on the PIL image (half-pixel
centres, rounded back to 8 bits), then scaled to [0, 1] as `ToTensor` does.

Like d2l's `train_ch6`, the timer covers the training step and the per-batch
metric update but not data loading, so images/s = trained images / timed
seconds. Prints one JSON object at the end (and per-epoch lines on stderr).

    python -m benchmarks.seed_pytorch --resolution 32 --epochs 2 --limit-steps 100
"""

from __future__ import annotations

import argparse
import gzip
import json
import struct
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_DATA = "/usr/share/datasets/fashion-mnist"
CONV_ARCH = ((1, 64), (1, 128), (2, 256), (2, 512), (2, 512))
IDX_MAGIC = {"images": 2051, "labels": 2049}


def read_idx(path: Path, kind: str) -> np.ndarray:
    """An IDX file (gzipped or not) as uint8: (N, 28, 28) images or (N,) labels."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = struct.unpack(">I", data[:4])[0]
    if magic != IDX_MAGIC[kind]:
        raise ValueError(f"{path} is not an IDX {kind} file (magic {magic}).")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_split(data_dir: Path, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    def find(stem: str) -> Path:
        for name in (stem + ".gz", stem):
            if (data_dir / name).exists():
                return data_dir / name
        raise FileNotFoundError(
            f"{stem}[.gz] not found in {data_dir}. Install Debian's dataset-fashion-mnist "
            "or pass --data-dir with the four Fashion-MNIST IDX files."
        )

    images = read_idx(find(f"{prefix}-images-idx3-ubyte"), "images")
    labels = read_idx(find(f"{prefix}-labels-idx1-ubyte"), "labels")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def to_input(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, R, R) in [0, 1], as Resize then ToTensor."""
    x = images[:, None].float()
    if resolution != x.shape[-1]:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
        x = x.round().clamp(0, 255)  # PIL resizes 8-bit images to 8 bits
    return x / 255.0


def vgg_block(num_convs: int, in_channels: int, out_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers += [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1), nn.ReLU()]
        in_channels = out_channels
    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    return nn.Sequential(*layers)


def vgg(conv_arch: Sequence[tuple[int, int]], resolution: int) -> nn.Sequential:
    blocks, in_channels = [], 1
    for num_convs, out_channels in conv_arch:
        blocks.append(vgg_block(num_convs, in_channels, out_channels))
        in_channels = out_channels
    probe = torch.randn(1, 1, resolution, resolution)
    for blk in blocks:
        probe = blk(probe)
    return nn.Sequential(
        *blocks,
        nn.Flatten(),
        nn.Linear(probe.numel(), 4096),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(4096, 4096),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(4096, 10),
    )


def init_weights(m: nn.Module) -> None:
    if type(m) in (nn.Linear, nn.Conv2d):
        nn.init.xavier_uniform_(m.weight)


def evaluate(net: nn.Module, x: torch.Tensor, y: torch.Tensor, args) -> float:
    net.eval()
    correct = total = 0
    batches = range(0, len(x), args.batch_size)
    if args.limit_test:
        batches = list(batches)[: args.limit_test]
    with torch.no_grad():
        for start in batches:
            xb = to_input(x[start : start + args.batch_size], args.resolution)
            yb = y[start : start + args.batch_size]
            correct += int((net(layout(xb, args)).argmax(1) == yb).sum())
            total += len(yb)
    return correct / total


def layout(x: torch.Tensor, args) -> torch.Tensor:
    return x.to(memory_format=torch.channels_last) if args.channels_last else x


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", default=DEFAULT_DATA)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--ratio", type=int, default=4, help="conv width divisor")
    p.add_argument("--limit-steps", type=int, default=0, help="train steps per epoch (0: all)")
    p.add_argument("--limit-test", type=int, default=0, help="test batches (0: all)")
    p.add_argument("--channels-last", action="store_true", help="not in the seed; faster on CPU")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=42)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data_dir = Path(args.data_dir)
    train_x, train_y = load_split(data_dir, "train")
    test_x, test_y = load_split(data_dir, "t10k")

    arch = [(n, c // args.ratio) for n, c in CONV_ARCH]
    net = vgg(arch, args.resolution)
    net.apply(init_weights)
    net = layout(net, args)
    optimizer = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.9)
    loss_fn = nn.CrossEntropyLoss()

    timed_s, trained, history = 0.0, 0, []
    for epoch in range(args.epochs):
        net.train()
        order = torch.randperm(len(train_x))
        steps = len(order) // args.batch_size + (len(order) % args.batch_size > 0)
        if args.limit_steps:
            steps = min(steps, args.limit_steps)
        loss_sum = correct = seen = 0.0
        for i in range(steps):
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            xb, yb = layout(to_input(train_x[idx], args.resolution), args), train_y[idx]
            start = time.perf_counter()
            optimizer.zero_grad()
            y_hat = net(xb)
            loss = loss_fn(y_hat, yb)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                loss_sum += float(loss) * len(yb)
                correct += float((y_hat.argmax(1) == yb).sum())
                seen += len(yb)
            timed_s += time.perf_counter() - start
        trained += int(seen)
        test_acc = evaluate(net, test_x, test_y, args)
        scheduler.step()
        row = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / seen,
            "train_acc": correct / seen,
            "test_acc": test_acc,
        }
        history.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    result = {
        "impl": "seed_pytorch",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "resolution": args.resolution,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "limit_steps": args.limit_steps,
        "channels_last": args.channels_last,
        "images_per_s": trained / timed_s,
        "train_seconds": timed_s,
        "final_train_loss": history[-1]["train_loss"],
        "final_train_acc": history[-1]["train_acc"],
        "test_acc": history[-1]["test_acc"],
        "history": history,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
