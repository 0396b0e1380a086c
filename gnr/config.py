"""The one typed configuration that flows from the CLI (or the chart's ConfigMap) into the trainer.

A run is fully described by a :class:`RunConfig`. It is built from a preset YAML shipped in
``gnr/presets`` plus overrides (``--set a.b=c`` or named CLI options), validated by pydantic
(unknown keys are errors, so a typo cannot silently do nothing), printed by ``--dry-run``, logged to
MLflow, and rendered by ``gnr submit`` into the chart's ConfigMap. Laptop and cluster runs are the
same code with different values.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gnr.errors import GnrError

METHODS = ("natural", "gradnorm", "gradnorm-fd", "adversarial", "edge")
Method = Literal["natural", "gradnorm", "gradnorm-fd", "adversarial", "edge"]
Activation = Literal["keep", "gelu", "relu", "silu", "softplus"]

# The paper's base learning rates (per 512 images of global batch); PAPER.md §3.
BASE_LR = {"adversarial": 1.25e-3}
DEFAULT_BASE_LR = 6.25e-4


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    source: str = Field("demo", description="'demo' (bundled digits, built on first use), a shard "
                        "directory, a URL prefix (s3://, http(s)://, pipe:) holding <split>-*.tar + <split>.json")
    train_split: str = "train"
    val_split: str = "val"
    num_classes: int = Field(1000, gt=1)
    img_size: int = Field(224, gt=0, description="training crop and model input size")
    eval_resize: int = Field(256, gt=0, description="eval: resize shorter side, then centre-crop img_size")
    workers: int = Field(4, ge=0, description="data loader worker processes per rank")
    shuffle_buffer: int = Field(2000, ge=0)


class ModelConfig(Section):
    name: str = "swin_base_patch4_window7_224"
    pretrained: bool = False
    weights: str | None = Field(None, description="local .pt/.pth/.safetensors state dict to start from")
    act: Activation = "keep"
    drop_path: float = Field(0.0, ge=0.0, lt=1.0)
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra timm.create_model kwargs")
    fast_double_backward: bool = Field(True, description="LayerNorm/GELU/SiLU/BatchNorm2d/Conv2d with explicit "
                                       "double-backward levels (same numbers); false: autograd's own")
    fast_attention: bool = Field(True, description="with fast_double_backward: the SDPA call of timm Attention "
                                 "and Swin WindowAttention too, in forwards that are differentiated twice "
                                 "(explicit levels over keys padded for aligned GEMMs)")


class ObjectiveConfig(Section):
    method: Method = "gradnorm"
    eps: float = Field(4 / 255, gt=0)
    lambda_ce: float = Field(0.8, ge=0)
    lambda_gn: float = Field(1.2, ge=0)
    ramp_epochs: float = Field(5.0, ge=0, description="penalty weight / attack step ramp length")
    fd_step: float | None = Field(None, gt=0, description="gradnorm-fd: finite-difference step h in pixels; "
                                  "default 1e-4 where its passes compute in full fp32, 1e-3 under bf16 or TF32")
    attack: Literal["pgd", "fgsm"] = "pgd"
    attack_steps: int = Field(3, ge=1)
    attack_step_size: float = Field(8 / (3 * 255), gt=0)
    edge_temperature: float = Field(0.5, gt=0)
    edge_alpha_start: float = 1.0
    edge_alpha_slope: float = 0.09
    edge_alpha_max: float = 19.0


class OptimConfig(Section):
    opt: str = "adamw"
    base_lr: float | None = Field(None, gt=0, description="LR per 512 images; default by method")
    weight_decay: float = Field(0.05, ge=0)
    opt_eps: float = Field(1e-8, gt=0)
    batch_size: int = Field(64, gt=0, description="per process, per micro-batch")
    accum_steps: int = Field(1, ge=1)
    clip_grad: float | None = Field(1.0, gt=0)


class ScheduleConfig(Section):
    epochs: int = Field(100, ge=1)
    warmup_epochs: float = Field(5.0, ge=0)
    warmup_lr: float = Field(1e-5, ge=0)
    min_lr: float = Field(1e-5, ge=0)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")


class AugmentConfig(Section):
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float = Field(0.4, ge=0)
    reprob: float = Field(0.25, ge=0, le=1)
    remode: str = "pixel"
    scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = Field(0.5, ge=0, le=1)
    interpolation: str = "bicubic"
    mixup: float = Field(0.8, ge=0)
    cutmix: float = Field(1.0, ge=0)
    mixup_switch_prob: float = Field(0.5, ge=0, le=1)
    smoothing: float = Field(0.1, ge=0, lt=1)


class EmaConfig(Section):
    enabled: bool = True
    decay: float = Field(0.9998, gt=0, lt=1)


class EvalConfig(Section):
    holdout: int = Field(1000, ge=0, description="validation images scored each epoch (EMA model)")
    batch_size: int = Field(100, gt=0)
    eps: float = Field(4 / 255, gt=0)
    pgd_steps: int = Field(10, ge=1)
    pgd_step_size: float = Field(1 / 255, gt=0)


class CheckpointConfig(Section):
    dir: str | None = Field(None, description="local checkpoint root (a PVC on a cluster); default $GNR_HOME/checkpoints")
    every_minutes: float = Field(30.0, gt=0)
    keep_last: int = Field(3, ge=1)


class TrackingConfig(Section):
    uri: str | None = Field(None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI or a local store")
    experiment: str = "gnr"
    run_id: str | None = Field(None, description="resume / attach to this MLflow run")
    run_name: str | None = Field(None, description="default: <method>-<model>-<act>")
    log_every: int = Field(20, ge=1)
    register_as: str | None = Field(None, description="register the logged MLflow model under this name")
    system_metrics: bool = Field(True, description="log MLflow system metrics (CPU, memory, disk, network, "
                                 "GPU) from one process per node")


class RuntimeConfig(Section):
    device: str = "auto"
    amp: Literal["auto", "bf16", "fp16", "none"] = "auto"
    channels_last: bool = True
    compile: bool = False
    seed: int = 0
    deterministic: bool = False


class RunConfig(Section):
    preset: str = "custom"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    ema: EmaConfig = Field(default_factory=EmaConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    @model_validator(mode="after")
    def _consistent(self) -> "RunConfig":
        if self.data.eval_resize < self.data.img_size:
            raise ValueError(f"data.eval_resize ({self.data.eval_resize}) must be >= data.img_size ({self.data.img_size})")
        if self.schedule.min_lr > self.lr(512):
            raise ValueError("schedule.min_lr is above the base learning rate")
        return self

    def lr(self, global_batch: int) -> float:
        """Peak LR, linearly scaled by global batch / 512 (PAPER.md §3)."""
        base = self.optim.base_lr or BASE_LR.get(self.objective.method, DEFAULT_BASE_LR)
        return base * global_batch / 512

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """Dotted-key view (``objective.eps`` -> value), e.g. for MLflow params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and value:
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = value

        walk("", self.model_dump(mode="json"))
        return out


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("gnr.presets").iterdir() if p.name.endswith(".yaml"))


def _read_yaml(text: str, origin: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise GnrError(f"{origin} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise GnrError(f"{origin} must hold a mapping of config sections")
    return data


def load_preset(name: str) -> dict[str, Any]:
    path = resources.files("gnr.presets") / f"{name}.yaml"
    if not path.is_file():
        raise GnrError(f"unknown preset '{name}' (known: {', '.join(preset_names())})")
    data = _read_yaml(path.read_text(), f"preset {name}")
    data.setdefault("preset", name)
    return data


def load_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise GnrError(f"config file not found: {p}")
    return _read_yaml(p.read_text(), str(p))


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``data`` with ``a.b=value`` overrides applied (values parsed as YAML)."""
    out = copy.deepcopy(data)
    items = overrides.items() if isinstance(overrides, dict) else (_split_override(o) for o in overrides)
    for key, value in items:
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise GnrError(f"invalid override '{key}': '{part}' is not a section")
            node = child
        node[leaf] = value
    return out


def _split_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or any(not p for p in key.strip().split(".")):
        raise GnrError(f"invalid override '{text}': expected key=value, e.g. optim.batch_size=128")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def validate(data: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "config"
        raise GnrError(f"invalid config: {where}: {first['msg']}") from None


def build_config(
    preset: str | None = "demo",
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    fields: dict[str, Any] | None = None,
) -> RunConfig:
    """Preset (or config file) <- ``fields`` (named CLI options) <- ``overrides`` (``--set``)."""
    data = load_file(config_file) if config_file else load_preset(preset or "demo")
    data = apply_overrides(data, {k: v for k, v in (fields or {}).items() if v is not None})
    data = apply_overrides(data, overrides or [])
    return validate(data)
