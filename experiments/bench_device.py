"""Seconds per fine-tune step, CPU vs GPU: what ``--device cuda`` buys a trial.

For each model, a trial's own fine-tune: the teacher compressed by one candidate (uniform int8
fake-quant, 25 % of channels pruned; ``--bits 32`` for a plain pruned student), then
:func:`autoshrink.compress.distill.finetune` with the teacher online (as with a streamed image
folder), timed after a warm-up (first steps allocate, and autotune cuDNN). Inputs are random
tensors already in memory, so this times the step (forward, KD loss, backward, SGD), not image
decoding.

Models:
- ``resnet18_32`` at 32x32 (the zoo's CIFAR-stem ResNet-18, 3 channels);
- ``resnet18_224``: ResNet-18 with the ImageNet stem (7x7 stride-2 conv + max-pool, the
  torchvision architecture, 11.7 M parameters, 1000 classes) at 224x224, built here from the
  zoo's ResNet blocks.

The GPU column reads "n/a: no CUDA" where torch sees no GPU.

Usage:
    python experiments/bench_device.py --steps 20 --warmup 5
    python experiments/bench_device.py --steps 2 --warmup 1 --only cpu   # a quick CPU-only look
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from autoshrink import Candidate, Task, models
from autoshrink.compress import compress
from autoshrink.compress.distill import finetune
from autoshrink.models.resnet import ResNet


class ResNet18ImageNet(ResNet):
    """ResNet-18 with the ImageNet stem: 7x7/2 conv, BN, ReLU, 3x3/2 max-pool, then the stages."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__((2, 2, 2, 2), (64, 128, 256, 512), num_classes=num_classes, in_chans=3)
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


CASES = {
    # name: (factory, input side, classes, default batch size)
    "resnet18_32": (lambda: models.create("resnet18_32", num_classes=10, in_chans=3), 32, 10, 128),
    "resnet18_224": (lambda: ResNet18ImageNet(num_classes=1000), 224, 1000, 64),
}


def seconds_per_step(name: str, device: str, *, steps: int, warmup: int, bits: int, batch_size: int | None) -> float:
    factory, side, classes, default_batch = CASES[name]
    batch = batch_size or default_batch
    torch.manual_seed(0)
    teacher = factory().eval()
    n = batch * 4
    data = TensorDataset(torch.randn(n, 3, side, side), torch.randint(0, classes, (n,)))
    task = Task(model=teacher, train_data=data, val_data=data, example_input=data[0][0].unsqueeze(0),
                name=name)
    x = task.example_input
    cand = Candidate.uniform(bits=bits, prune=0.25, steps=warmup, batch_size=batch, lr=0.01)
    student = compress(teacher, cand, x).trainable(x, [data.tensors[0][:8]])
    finetune(student, task, cand, device=device)  # warm-up: allocations, cuDNN autotuning
    timed = Candidate.uniform(bits=bits, prune=0.25, steps=steps, batch_size=batch, lr=0.01)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = finetune(student, task, timed, device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / max(1, result.steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps per cell")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--bits", type=int, default=8, choices=(8, 32), help="student weight bits (8: QAT)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 128 at 32x32, 64 at 224x224")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--only", choices=("cpu", "cuda"), default=None, help="one column only")
    p.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    has_cuda = torch.cuda.is_available()
    gpu = torch.cuda.get_device_name(0) if has_cuda else "none"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, GPU: {gpu}; "
          f"{args.steps} timed steps after {args.warmup}, student {args.bits}-bit, 25 % pruned")
    print(f"{'model':<14} {'input':>8} {'batch':>6} {'cpu s/step':>11} {'gpu s/step':>16}")
    for name in args.models:
        side, batch = CASES[name][1], args.batch_size or CASES[name][3]
        cells = []
        for device in ("cpu", "cuda"):
            if device == "cuda" and not has_cuda:
                cells.append("n/a: no CUDA")
            elif args.only and device != args.only:
                cells.append("not run")
            else:
                s = seconds_per_step(name, device, steps=args.steps, warmup=args.warmup, bits=args.bits,
                                     batch_size=args.batch_size)
                cells.append(f"{s:.4f}")
        print(f"{name:<14} {f'{side}x{side}':>8} {batch:>6} {cells[0]:>11} {cells[1]:>16}", flush=True)


if __name__ == "__main__":
    main()
