"""Where each FGVC dataset's files come from, and on what terms: one table, and the advice built from it.

Facts from `docs/data.md` (FGVC: split files, images). VPT's own links to its split files are dead (KMnP/vpt#52, #67,
#72); the live copy is the Hugging Face dataset `XiN0919/FGVC` that V-PETL Bench links, which also holds
an archive of each dataset's images. Images are never re-hosted by this project: every dataset is for
non-commercial research only, under its owners' terms, and each user fetches it from its source.
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks.task import Task

SPLITS_REPO = "XiN0919/FGVC"
SPLITS_URL = f"https://huggingface.co/datasets/{SPLITS_REPO}"
SPLITS_ARCHIVE = "json.zip"
SPLIT_COPY = f"VPT's split files are expected ({SPLITS_ARCHIVE} of the Hugging Face dataset {SPLITS_REPO})"


@dataclass(frozen=True)
class DatasetSource:
    """Where one FGVC dataset's images come from.

    Attributes:
        task: the task id.
        official: the dataset's official download page ("" when there is none any more).
        files: what to fetch there.
        mirror: the archive of its images in `XiN0919/FGVC`.
        licence: the terms its images are under.
    """

    task: str
    official: str
    files: str
    mirror: str
    licence: str


FGVC_SOURCES: dict[str, DatasetSource] = {
    s.task: s
    for s in (
        DatasetSource(
            "cub",
            "https://data.caltech.edu/records/65de6-vp158",
            "CUB_200_2011.tgz",
            "CUB_200_2011.tgz",
            "non-commercial research and education only; images from Flickr, copyright their owners",
        ),
        DatasetSource(
            "nabirds",
            "https://dl.allaboutbirds.org/nabirds",
            "nabirds.tar.gz (after accepting the Cornell Lab of Ornithology's terms of use)",
            "nabirds.tar.gz",
            "non-commercial research only, under the Cornell Lab of Ornithology's terms of use",
        ),
        DatasetSource(
            "oxfordflowers",
            "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/",
            "102flowers.tgz (the jpg/ folder)",
            "102flowers.tgz",
            "non-commercial research only; images collected from the web, copyright their owners",
        ),
        DatasetSource(
            "stanforddogs",
            "http://vision.stanford.edu/aditya86/ImageNetDogs/",
            "images.tar (the Images/ folder)",
            "images.tar",
            "non-commercial research and education only, under ImageNet's terms of access",
        ),
        DatasetSource(
            "stanfordcars",
            "",  # ai.stanford.edu/~jkrause is gone (pytorch/vision#7545)
            "car_ims.tgz and cars_annos.mat: the car_ims/ layout with 6-digit ids, not Kaggle's cars_train/",
            "car_ims.tgz and cars_annos.mat",
            "non-commercial research only; images collected from the web, copyright their owners",
        ),
    )
}

# Stanford Cars as Kaggle ships it (`cars_train/`, `cars_test/`, 5-digit ids): VPT's split files name
# `car_ims/NNNNNN.jpg` (KMnP/vpt#44), so no renaming makes the two agree.
KAGGLE_CARS_DIRS = ("cars_train", "cars_test")


def images_from(task: Task) -> str:
    """Where `task`'s images come from, where they go, and their terms, in one clause."""
    s = FGVC_SOURCES[task.id]
    where = f"{task.folder}/{task.image_root}/" if task.image_root else f"{task.folder}/ as the split files name them"
    origin = (
        f"{s.official} or {s.mirror} of {SPLITS_URL}" if s.official else f"{SPLITS_URL} (the original site is gone)"
    )
    return f"get {task.title}'s images ({s.files}) from {origin} and unpack them under {where}; licence: {s.licence}"


def splits_from(task: Task) -> str:
    """Where `task`'s split files come from, in one clause."""
    return f"get its train.json, val.json, test.json (VPT's splits) from {SPLITS_ARCHIVE} of {SPLITS_URL}"


def where_to_get(task: Task) -> str:
    """Where `task`'s images and split files come from, and the images' terms, in one clause."""
    return f"{splits_from(task)}; {images_from(task)}"


def kaggle_cars(task: Task, dir_names: set[str]) -> str | None:
    """Why a Stanford Cars copy with the folders `dir_names` (lower case) is the wrong one, if it is."""
    if task.id != "stanfordcars" or "car_ims" in dir_names or not dir_names & set(KAGGLE_CARS_DIRS):
        return None
    return (
        "this is the Kaggle layout of Stanford Cars (cars_train/, cars_test/, 5-digit ids), but VPT's split files "
        f"name car_ims/NNNNNN.jpg; fetch car_ims.tgz and cars_annos.mat from {SPLITS_URL} and unpack car_ims/ "
        f"into {task.folder}/"
    )
