"""The five FGVC datasets of VPT's table: ids, class counts, split sizes and the layout of VPT's JSON splits.

Facts from `docs/data.md` (FGVC): split sizes as VPT's appendix prints them (train + val is the official
train set, test the official test set); folder names as V-PETL Bench lays VPT's loader out; the image root
each split file's keys are relative to, as VPT's `json_dataset.py` joins them.
"""

from __future__ import annotations

from tasks.task import Task


def _fgvc(
    id: str, title: str, num_classes: int, sizes: tuple[int, int, int], folder: str, image_root: str, *aliases: str
) -> Task:
    train, val, test = sizes
    return Task(
        id,
        "fgvc",
        num_classes,
        test,
        aliases=aliases,
        folder=folder,
        split_sizes={"train": train, "val": val, "test": test},
        suite="fgvc",
        image_root=image_root,
        title=title,
    )


FGVC_TASKS: tuple[Task, ...] = (
    _fgvc("cub", "CUB-200-2011", 200, (5_394, 600, 5_794), "CUB_200_2011", "images",
          "cub200", "cub_200_2011", "caltech_birds2011"),
    _fgvc("nabirds", "NABirds", 555, (21_536, 2_393, 24_633), "nabirds", "images"),
    # Not VTAB-1k's `flowers102` (a 1,000-image subsample of the same dataset): a different task.
    _fgvc("oxfordflowers", "Oxford Flowers", 102, (1_020, 1_020, 6_149), "OxfordFlower", "",
          "oxford_flowers", "oxfordflower"),
    _fgvc("stanforddogs", "Stanford Dogs", 120, (10_800, 1_200, 8_580), "StanfordDogs", "Images",
          "stanford_dogs", "dogs"),
    # Keys are `car_ims/NNNNNN.jpg` (KMnP/vpt#44), relative to the dataset's folder itself.
    _fgvc("stanfordcars", "Stanford Cars", 196, (7_329, 815, 8_041), "StanfordCars", "",
          "stanford_cars", "cars"),
)  # fmt: skip
