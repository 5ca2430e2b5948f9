"""Run manifests: typed config loaded with omegaconf, validated before any work starts.

A manifest is YAML (loaded safely by omegaconf; no object construction) with the sections below.
Unknown keys and wrong types fail at load time with the offending key's full path, including the
per-stage ``params`` which each stage declares as a dataclass.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from groundmill.media import STORED_FORMATS
from groundmill.stages import REGISTRY, stage_class
from groundmill.stages.base import LOADED_FIELDS, ModelSpec, Resources


class ConfigError(ValueError):
    """A manifest or override is invalid; the message names the key."""


# Keys whose values are masked wherever the config is recorded or echoed (`*_env` keys name a variable).
# Token counts (`max_new_tokens`) and tokenizers are settings, not secrets: they must stay visible
# (a derived run hashes them to decide what reruns).
SECRET_KEY = re.compile(
    r"secret|passw|token(?!s|izer)|credential|api_?key|access_?key|private_?key", re.IGNORECASE
)
MASK = "***"


def is_secret_key(dotted: str) -> bool:
    name = dotted.rsplit(".", 1)[-1]
    return bool(SECRET_KEY.search(name)) and not name.endswith("_env")


def mask_override(arg: str) -> str:
    """`key=value` with the value masked when the key looks secret; other arguments unchanged."""
    key, sep, _ = arg.partition("=")
    return f"{key}={MASK}" if sep and not key.startswith("-") and is_secret_key(key) else arg


@dataclass
class StageConfig:
    type: str | None = None  # the stage class's registry name; defaults to this stage's key
    enabled: bool = True
    model: ModelSpec = field(default_factory=ModelSpec)
    resources: Resources = field(default_factory=Resources)
    # A mapping in the manifest; replaced by an instance of the stage's Params dataclass on validation.
    params: Any = field(default_factory=dict)
    # Consecutive stages naming the same group (a key of `groups`) share one actor pool with the
    # group's resources: one process loads all their models and a batch passes through them in
    # memory. On small machines this saves a process (torch import, model copy) per stage; on GPUs,
    # give heavy stages their own pools. `resources.batch_size` still sets each stage's batches.
    group: str | None = None


@dataclass
class OutputConfig:
    dir: str = "out/run"
    shard_max_samples: int = 256
    shard_max_mb: int = 512
    # Every stored image is re-encoded to this format (jpg: quality 95; png: lossless) so each image
    # shard holds one extension, which Hugging Face `datasets` and Ray's read_webdataset need.
    image_format: str = "jpg"


@dataclass
class LimitsConfig:
    max_file_mb: int = 1024
    max_image_pixels: int = 100_000_000  # larger images are refused as decompression bombs
    max_side: int = (
        4096  # longer image sides are downscaled (recorded in the record); longer video sides refused
    )
    # Videos are stored as they are, so these refuse rather than shrink (media.VideoLimits):
    max_video_frames: int = 18_000  # decoded frames
    max_video_seconds: float = 1800.0
    max_video_pixels: int = (
        40_000_000_000  # frames x width x height (each frame also within max_image_pixels)
    )


@dataclass
class LoadConfig:
    batch_size: int = 8  # inputs read, hashed and normalised per task
    num_cpus: float = 1.0
    follow_links: bool = False  # follow symlinks in input folders that point outside them (never loops)


@dataclass
class VideoConfig:
    keyframes: int = 4  # dense keyframes the image stages annotate
    sparse_frames: int = 16  # sparse context frames (timestamps recorded for trainers)
    fps: float = 0.0  # > 0: consider at most this many frames per second (by timestamp); 0: all
    stride: int = 1  # then consider every n-th of those
    max_frames: int = 0  # then at most this many (0: no cap); tracking covers exactly these frames

    def __post_init__(self) -> None:
        for key, ok in (
            ("fps", self.fps >= 0),
            ("stride", self.stride >= 1),
            ("max_frames", self.max_frames >= 0),
        ):
            if not ok:
                raise ConfigError(f"key 'video.{key}': {getattr(self, key)!r} is out of range")


@dataclass
class RayConfig:
    address: str | None = None  # None: start an embedded local Ray; "auto" or "host:port": join a cluster
    num_cpus: int | None = None  # embedded Ray only
    max_errored_blocks: int = 0  # per-sample errors never fail blocks; this guards infrastructure faults


@dataclass
class RunConfig:
    name: str = "groundmill"
    seed: int = 0
    # Pending inputs go through one Ray Dataset per this many: Ray Data keeps per-block stats on the
    # driver until a Dataset ends (ray-project/ray#66016), ~100 KB per load batch measured here, so
    # one Dataset over millions of inputs grows the driver without bound. The model actors outlive
    # the Datasets (long-lived pools, pipeline/graph.py:start_pools), so a boundary costs no reload.
    inputs_per_dataset: int = 20_000


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    inputs: list[str] = field(default_factory=list)  # folders, globs, .jsonl/.parquet lists, .tar shards
    output: OutputConfig = field(default_factory=OutputConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    load: LoadConfig = field(default_factory=LoadConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    stages: dict[str, StageConfig] = field(default_factory=dict)
    groups: dict[str, Resources] = field(default_factory=dict)  # see StageConfig.group


@dataclass
class Segment:
    """One operator of the Ray graph: a stage alone, or the consecutive stages of a group."""

    name: str
    stages: dict[str, StageConfig]
    resources: Resources

    def stage_resources(self, name: str) -> Resources:
        """What stage `name` runs with: its own batch size, and the devices of the actor it runs in
        (a group's, for a member of a group), so its model lands on the GPU the actor was given."""
        own = self.stages[name].resources
        if self.stages[name].group is None:
            return own
        shared = self.resources
        return dataclasses.replace(shared, batch_size=own.batch_size)

    @property
    def uses_model(self) -> bool:
        """Whether any of its stages loads a model: then it runs as an actor pool, else as tasks."""
        return any(stage_class(s.type or n).uses_model for n, s in self.stages.items())


def segments(cfg: Config) -> list[Segment]:
    """The enabled stages in order, consecutive members of a group merged into one segment."""
    out: list[Segment] = []
    for name, stage in cfg.stages.items():
        if not stage.enabled:
            continue
        if stage.group is not None and out and out[-1].name == stage.group:
            out[-1].stages[name] = stage
            continue
        if stage.group is not None and any(seg.name == stage.group for seg in out):
            raise ConfigError(
                f"key 'stages.{name}.group': the stages of group {stage.group!r} must follow one another"
            )
        key = stage.group if stage.group is not None else name
        out.append(Segment(key, {name: stage}, cfg.groups[stage.group] if stage.group else stage.resources))
    return out


def _merge(base: DictConfig, other: Any, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{where}: key '{e.full_key}': {e.msg}") from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Manifest + dotted overrides -> validated Config (stage params included)."""
    conf = OmegaConf.structured(Config)
    if path is not None:
        try:
            raw = OmegaConf.load(path)
        except (OmegaConfBaseException, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: {e}") from None
        except OSError as e:
            raise ConfigError(f"cannot read manifest {path}: {e.strerror}") from None
        if not isinstance(raw, DictConfig):
            raise ConfigError(f"{path}: a manifest must be a mapping, not {type(raw).__name__}")
        conf = _merge(conf, raw, str(path))
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {mask_override(bad[0])!r} is not key=value")
        try:
            conf = _merge(conf, OmegaConf.from_dotlist(overrides), "overrides")
        except ConfigError as e:
            raise ConfigError(_mask_values(str(e), overrides)) from None
    try:
        cfg: Config = OmegaConf.to_object(conf)  # resolves interpolations: a bad one fails here
    except OmegaConfBaseException as e:
        raise ConfigError(f"key '{e.full_key}': {e.msg}") from None
    validate(cfg)
    # What run.json records: interpolations as written, so ${oc.env:SECRET} never reaches an output.
    object.__setattr__(cfg, "_interpolations", _interpolations(OmegaConf.to_container(conf, resolve=False)))
    return cfg


def _mask_values(message: str, overrides: list[str]) -> str:
    for arg in overrides:
        key, _, value = arg.partition("=")
        if value and is_secret_key(key):
            message = message.replace(value, MASK)
    return message


def _interpolations(data: Any, prefix: str = "") -> dict[str, str]:
    """Dotted key -> the unresolved `${...}` text, for every interpolated value of a config."""
    if isinstance(data, dict):
        return {
            k: v for key, value in data.items() for k, v in _interpolations(value, f"{prefix}{key}.").items()
        }
    if isinstance(data, list):
        return {
            k: v for i, value in enumerate(data) for k, v in _interpolations(value, f"{prefix}{i}.").items()
        }
    return {prefix.rstrip("."): data} if isinstance(data, str) and "${" in data else {}


def validate(cfg: Config) -> None:
    if not cfg.inputs:
        raise ConfigError("key 'inputs': no inputs given (set them in the manifest or with --input)")
    if cfg.output.shard_max_samples < 1:
        raise ConfigError("key 'output.shard_max_samples': must be >= 1")
    if cfg.output.image_format not in STORED_FORMATS:
        raise ConfigError(
            f"key 'output.image_format': {cfg.output.image_format!r} is not one of {sorted(STORED_FORMATS)}"
        )
    if cfg.run.inputs_per_dataset < 1:
        raise ConfigError("key 'run.inputs_per_dataset': must be >= 1")
    for name, stage in cfg.stages.items():
        where = f"stages.{name}"
        try:
            cls = stage_class(stage.type or name)
        except KeyError as e:
            raise ConfigError(f"key '{where}.type': {e.args[0]}") from None
        _check_resources(stage.resources, f"{where}.resources")
        if stage.group is not None and stage.group not in cfg.groups:
            raise ConfigError(f"key '{where}.group': no group {stage.group!r} under 'groups'")
        if stage.model.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(
                f"key '{where}.model.dtype': {stage.model.dtype!r} is not float32/bfloat16/float16"
            )
        stage.params = stage_params(cls, stage.params, where)
    check_order(cfg)
    for name, resources in cfg.groups.items():
        if name in cfg.stages:
            raise ConfigError(f"key 'groups.{name}': a group cannot share its name with a stage")
        _check_resources(resources, f"groups.{name}")
    segments(cfg)  # groups split by other stages fail here


def _writers(name: str) -> list[str]:
    """Registered stage types that declare they write `name`."""
    return sorted(n for n in REGISTRY if name in stage_class(n).provides)


def check_order(cfg: Config) -> None:
    """Every enabled stage's `requires` is written by the loader or an earlier enabled stage, and no
    field it `uses` is written only by a later one; the error names both stages and the field."""
    stages = [(n, s, stage_class(s.type or n)) for n, s in cfg.stages.items() if s.enabled]
    for i, (name, _, cls) in enumerate(stages):
        earlier = {f for _, _, c in stages[:i] for f in c.provides} | set(LOADED_FIELDS)
        later = {f: n for n, _, c in reversed(stages[i + 1 :]) for f in c.provides}
        for key in cls.requires:
            if key in earlier:
                continue
            if key in later:
                raise ConfigError(
                    f"key 'stages.{name}': it requires '{key}', which stage {later[key]!r} writes "
                    f"after it: move {later[key]!r} before {name!r}"
                )
            raise ConfigError(
                f"key 'stages.{name}': it requires '{key}', which no earlier stage writes "
                f"(add one of the stage types {_writers(key)} before {name!r})"
            )
        for key in cls.uses:
            if key in later and key not in earlier:
                raise ConfigError(
                    f"key 'stages.{name}': it reads '{key}', which stage {later[key]!r} writes after "
                    f"it: move {later[key]!r} before {name!r}"
                )


def _check_resources(r: Resources, where: str) -> None:
    if r.batch_size < 1 or r.min_actors < 1 or r.max_actors < r.min_actors:
        raise ConfigError(f"key '{where}': need batch_size >= 1 and 1 <= min_actors <= max_actors")


def stage_params(cls: type, params: dict[str, Any], where: str) -> Any:
    """A stage's params dict -> an instance of its Params dataclass (unknown keys / bad types fail)."""
    merged = _merge(OmegaConf.structured(cls.Params), params, where + ".params")
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{where}.params: key '{e.full_key}': {e.msg}") from None
    except ValueError as e:  # a Params.__post_init__ range check: ValueError(param, reason)
        param, reason = e.args if len(e.args) == 2 else ("", str(e))
        raise ConfigError(f"key '{where}.params.{param}': {reason}") from None


def to_container(cfg: Config) -> dict[str, Any]:
    """The resolved config as plain data."""
    return dataclasses.asdict(cfg)


def recorded_config(cfg: Config) -> dict[str, Any]:
    """The config as run.json records it: interpolations unresolved (as written in the manifest),
    values of secret-looking keys masked."""
    data = to_container(cfg)
    for dotted, text in getattr(cfg, "_interpolations", {}).items():
        *parents, leaf = dotted.split(".")
        node = data
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[int(leaf) if isinstance(node, list) else leaf] = text
    return _masked(data)


def _masked(data: Any, prefix: str = "") -> Any:
    if isinstance(data, dict):
        return {
            k: MASK if is_secret_key(f"{prefix}{k}") and v not in (None, "") else _masked(v, f"{prefix}{k}.")
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [_masked(v, prefix) for v in data]
    return data


def _substitute(subs: list[dict[str, Any]], key: str, obj: Any, attr: str, value: Any) -> None:
    if getattr(obj, attr) != value:
        subs.append({"key": key, "from": getattr(obj, attr), "to": value})
        setattr(obj, attr, value)


CPU_GROUP = "cpu"


def apply_cpu(cfg: Config, local_cpus: float) -> list[dict[str, Any]]:
    """`groundmill run --cpu`: run a GPU manifest unchanged on a machine without GPUs; returns each
    substitution made (`key`, `from`, `to`), which the run record lists.

    - GPU requests are dropped, GPU dtypes become float32 and every model's device is `cpu` (LLM
      backends on `auto` would take a visible GPU even without a GPU request);
    - LLM stages on vLLM (GPU only) use the transformers backend with the same model id;
    - every stage joins one actor pool (README, "Groups"): a dozen GPU-sized pools each importing
      torch and holding its model do not fit a small CPU machine; `local_cpus` sizes that pool.
    Groups change speed, not annotations; dtypes and the LLM backend can, and resuming a `--cpu`
    output without `--cpu` is refused as a change of settings.
    """
    subs: list[dict[str, Any]] = []
    for name, stage in cfg.stages.items():
        where = f"stages.{name}"
        _substitute(subs, f"{where}.resources.num_gpus", stage.resources, "num_gpus", 0.0)
        _substitute(subs, f"{where}.model.dtype", stage.model, "dtype", "float32")
        _substitute(subs, f"{where}.model.device", stage.model, "device", "cpu")  # auto may find a GPU
        llm = getattr(stage.params, "llm", None)
        if llm is not None and llm.backend == "vllm":
            _substitute(subs, f"{where}.params.llm.backend", llm, "backend", "transformers")
    group = CPU_GROUP if CPU_GROUP not in cfg.stages else f"{CPU_GROUP}_pool"
    actors = max(1, int(local_cpus // 2))  # one torch process per 2 cores
    cfg.groups[group] = Resources(num_cpus=0.5, num_gpus=0.0, batch_size=4, min_actors=1, max_actors=actors)
    for name, stage in cfg.stages.items():
        _substitute(subs, f"stages.{name}.group", stage, "group", group)
    subs.append({"key": f"groups.{group}", "from": None, "to": dataclasses.asdict(cfg.groups[group])})
    return subs
