"""Shared fixtures: a tiny offline ViT, synthetic VTAB-1k folders, an isolated image cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from tasks import get_task
from tasks.synth import SynthConfig, write_task

# The synthetic tasks the end-to-end tests train on: 2 and 10 classes.
E2E_TASKS = ("camelyon", "svhn")
TINY_ARGS = ["--backbone", "test_vit", "--no-pretrained", "--image-size", "32", "--quiet"]


def argv(command: str, *extra: str) -> list[str]:
    """CLI arguments: `command` split on spaces, then the tiny offline backbone, then `extra` (later wins)."""
    return [*command.split(), *TINY_ARGS, *extra]


def tiny_vit(seed: int = 0) -> VisionTransformer:
    """A 3-block ViT on 32-px images with an 4×4 patch grid: small enough for many CPU builds per test."""
    torch.manual_seed(seed)
    return VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, mlp_ratio=2.0, num_classes=0
    )


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["PEFT_BENCH_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def fgvc_synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic FGVC Oxford Flowers in VPT's layout (102 classes; one training image per class)."""
    from tasks.synth_fgvc import write_fgvc_task

    root = tmp_path_factory.mktemp("fgvc-synth")
    write_fgvc_task(root, get_task("oxfordflowers"), SynthConfig(per_class=1, image_size=24, seed=0))
    return root


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic camelyon and svhn in the community layout (16 train images per class)."""
    root = tmp_path_factory.mktemp("synth")
    for task in E2E_TASKS:
        write_task(root, get_task(task), SynthConfig(per_class=16, image_size=32, seed=0))
    return root
