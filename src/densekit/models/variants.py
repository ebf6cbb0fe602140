"""Every named DenseNet as data: the registry builds each with :class:`DenseNet`.

Sources: Huang et al., "Densely Connected Convolutional Networks", CVPR 2017
(arXiv:1608.06993), Table 1 (ImageNet) and Table 2 (CIFAR); torchvision's published
parameter counts for densenet121/161/169/201.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Variant:
    growth_rate: int | tuple[int, ...]          # k: maps each dense layer adds (one per block allowed)
    block_config: tuple[int, ...]               # dense layers per block
    num_init_features: int | None = None        # stem width; None means 2k (the paper's BC choice)
    bn_size: int = 4                            # 1x1 bottleneck to bn_size*k ("B"); 0 = plain layer
    compression: float = 0.5                    # theta: fraction of channels a transition keeps ("C")
    stem: str = "imagenet"                      # "imagenet" 7x7/2 + maxpool, "cifar" 3x3, "resnet" 3x3-BN-ReLU
    stem_stride: int = 1                        # 2: the 3x3 stem conv halves small inputs (28 px)
    num_classes: int = 1000                     # default head: ImageNet-1k, CIFAR-10
    input_size: tuple[int, ...] = (3, 224, 224)  # default input (channels, *spatial) for MACs and tests
    source: str = field(default="", compare=False)  # where the numbers come from

    def kwargs(self) -> dict:
        """The :class:`DenseNet` arguments of this variant."""
        out = asdict(self)
        for key in ("input_size", "source"):
            out.pop(key)
        return out


def _cifar(depth: int, k: int, bc: bool) -> Variant:
    # Three blocks of (L - 4) / 3 layers; a bottleneck layer holds two convs, so BC halves it.
    per_block = (depth - 4) // (6 if bc else 3)
    return Variant(growth_rate=k, block_config=(per_block,) * 3,
                   num_init_features=2 * k if bc else 16, bn_size=4 if bc else 0,
                   compression=0.5 if bc else 1.0, stem="cifar", num_classes=10, input_size=(3, 32, 32),
                   source=f"Huang et al. 2017, Table 2: DenseNet{'-BC' if bc else ''} (L={depth}, k={k})")


_TABLE1 = "Huang et al. 2017, Table 1; torchvision.models"

VARIANTS: dict[str, Variant] = {
    "densenet121": Variant(32, (6, 12, 24, 16), 64, source=_TABLE1),
    "densenet161": Variant(48, (6, 12, 36, 24), 96, source=_TABLE1),
    "densenet169": Variant(32, (6, 12, 32, 32), 64, source=_TABLE1),
    "densenet201": Variant(32, (6, 12, 48, 32), 64, source=_TABLE1),
    "densenet264": Variant(32, (6, 12, 64, 48), 64, source="Huang et al. 2017, Table 1"),
    "densenet_40_k12": _cifar(40, 12, bc=False),
    "densenet_100_k12": _cifar(100, 12, bc=False),
    "densenet_100_k24": _cifar(100, 24, bc=False),
    "densenet_bc_40_k12": _cifar(40, 12, bc=True),
    # BC-40 with a stride-2 stem: a quarter of the cost on 28 px inputs; `make run`'s model
    # (Fashion-MNIST in minutes on 2 CPU cores, docs/performance.md).
    "densenet_bc_40_k12_s2": dataclasses.replace(_cifar(40, 12, bc=True), stem_stride=2, input_size=(1, 28, 28),
                                                 source="densekit: DenseNet-BC (L=40, k=12), stride-2 stem"),
    "densenet_bc_100_k12": _cifar(100, 12, bc=True),
    "densenet_bc_250_k24": _cifar(250, 24, bc=True),
    "densenet_bc_190_k40": _cifar(190, 40, bc=True),
    # The DenseBlock blog post's "ResNet121 with DenseBlocks", repaired (docs/design.md, "The
    # blog post's hybrid"): its stem and stage widths 16/32/64/128 become per-stage growth
    # rates, all four entries of [6, 12, 24, 16] are used, and stride-2 transitions replace
    # the ignored `stride`.
    "dense_resnet121": Variant((16, 32, 64, 128), (6, 12, 24, 16), 16, stem="resnet", num_classes=10,
                               input_size=(3, 32, 32),
                               source="the DenseBlock blog post's ResNet121 with DenseBlocks, repaired"),
}
