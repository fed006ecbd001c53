"""What the batch-inference jobs (infer-latents, evaluate) share: the images they read, the Ray Data actor
pool they run on, and the actor base class that loads a bundle once per actor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

from diffae_core import DiffAE
from diffae_core.performance import tune_for_inference

from . import cluster
from .data import CROPS, SPLITS, ImageData, open_images, source_uri
from .jobkit import JobConfig, option


@dataclass(kw_only=True)
class ImageInput(JobConfig):
    """Settings naming the images a job reads (never flipped: inference and evaluation see them as they are)."""

    data: str = option(help="images: folder | parquet | s3:// URI | shapes[:N] | fashion-mnist[:t10k] | digits",
                       path=source_uri)
    split: str = option("all", choices=SPLITS,
                        help="'heldout': images whose sha1(id) falls below --holdout; 'train': the others")
    holdout: float = option(0.0, help="held-out fraction defining the splits (use the training run's)")
    limit: int | None = option(None, help="use at most this many images (after the split)")
    crop: str = option("center", choices=CROPS, help="'celeba-d2c': the official CelebA crop")
    attributes: str | None = option(None, path=True, help="CSV or CelebA-HQ annotation file joined on the image id")

    def open_images(self, image_size: int) -> ImageData:
        data = open_images(self.data, image_size, split=self.split, holdout=self.holdout, flip=False, crop=self.crop,
                           attributes=self.attributes, s3_endpoint=self.s3_endpoint)
        if self.limit is not None:
            data.dataset = data.dataset.limit(self.limit)
        return data


@dataclass(kw_only=True)
class ActorPool(JobConfig):
    """Settings of the Ray Data actor pool that runs the model."""

    batch_size: int = option(64, help="images per model call")
    concurrency: int = option(1, help="number of model actors")
    num_gpus: float | None = option(None, help="GPUs per actor (default: 1 when the cluster has GPUs, else 0)")
    precision: str = option("fp32", choices=tuple(cluster.PRECISIONS), help="inference precision (bf16/fp16 autocast)")

    def validate(self) -> None:
        if self.batch_size < 1 or self.concurrency < 1:
            raise ValueError(f"batch_size and concurrency must be >= 1, got {self.batch_size}, {self.concurrency}")

    def map(self, dataset: Any, actor: type, gpus: float, **kwargs: Any) -> Any:
        """``dataset.map_batches`` on this pool: ``actor(**kwargs, num_gpus=gpus, precision, endpoint)``."""
        return dataset.map_batches(
            actor, fn_constructor_kwargs={**kwargs, "num_gpus": gpus, "precision": self.precision,
                                          "endpoint": self.s3_endpoint},
            batch_size=self.batch_size, compute=ray.data.ActorPoolStrategy(size=self.concurrency), num_gpus=gpus,
            batch_format="numpy",
        )


class BundleActor:
    """A Ray Data actor holding one bundle's model, loaded once, on the device Ray gave it."""

    def __init__(self, bundle: str, num_gpus: float = 0.0, precision: str = "fp32", endpoint: str | None = None,
                 parts: tuple[str, ...] | None = None) -> None:
        self.device = cluster.inference_device(num_gpus)
        self.model = DiffAE.load(bundle, device=self.device, endpoint=endpoint, parts=parts)
        self.model.inference_dtype = cluster.PRECISIONS[precision]
        tune_for_inference(self.model, self.device, self.model.image_size)

    @staticmethod
    def images(batch: dict[str, Any], device: torch.device) -> torch.Tensor:
        """The batch's ``image`` column as float32 [B,3,S,S] on ``device`` (Ray hands out read-only arrays)."""
        return torch.from_numpy(np.ascontiguousarray(batch["image"], dtype=np.float32)).to(device)
