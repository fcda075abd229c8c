"""The 19 VTAB-1k tasks: the one place that knows their ids, groups, class counts and split sizes.

Facts from the task_adaptation data classes as used by the PEFT literature (see
`docs/data.md`). Test sizes follow from the TFDS split sizes and the VTAB split rule.
"""

from __future__ import annotations

from tasks.suites import VTAB1K
from tasks.task import Task

GROUPS: tuple[str, ...] = VTAB1K.groups
SPLITS: tuple[str, ...] = VTAB1K.splits


def _t(
    id: str, group: str, num_classes: int, test_size: int, *aliases: str, rule: str = "label", folder: str = ""
) -> Task:
    return Task(id, group, num_classes, test_size, label_rule=rule, aliases=aliases, folder=folder)


TASKS: tuple[Task, ...] = (
    _t("cifar100", "natural", 100, 10_000, "cifar", "wds_vtab-cifar100", folder="cifar"),
    _t("caltech101", "natural", 102, 6_084, "wds_vtab-caltech101"),
    _t("dtd", "natural", 47, 1_880, "wds_vtab-dtd"),
    _t(
        "flowers102",
        "natural",
        102,
        6_149,
        "oxford_flowers102",
        "flowers",
        "wds_vtab-flowers",
        folder="oxford_flowers102",
    ),
    _t("pets", "natural", 37, 3_669, "oxford_iiit_pet", "oxford_pet", "wds_vtab-pets", folder="oxford_iiit_pet"),
    _t("svhn", "natural", 10, 26_032, "svhn_cropped", "wds_vtab-svhn"),
    _t("sun397", "natural", 397, 21_750, "wds_sun397"),
    _t("camelyon", "specialized", 2, 32_768, "patch_camelyon", "pcam", "wds_vtab-pcam", folder="patch_camelyon"),
    _t("eurosat", "specialized", 10, 5_400, "wds_vtab-eurosat"),
    _t("resisc45", "specialized", 45, 6_300, "wds_vtab-resisc45"),
    _t(
        "retinopathy",
        "specialized",
        5,
        42_670,
        "diabetic_retinopathy",
        "wds_vtab-diabetic_retinopathy",
        rule="grade 0-4",
        folder="diabetic_retinopathy",
    ),
    _t(
        "clevr_count",
        "structured",
        8,
        15_000,
        "clevr_count_all",
        "wds_vtab-clevr_count_all",
        rule="number of objects - 3",
    ),
    _t(
        "clevr_dist",
        "structured",
        6,
        15_000,
        "clevr_closest_object_distance",
        "wds_vtab-clevr_closest_object_distance",
        rule="closest object depth, binned at [0, 8, 8.5, 9, 9.5, 10, 100]",
    ),
    _t(
        "dmlab", "structured", 6, 22_735, "wds_vtab-dmlab", rule="{close, far, very far} x {positive, negative reward}"
    ),
    _t(
        "kitti",
        "structured",
        4,
        711,
        "kitti_closest_vehicle_distance",
        "wds_vtab-kitti_closest_vehicle_distance",
        rule="closest vehicle distance, thresholds [-100, 8, 20, 999]",
    ),
    _t(
        "dsprites_loc",
        "structured",
        16,
        73_728,
        "dsprites_label_x_position",
        "wds_vtab-dsprites_label_x_position",
        rule="x position // 2",
    ),
    _t(
        "dsprites_ori",
        "structured",
        16,
        73_728,
        "dsprites_label_orientation",
        "wds_vtab-dsprites_label_orientation",
        rule="orientation // 2.5",
    ),
    _t(
        "smallnorb_azi",
        "structured",
        18,
        12_150,
        "smallnorb_label_azimuth",
        "wds_vtab-smallnorb_label_azimuth",
        rule="azimuth",
    ),
    _t(
        "smallnorb_ele",
        "structured",
        9,
        12_150,
        "smallnorb_label_elevation",
        "wds_vtab-smallnorb_label_elevation",
        rule="elevation",
    ),
)
