"""MultiFashion demo: inspect the example models on real Fashion-MNIST images.

Writes the `fxfuse inspect` report and graph of each example model into
``runs/multifashion/``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from examples.multifashion.models import SmallMobileNet, SmallResNet, SmallViT
from fxfuse.cli import main as fxfuse_main
from fxfuse.data import multifashion

MODELS = {"resnet": SmallResNet, "mobilenet": SmallMobileNet, "vit": SmallViT}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/multifashion", help="output folder")
    parser.add_argument("--data", default=None, help="Fashion-MNIST folder")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    data = multifashion(args.data)
    batch = data.test.take(slice(0, 8)).inputs
    torch.save(batch, out / "batch.pt")
    for name, cls in MODELS.items():
        torch.manual_seed(0)
        program = torch.export.export(
            cls(num_classes=10).eval(),
            (batch,),
            dynamic_shapes=({0: torch.export.Dim.AUTO},),
        )
        torch.export.save(program, out / f"{name}.pt2")
        code = fxfuse_main(
            [
                "inspect",
                str(out / f"{name}.pt2"),
                "--example-inputs",
                str(out / "batch.pt"),
                "--graph",
                str(out / f"{name}.svg"),
            ]
        )
        if code:
            return code
    print(f"\nfiles in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
