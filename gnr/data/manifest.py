"""A split's manifest (``<split>.json`` beside its shards) and where the files of a source live.

A source is a shard directory or URL prefix: a local path, ``http(s)://``, ``s3://`` or a ``pipe:``
command prefix. Readers take the shard list and the per-shard sample counts from the manifest
instead of listing a bucket, so an epoch has the same length on every rank and a shard that comes up
short is noticed. A source may also be a brace pattern (``/data/in1k/train-{000000..000009}.tar``):
the manifest is read from its directory and only the shards the pattern names are used.

Remote files are opened with webdataset's ``gopen`` (``http(s)://`` through curl). ``s3://`` goes
through the AWS CLI (``pipe:aws s3 cp URL -``) with the usual AWS credentials from the environment;
set ``AWS_ENDPOINT_URL`` (e.g. ``http://minio:9000``) to read from MinIO or another S3-compatible
server. A ``pipe:`` prefix gets the file name appended, so the location must end the command
(``pipe:curl -s -L https://host/shards/``).
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import braceexpand

from gnr.errors import GnrError

FORMAT = "gnr-shards/1"


def manifest_name(split: str) -> str:
    return f"{split}.json"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


@dataclass(frozen=True)
class Shard:
    name: str
    count: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    split: str
    image: str  # sample key holding the image bytes: "jpg" (original JPEG) or "png"
    classes: tuple[str, ...]  # class names by index (ImageNet: wnids)
    shards: tuple[Shard, ...]
    ids: dict[str, Any] | None = None  # provenance of an --ids selection: source, listed, found
    skipped: tuple[str, ...] = ()  # input files left out because they do not decode as images
    location: str = field(default="", compare=False)  # directory or URL prefix it was read from

    @property
    def total(self) -> int:
        return sum(s.count for s in self.shards)

    @property
    def counts(self) -> list[int]:
        return [s.count for s in self.shards]

    @property
    def urls(self) -> list[str]:
        return [file_url(self.location, s.name) for s in self.shards]

    def to_json(self) -> str:
        data = {"format": FORMAT, "split": self.split, "total": self.total, "image": self.image,
                "shards": [asdict(s) for s in self.shards], "classes": list(self.classes)}
        if self.ids is not None:
            data["ids"] = self.ids
        if self.skipped:
            data["skipped"] = list(self.skipped)
        return json.dumps(data, indent=1) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], location: str) -> Manifest:
        return cls(split=data["split"], image=data["image"], classes=tuple(data["classes"]),
                   shards=tuple(Shard(**s) for s in data["shards"]), ids=data.get("ids"),
                   skipped=tuple(data.get("skipped", ())), location=location)


def file_url(location: str, name: str) -> str:
    """The URL of file `name` under `location`, as webdataset's gopen opens it."""
    joined = f"{location.rstrip('/')}/{name}"
    return _aws_pipe(joined) if joined.startswith("s3://") else joined


def _aws_pipe(s3_url: str) -> str:
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    option = f"--endpoint-url {shlex.quote(endpoint)} " if endpoint else ""
    return f"pipe:aws s3 cp --only-show-errors {option}{shlex.quote(s3_url)} -"


def read_manifest(source: str, split: str) -> Manifest:
    """The manifest of `split` under `source`, keeping only the shards a brace pattern selects."""
    import webdataset as wds

    location, selected = _split_pattern(source)
    url = file_url(location, manifest_name(split))
    try:
        with wds.gopen(url) as stream:
            data = json.load(stream)
        manifest = Manifest.from_dict(data, location)
    except FileNotFoundError:
        raise GnrError(f"no {split} shards at {location}: {manifest_name(split)} not found "
                       "(write them with `gnr data imagefolder` or `gnr data demo`)") from None
    except (KeyError, TypeError, ValueError) as e:
        raise GnrError(f"{url} is not a gnr shard manifest ({type(e).__name__}: {e})") from None
    except OSError as e:
        raise GnrError(f"cannot read {url}: {e}") from None
    if selected is not None:
        manifest = replace(manifest, shards=tuple(s for s in manifest.shards if s.name in selected))
        if not manifest.shards:
            raise GnrError(f"{source} names none of the {split} shards listed in {url}")
    if manifest.total == 0:
        raise GnrError(f"the {split} shards at {location} hold no samples")
    return manifest


def _split_pattern(source: str) -> tuple[str, set[str] | None]:
    """(location, shard file names a brace pattern selects, or None for all of them)."""
    if "{" not in source:
        return source, None
    location, _, pattern = source.rpartition("/")
    if "{" in location:
        raise GnrError(f"brace patterns may only name shard files, not directories: {source}")
    return location, set(braceexpand.braceexpand(pattern))
