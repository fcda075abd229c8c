"""The suite's JSON files as pydantic models: result files, claim files, decision files (and the metadata of a
pruning stage's candidates file) and a results directory's settings files. Every read and every write of those files is validated against them here, so
the sweep's resume, `leaderboard`, `compare`, `reproduce` and `export` accept and refuse exactly the same files.

The models validate the file's JSON text (`model_validate_json`, strict): a date must be an ISO date and time, a
number a number (never a bool or a string), an enumerated field one of its values. Readers keep the dict that
`json.loads` gives (field order and values as stored), so what is hashed from a record never depends on the
models. Fields that a result written by hand (or by an earlier release of schema 1) may lack are optional, but
never `null` where the runner never writes `null` (`data`, `config.backbone`, ...): a default of None that the
field's type does not admit refuses an explicit `null` and admits absence.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, Json, TypeAdapter, ValidationError, model_validator
from pydantic_core import PydanticCustomError

SCHEMA_VERSION = 1
# The runner's protocols (`benchmark.run.runner.PROTOCOLS`), run modes and statuses a result can carry.
PROTOCOLS = ("final", "tune", "grid")
MODES = ("final", "tune")
STATUSES = ("ok", "failed")
PRUNING_STAGES = ("dense", "rewind", "grid", "final")  # grid: a grid point under a decision from the pretrained model

# May be absent, never null (see the module docstring).
ABSENT: Any = None

Count = Annotated[int, Field(ge=0)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Percentage = Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Name = Annotated[str, Field(min_length=1)]


class Closed(BaseModel):
    """A JSON object whose every field is modelled: an unknown one is refused (a typo, or a file of another kind)."""

    model_config = ConfigDict(strict=True, extra="forbid")


class Open(BaseModel):
    """A JSON object whose other fields are defined elsewhere and kept as they are (each use says why)."""

    model_config = ConfigDict(strict=True, extra="allow")


# -- result files -------------------------------------------------------------------------------------------
class Params(Closed):
    """`PeftModel.param_report()`: parameter counts."""

    tunable: Count
    head: Count
    backbone: Count
    nonzero_tunable: Count


class Recipe(Open):
    """The fields of a method's recipe that readers use; the others are the recipe dataclass's (`methods`), part
    of the run's identity, compared whole when resuming."""

    lr: float = ABSENT
    weight_decay: float = ABSENT
    epochs: Annotated[int, Field(ge=1)] = ABSENT


class MethodConfig(Open):
    """`MethodConfig.to_dict()`: the method's own fields are its own (each method defines them)."""

    recipe: Recipe = ABSENT


class ConfigSelection(Closed):
    lr: float
    weight_decay: float


class ConfigPruning(Closed):
    stage: Literal[PRUNING_STAGES]
    candidate: Name = ABSENT


class RunConfig(Open):
    """`RunSpec.config_dict()`: a run's identity. Open: settings and identity fields are added to it by new options
    (a new `Settings` field, a method's version), and resuming compares it whole; the fields readers use are typed."""

    method: Name = ABSENT
    method_version: Annotated[int, Field(ge=1)] = ABSENT
    task: Name = ABSENT
    seed: int = ABSENT
    protocol: Literal[PROTOCOLS] = ABSENT
    mode: Literal[MODES] = ABSENT
    method_config: MethodConfig = ABSENT
    backbone: Name = ABSENT
    pretrained: bool = ABSENT
    weights: str | None = None
    image_size: Annotated[int, Field(ge=1)] = ABSENT
    budget: Literal["full", "quick"] = ABSENT
    selection: ConfigSelection = ABSENT
    pruning: ConfigPruning = ABSENT
    decisions: dict[str, Sha256] = ABSENT


class Selection(Closed):
    """The grid's winner as a run records it (`Sweep.select`)."""

    lr: float
    weight_decay: float
    val_acc: Percentage = ABSENT
    tuning_seed: int = ABSENT
    grid: list[tuple[float, float, Percentage | None]] = ABSENT
    sha256: Sha256 = ABSENT


class Pruning(Open):
    """A pruning stage's record: open, since a method's candidate `info` (masked counts, scores) is its own."""

    stage: Literal[PRUNING_STAGES]
    candidate: Name = ABSENT
    dense_val_acc: Percentage = ABSENT
    search: list[tuple[Name, Percentage]] = ABSENT
    decision: Sha256 = ABSENT


class Split(Closed):
    name: Name
    size: Count
    sha256: Sha256


class SplitPreprocessing(Closed):
    """What a split's images went through before a batch (`benchmark.data.cache.preprocessing`)."""

    layout: Literal["resize", "center", "shorter"]
    steps: Name
    image_size: Annotated[int, Field(ge=1)]
    interpolation: Name
    resize: Annotated[int, Field(ge=1)] = ABSENT


class Preprocessing(Closed):
    train: SplitPreprocessing
    eval: SplitPreprocessing


class Data(Closed):
    root: str
    train_split: Split
    eval_split: Split
    preprocessing: Preprocessing = ABSENT


class Diagnostics(Closed):
    train: list[dict[str, float]]
    eval: list[dict[str, float]]


class Provenance(Closed):
    git_commit: str | None
    git_dirty: bool | None
    versions: dict[str, str | None]
    device: str = ABSENT
    platform: str = ABSENT


class ResultBase(Closed):
    """What every result file carries; the status decides the rest (`OkResult`, `FailedResult`)."""

    schema_: Literal[SCHEMA_VERSION] = Field(alias="schema")
    method: Name
    task: Name
    group: Name = ABSENT
    seed: int
    protocol: Literal[PROTOCOLS]
    mode: Literal[MODES]
    config: RunConfig
    selection: Selection | None = None
    pruning: Pruning | None = None
    data: Data = ABSENT
    # Diverged runs record their non-finite losses and statistics (written with `allow_nan`).
    train_loss: list[float] = ABSENT
    diagnostics: Diagnostics = ABSENT
    feature_extraction_s: NonNegative | None = None
    train_images_per_s: NonNegative | None = None
    wall_time_s: NonNegative | None = None
    peak_memory_mb: NonNegative = ABSENT
    peak_memory_kind: str = ABSENT
    tunable_state: Name = ABSENT
    started_at: AwareDatetime = ABSENT
    finished_at: AwareDatetime = ABSENT
    provenance: Provenance = ABSENT


class OkResult(ResultBase):
    """A run that trained to the end: its parameter counts, and the accuracy its mode reports."""

    status: Literal["ok"]
    error: None = None
    test_acc: Percentage | None = None
    val_acc: Percentage | None = None
    params: Params

    @model_validator(mode="after")
    def _reports_its_accuracy(self) -> OkResult:
        metric = "test_acc" if self.mode == "final" else "val_acc"
        if getattr(self, metric) is None:
            raise PydanticCustomError(
                "metric_missing", f"its `{metric}` is missing under status ok (a percentage in [0, 100] is required)"
            )
        return self


class FailedResult(ResultBase):
    """A run that crashed or diverged: the cause, and whatever it had recorded when it stopped."""

    status: Literal["failed"]
    error: str = ABSENT
    traceback: str = ABSENT
    test_acc: float | None = None
    val_acc: float | None = None
    params: Params | None = None


RESULT = TypeAdapter(Annotated[OkResult | FailedResult, Field(discriminator="status")])


# -- claim files ----------------------------------------------------------------------------------------------
Instant = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class ClaimOwner(Open):
    """A claim's owner (`benchmark.sweep.claims`). Open: a live claim written by a later release with one more
    field must still read as live, never as corrupt (a corrupt claim is taken over)."""

    host: str | None
    pid: Annotated[int, Field(ge=1)] | None
    user: str | None = None
    slurm_job_id: str | None = None
    slurm_restarts: Count = 0
    started: Instant
    heartbeat: Instant


CLAIM = TypeAdapter(ClaimOwner)


# -- decision files -------------------------------------------------------------------------------------------
Inputs = dict[str, str | None]


class GridAbout(Closed):
    lr: float
    weight_decay: float
    val_acc: Percentage
    tuning_seed: int
    grid: list[tuple[float, float, Percentage | None]]


class GridSelection(Closed):
    """`decisions/grid-selection.json`: the grid's winner."""

    lr: float
    weight_decay: float
    tuning_seed: int
    about: GridAbout
    inputs: Inputs
    sha256: Sha256


class ChoiceAbout(Closed):
    search: list[tuple[Name, Percentage]]


class PruneChoice(Closed):
    """`decisions/<protocol>-prune-choice.json`: the pruning candidate the rewind search chose."""

    candidate: Name
    candidates: Sha256
    about: ChoiceAbout
    inputs: Inputs
    sha256: Sha256


class Candidate(Closed):
    key: Name
    info: dict[str, Any]  # the method's own description of the candidate
    preference: list[float]


class CandidatesMetadata(Closed):
    """The metadata of `decisions/<protocol>-prune-candidates.safetensors` (safetensors metadata is str -> str)."""

    candidates: Json[list[Candidate]]
    inputs: Json[Inputs]
    sha256: Sha256


CANDIDATES = TypeAdapter(CandidatesMetadata)


GRID_SELECTION, PRUNE_CHOICE = TypeAdapter(GridSelection), TypeAdapter(PruneChoice)


def decision_schema(name: str) -> TypeAdapter:
    """The model of the JSON decision file called `name`: `grid-selection.json` or `<protocol>-prune-choice.json`."""
    if name == "grid-selection.json":
        return GRID_SELECTION
    if name.endswith("-prune-choice.json") and name.removesuffix("-prune-choice.json") in PROTOCOLS:
        return PRUNE_CHOICE
    raise ValueError(f"no decision file is called {name!r}")


# -- a results directory's settings ----------------------------------------------------------------------------
class DirectorySettings(Closed):
    """`runs/<method>/<protocol>.settings` (`benchmark.sweep.directory`): what every run of the method and protocol
    in the directory shares, and the sha256 of each task's splits."""

    method: Name
    protocol: Literal[PROTOCOLS]
    config: dict[str, Any]  # a run's identity before any task's values (`benchmark.sweep.resume.identity`)
    data: dict[Name, dict[Name, Sha256]]


SETTINGS = TypeAdapter(DirectorySettings)


# -- errors as one line ---------------------------------------------------------------------------------------
def problem(error: ValidationError) -> str:
    """The first thing wrong with a validated file, as a clause: "its `seed` is 'x' (input should be ...)"."""
    e = error.errors(include_url=False)[0]
    loc = [str(p) for p in e["loc"]]
    kind, value = e["type"], e.get("input")
    under = ""
    if loc and loc[0] in STATUSES:  # the result union's tag, said where the status is why the field is refused
        under = " under status ok" if loc[0] == "ok" and loc[1:2] in (["params"], ["test_acc"], ["val_acc"]) else ""
        loc = loc[1:]
    field = ".".join("schema" if p == "schema_" else p for p in loc)
    if kind == "json_invalid":
        return f"it is not valid JSON ({e['msg'].removeprefix('Invalid JSON: ')})"
    if kind in ("model_type", "dict_type") and not loc:
        return f"it holds a JSON {json_type(value)}, not an object"
    if kind == "missing":
        return f"it has no `{field}`"
    if kind == "extra_forbidden":
        return f"it has an unknown field `{field}`"
    if kind == "union_tag_not_found":
        return "it has no `status`"
    if kind == "union_tag_invalid":
        return f"its `status` is {e['ctx']['tag']!r}, not one of {', '.join(STATUSES)}"
    if field == "schema" and kind == "literal_error":
        return f"it has schema {value!r}, and this version of the suite reads schema {SCHEMA_VERSION}"
    if not loc:
        return e["msg"]
    shown = {None: "null", True: "true", False: "false"}.get(value, repr(value)) if is_scalar(value) else repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return f"its `{field}` is {shown}{under} ({e['msg'][:1].lower()}{e['msg'][1:]})"


def is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, bool)


def json_type(value: Any) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
