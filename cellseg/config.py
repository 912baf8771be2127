"""One pydantic configuration tree for data, model, augmentation, training and tracking.

Loaded from YAML (`load_config`), overridden by CLI options, saved with every run and
into every exported model. Unknown keys and out-of-range values are errors naming the field.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cellseg.errors import CellsegError, in_cwd


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(_Strict):
    """Where the images come from and how they are prepared."""

    path: Optional[str] = Field(None, description="dataset folder with images/ and masks/; None = synthetic")
    semantic_masks: bool = Field(False, description="masks are 3-class (0 bg, 1 cell, 2 edge), not instances")
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    crop_size: int = Field(256, ge=16, le=4096, description="training crop side, px")
    low_percentile: float = Field(1.0, ge=0.0, lt=50.0)
    high_percentile: float = Field(99.8, gt=50.0, le=100.0)
    channel: Optional[int] = Field(
        None, ge=0,
        description="of multi-channel images (stain channels, RGB), train on this one, counted from 0: the nuclear "
        "stain; recorded in the model, which then reads it by default (None: RGB made grey by data.io.colour_to_grey, stain channels refused)",
    )
    invert_bright: bool = Field(False, description="invert bright-background images (brightfield, H&E) after normalisation")
    bright_weight: float = Field(
        1.0, gt=0.0, le=100.0,
        description="how often a bright-background image (brightfield, H&E) is drawn relative to the others "
        "when train.steps_per_epoch draws the crops; 1 = every image equally",
    )
    synth_n: int = Field(48, ge=2, description="images generated when path is None")
    synth_size: int = Field(256, ge=32)
    max_images: Optional[int] = Field(None, ge=2, description="use at most this many images (quick runs)")


class ModelConfig(_Strict):
    """The compressed U-Net. The original method used depth 2 with 32/64/128 channels."""

    depth: int = Field(3, ge=1, le=6, description="pooling levels")
    base_channels: int = Field(32, ge=4, le=256)
    in_channels: Literal[1] = Field(1, description="images are read as one channel (RGB made grey: data.io.colour_to_grey)")
    n_classes: Literal[3] = 3


class TargetConfig(_Strict):
    """3-class targets and the U-Net weight map."""

    boundary_width: int = Field(2, ge=1, le=10, description="boundary class width, px")
    w0: float = Field(10.0, ge=0.0)
    sigma: float = Field(5.0, gt=0.0)
    weight_touching: bool = Field(
        False, description="also apply the border term to boundary-class pixels, where touching cells meet (DSB-style labels)"
    )
    class_balance: Literal["crop", "dataset"] = Field(
        "crop", description="w_c from the class frequencies of each training crop, or fixed from those of the whole training split"
    )


class AugmentConfig(_Strict):
    """Augmentations applied when curriculum learning is off (and in stage 1 without elastic)."""

    flips: bool = True
    rot90: bool = True
    rotate: bool = Field(True, description="rotation by an arbitrary angle, reflect padding")
    mirror_quarters: bool = True
    elastic: bool = False
    elastic_alpha_max: float = Field(50.0, ge=0.0)
    elastic_sigma: float = Field(4.0, gt=0.0, description="Gaussian smoothing of the displacement field, px")
    intensity: bool = True
    scale: float = Field(
        1.0, ge=1.0, le=4.0,
        description="random zoom: each crop is resized by a factor drawn log-uniformly in [1/scale, scale] (1 = off)",
    )


class CurriculumConfig(_Strict):
    """Start without elastic deformation; add it when the monitored metric reaches the threshold."""

    enabled: bool = False
    threshold: float = Field(0.7, gt=0.0, le=1.0)
    metric: Literal["val_iou", "val_seg", "val_map"] = "val_iou"


class ScheduleConfig(_Strict):
    """Piecewise-constant learning rate: `lrs[i]` applies up to and including epoch `until[i]`."""

    until: list[int] = Field(default_factory=lambda: [20, 100, 150, 200, 250, 400])
    lrs: list[float] = Field(default_factory=lambda: [1e-3, 5e-4, 1e-4, 5e-5, 1e-5, 5e-6])

    @model_validator(mode="after")
    def _check(self) -> "ScheduleConfig":
        if len(self.until) != len(self.lrs) or not self.until:
            raise ValueError("until and lrs must be non-empty lists of the same length")
        if any(b <= a for a, b in zip(self.until, self.until[1:])) or self.until[0] < 1:
            raise ValueError("until must be strictly increasing epoch numbers starting at 1 or more")
        if any(not 0 < lr <= 1 for lr in self.lrs):
            raise ValueError("learning rates must be in (0, 1] (Adam; the method starts at 1e-3)")
        return self

    @classmethod
    def parse(cls, text: str) -> "ScheduleConfig":
        """Parse 'EPOCH:LR,EPOCH:LR,...' e.g. '20:1e-3,100:5e-4'."""
        try:
            pairs = [p.split(":") for p in text.split(",") if p.strip()]
            if not pairs:
                raise ValueError("no EPOCH:LR pair")
            return cls(until=[int(e) for e, _ in pairs], lrs=[float(lr) for _, lr in pairs])
        except ValidationError as exc:  # (a ValueError too) the schedule's own checks: its first message
            raise CellsegError(f"--lr-schedule '{text}': {_message(exc.errors()[0])}") from None
        except (ValueError, TypeError) as exc:
            raise CellsegError(f"--lr-schedule '{text}': expected 'EPOCH:LR,EPOCH:LR,...' ({exc})") from None


class PostprocessConfig(_Strict):
    """Post-processing of the validation during training (the scores early stopping and the
    curriculum read). Exported models carry their own values, tuned later by `cellseg tune`."""

    interior_threshold: float = Field(0.5, ge=0.0, le=1.0, description="seed threshold on p(interior)")
    foreground_threshold: float = Field(0.5, ge=0.0, le=1.0, description="threshold on p(interior) + p(boundary)")
    min_size: int = Field(10, ge=0, description="smallest object kept, px")


class EarlyStoppingConfig(_Strict):
    patience: int = Field(10, ge=1)
    metric: Literal["val_iou", "val_seg", "val_map", "val_loss"] = "val_iou"


class TrainConfig(_Strict):
    """Optimisation and loop settings."""

    epochs: int = Field(400, ge=1, le=100_000)  # more is a typo
    batch_size: int = Field(4, ge=1, le=256)
    steps_per_epoch: Optional[int] = Field(None, ge=1, le=10_000_000, description="None = a full pass over the training set")
    val_steps: Optional[int] = Field(None, ge=1, description="validation images per epoch; None = all")
    tiles: Literal[1, 4] = Field(1, description="4 = train on the 2x2 regions of each image")
    weight_decay: float = Field(0.0, ge=0.0)
    ema_decay: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="exponential moving average of the weights (e.g. 0.995), updated every step; validation, "
        "checkpoints' model weights and the exported model use the average; 0 = off",
    )
    seed: int = Field(0, ge=0, le=2**32 - 1)
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    amp: bool = Field(True, description="mixed precision on CUDA")
    workers: int = Field(-1, ge=-1, description="DataLoader workers; -1 = automatic")
    sync_batchnorm: bool = Field(False, description="SyncBatchNorm under DDP")
    overlay_every: int = Field(10, ge=1, description="log validation overlays every K epochs")
    checkpoint_dir: str = "checkpoints"

    @field_validator("tiles", mode="before")
    @classmethod
    def _tiles(cls, v: Any) -> Any:
        if isinstance(v, bool):  # True == 1 to Python: `tiles: true` would silently mean no tiles
            raise ValueError(f"expected 1 or 4, got {_yaml_value(v)}")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", v):
            raise ValueError("device must be auto, cpu, cuda or cuda:N")
        return v


MODEL_NAME_RULE = "a registered model name must be non-empty, not '.' or '..', without quotes, '/', ':' or '@'"


EXPERIMENT_NAME_RULE = "an MLflow experiment name must be non-empty"


def bad_experiment_name(name: str) -> bool:
    """True when MLflow would refuse `name` as an experiment name (it does so only once a run is made)."""
    return not name.strip()


def bad_model_name(name: str) -> bool:
    """True when `name` cannot be a registered model name used in models:/NAME URIs and registry searches."""
    return name.strip() in ("", ".", "..") or re.search(r"['\"/:@\x00-\x1f]", name) is not None


class TrackingConfig(_Strict):
    uri: Optional[str] = Field(None, description="MLflow tracking URI; None = MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    experiment: str = "cellseg"
    run_name: Optional[str] = None
    register_model: bool = Field(False, description="register the best model when training ends")
    model_name: str = "cellseg-unet"
    log_model: bool = Field(True, description="log the best model with mlflow.pytorch at the end")

    @field_validator("model_name")
    @classmethod
    def _model_name(cls, v: str) -> str:
        if bad_model_name(v):
            raise ValueError(MODEL_NAME_RULE)
        return v

    @field_validator("experiment")
    @classmethod
    def _experiment(cls, v: str) -> str:
        if bad_experiment_name(v):
            raise ValueError(EXPERIMENT_NAME_RULE)
        return v


class Config(_Strict):
    """The whole resolved configuration of a training run."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    targets: TargetConfig = Field(default_factory=TargetConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    curriculum: CurriculumConfig = Field(default_factory=CurriculumConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    postprocess: PostprocessConfig = Field(default_factory=PostprocessConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)


_EXPECTED = {"int_type": "a whole number", "float_type": "a number", "bool_type": "true or false", "string_type": "text"}


def _yaml_value(value: Any) -> str:
    """How a YAML reader wrote `value`: true, 5.0, the text '5'."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"the text {value!r}" + (" (quoted?)" if re.fullmatch(r"[-+.\deE_]+", value) else "")
    if isinstance(value, (list, dict)):
        return "a list" if isinstance(value, list) else "keys indented below it"
    return f"{value:g}" if isinstance(value, float) else repr(value)


def _message(err: dict) -> str:
    """A pydantic error's message, without pydantic's 'Value error, ' prefix."""
    if err["type"] in _EXPECTED:  # strict typing of a YAML file: `epochs: true` is not 1, `epochs: "5"` not 5
        return f"expected {_EXPECTED[err['type']]}, got {_yaml_value(err['input'])}"
    if err["type"] == "extra_forbidden":
        key = str(err["loc"][-1]) if err["loc"] else ""
        if "." in key:  # `train.epochs: 5` written flat, as MLflow params and --help name the keys
            section, _, name = key.partition(".")
            return f"unknown key (a dotted name: write it nested, '{section}:' then '  {name}: ...' on the next line)"
        return "unknown key"
    return err["msg"].removeprefix("Value error, ")


def _check_crop(cfg: "Config", where: str) -> "Config":
    """CellsegError when data.crop_size cannot pass the U-Net's poolings (a multiple of 2^depth)."""
    multiple, crop = 2**cfg.model.depth, cfg.data.crop_size
    if crop % multiple:
        lower = crop // multiple * multiple
        choices = f"{lower} or {lower + multiple}" if lower else str(multiple)
        raise CellsegError(f"{where} {crop}: must be a multiple of {multiple} (2^model.depth, the U-Net's "
                           f"{cfg.model.depth} poolings): {choices}")
    return cfg


def _shown(value: Any) -> Any:
    """An option's value as an error shows it: quoted when empty or padded (else it is invisible)."""
    return repr(value) if isinstance(value, str) and (not value or value != value.strip()) else value


def _format_errors(exc: ValidationError, source: str, options: dict[str, str] | None = None,
                   values: dict[str, Any] | None = None) -> str:
    """'SOURCE: invalid config: field: message; ...', or, when every bad field was set by a
    command-line option named in `options`, '--option VALUE: message; ...'."""
    errors = exc.errors()
    locs = [".".join(str(x) for x in err["loc"]) or "(root)" for err in errors]
    if options and values is not None and all(loc in options for loc in locs):
        return "; ".join(f"{options[loc]} {_shown(values[loc])}: {_message(err)}" for loc, err in zip(locs, errors))
    return f"{source}: invalid config: " + "; ".join(f"{loc}: {_message(err)}" for loc, err in zip(locs, errors))


def validate_config(data: dict[str, Any], source: str = "config", strict: bool = False) -> Config:
    """Build a Config from a nested dict; CellsegError listing each bad field. `strict` (YAML
    files) takes no value of another type: `true` or `"5"` is not an epoch count."""
    try:
        cfg = Config.model_validate(data, strict=strict)
    except ValidationError as exc:
        raise CellsegError(_format_errors(exc, source)) from None
    return _check_crop(cfg, f"{source}: data.crop_size")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` merges, and may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # a list or mapping as a key
                raise yaml.constructor.ConstructorError(None, None, f"unusable key {key!r}", key_node.start_mark) from None
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        return super().construct_mapping(node, deep)


# YAML 1.2 floats: PyYAML (YAML 1.1) reads `1e-3` (no dot) as the text '1e-3'
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _where(exc: yaml.YAMLError) -> str:
    """': duplicate key 'train' at line 7' for errors that say what and where."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if problem and mark is not None:
        return f": {problem} at line {mark.line + 1}"
    return f" at line {mark.line + 1}" if mark is not None else ""


def load_config(path: str | Path | None) -> Config:
    """Read a YAML config file (None = defaults)."""
    if path is None:
        return Config()
    path = Path(path)
    if path.is_dir():
        raise CellsegError(f"{path}: is a folder; --config takes a YAML file")
    if not path.exists():  # (a pipe, `--config <(...)`, is read too)
        raise CellsegError(f"{path}: config file not found{in_cwd(path)}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError:
        raise CellsegError(f"{path}: not a text file (a YAML config is UTF-8 text)") from None
    except yaml.YAMLError as exc:
        raise CellsegError(f"{path}: not valid YAML ({exc.__class__.__name__}{_where(exc)})") from None
    if data is None:  # an empty file (or only comments): the defaults
        data = {}
    if not isinstance(data, dict):
        raise CellsegError(f"{path}: config must be a mapping of sections (data, model, train, ...)")
    for section, value in list(data.items()):
        if section not in Config.model_fields:
            continue  # reported as an unknown key
        if value is None:  # `train:` with every key commented out: its defaults, as an empty file
            data[section] = {}
        elif not isinstance(value, dict):
            hint = " (a space missing after ':'?)" if isinstance(value, str) and ":" in value else ""
            raise CellsegError(f"{path}: invalid config: {section}: expected keys indented below it "
                               f"(e.g. '  epochs: 5'), got {value!r}{hint}")
    return validate_config(data, str(path), strict=True)


def apply_overrides(cfg: Config, overrides: dict[str, Any], options: dict[str, str] | None = None) -> Config:
    """Return a copy with dotted-key overrides applied ('train.epochs': 5); None values are skipped.

    `options` ({'train.epochs': '--epochs'}) names the command-line option behind a key, so an
    error about it reads '--epochs 0: ...' rather than naming the config field."""
    data = cfg.model_dump()
    for key, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        raise CellsegError(_format_errors(exc, "options", options, overrides)) from None
    crop_option = (options or {}).get("data.crop_size") if overrides.get("data.crop_size") is not None else None
    return _check_crop(cfg, crop_option or "data.crop_size")


def flatten(cfg: Config) -> dict[str, str]:
    """Flatten to {'train.epochs': '400', ...} for MLflow params."""
    out: dict[str, str] = {}

    def walk(prefix: str, obj: Any) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = str(obj)

    walk("", cfg.model_dump())
    return out


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(), sort_keys=False)
