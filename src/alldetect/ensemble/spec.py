"""``ensemble.json``, the spec of an ensemble folder (see ``folder``): members, preprocessing, fitted combiners
and their operating points, default method, TTA, and the hashes of every file it vouches for. It is validated
when it is read: a damaged or hand-edited file is one line naming the field."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath


from ..choices import Colour
from ..data.geometry import Preprocess
from ..errors import AlldetectError
from ..formats.operating_point import PAPER_POINT, OperatingPoint
from .combiners import Combiner, FieldError, combiner_from_json

logger = logging.getLogger(__name__)
SPEC_FORMAT = "alldetect-ensemble"
SPEC_VERSION = 3
READABLE_VERSIONS = (2, 3)  # 2: one weights file per member and no operating points (the paper's 0.5)
DEFAULT_METHOD = "wen_kappa"  # the paper's proposed model


class SpecError(AlldetectError):
    """An ensemble folder that cannot be used as it is."""


@dataclass(frozen=True)
class MemberEntry:
    name: str
    weights: list[str]            # safetensors files relative to the folder: one, or one per fold model
    sha256: list[str]             # of each weights file
    crop: int
    input_size: int | None
    mean: list[float] = field(default_factory=list)  # the normalisation the member applies to [0, 1] pixels
    std: list[float] = field(default_factory=list)
    colour: str = Colour.imagenet.value  # choices.Colour: with mean/std (imagenet) or each cell's own colour
    best_epoch: int | None = None
    provenance: dict = field(default_factory=dict)  # information only: run folder, manifest, training config

    @property
    def record_dirs(self) -> list[str]:
        """The folders of the training records, one per weights file."""
        return [str(PurePosixPath(w).parent) for w in self.weights]

    @property
    def folds(self) -> int:
        return len(self.weights)

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(self.crop, self.input_size, self.colour)


@dataclass
class EnsembleSpec:
    members: list[MemberEntry]
    methods: dict[str, Combiner]
    default_method: str
    data: dict
    val_metrics: dict = field(default_factory=dict)
    tta: bool = False             # combiners were fitted on test-time-augmented probabilities; score with TTA
    bf16: dict | None = None      # the bf16 check: each member's mean change and those that run in fp32
    versions: dict = field(default_factory=dict)
    operating_points: dict[str, OperatingPoint] = field(default_factory=dict)  # per method; missing: the paper's
    cross_fitted: bool = False    # members trained on K folds of donors; val predictions are out of fold
    graphs: dict[str, str] = field(default_factory=dict)  # exported ONNX graph in the folder -> its sha256
    domain: str | None = None     # sha256 of domain.json, the domain check's reference; None: no check
    # whether the alldetect that wrote the spec recorded graph hashes: a spec with a "graphs" field or a domain
    # hash (which came later) did; one with neither was written before, and its graphs have no hash to check
    hashes_graphs: bool = True
    site: list[dict] = field(default_factory=list)  # each adaptation or calibration to a site, in order (information)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    @property
    def preprocess(self) -> Preprocess:
        """How every member's input is made (the members agree on it)."""
        return self.members[0].preprocess

    def fit(self, method: str) -> Combiner:
        if method not in self.methods:
            raise AlldetectError(f"method {method!r} is not in this ensemble; it has {', '.join(self.methods)}")
        return self.methods[method]

    def operating_point(self, method: str | None = None) -> OperatingPoint:
        """The calls ``method`` (default: the default method) makes: fitted, or the paper's 0.5."""
        return self.operating_points.get(method or self.default_method, PAPER_POINT)

    def to_json(self) -> dict:
        return {"format": SPEC_FORMAT, "version": SPEC_VERSION, "members": [asdict(m) for m in self.members],
                "preprocess": self.preprocess.to_json(),
                "methods": {k: v.to_json() for k, v in self.methods.items()}, "default_method": self.default_method,
                "operating_points": {k: v.to_json() for k, v in self.operating_points.items()},
                "cross_fitted": self.cross_fitted, "graphs": self.graphs, "domain": self.domain, "tta": self.tta,
                "bf16": self.bf16, "site": self.site,
                "data": self.data,
                "val_metrics": self.val_metrics, "versions": self.versions}

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), indent=2).encode()


def parse_spec(data: bytes, path: Path) -> EnsembleSpec:
    """Validate the bytes of ``ensemble.json`` read from ``path``; every problem is one line naming the file and
    the field."""
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SpecError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise SpecError(f"{path}: not an alldetect ensemble spec (JSON nested too deeply to read)") from None
    if not isinstance(raw, dict) or raw.get("format") != SPEC_FORMAT:
        raise SpecError(f"{path}: not an alldetect ensemble spec")
    if raw.get("version") == 1:
        raise SpecError(f"{path}: made by an earlier alldetect whose ensembles point at member checkpoints outside "
                        "the folder; rebuild it as a self-contained folder with `alldetect ensemble RUN_DIR... "
                        f"--out {path.parent}`")
    if raw.get("version") not in READABLE_VERSIONS:
        raise SpecError(f"{path}: version {raw.get('version')!r} is not one this alldetect reads "
                        f"({', '.join(map(str, READABLE_VERSIONS))})")
    return _validated(raw, path)


def _validated(raw: dict, path: Path) -> EnsembleSpec:
    from ..models import member_spec

    def need(obj: dict, key: str, kind: type | tuple, where: str):
        if key not in obj:
            raise SpecError(f"{path}: missing field {where}{key}")
        value = obj[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise SpecError(f"{path}: field {where}{key} is {value!r}, not {_kind_name(kind)}")
        return value

    entries = need(raw, "members", list, "")
    if not entries:
        raise SpecError(f"{path}: field members is empty")
    members = []
    for i, entry in enumerate(entries):
        where = f"members[{i}]."
        if not isinstance(entry, dict):
            raise SpecError(f"{path}: field members[{i}] is not an object")
        name = need(entry, "name", str, where)
        try:
            member_spec(name)
        except AlldetectError as e:
            raise SpecError(f"{path}: field {where}name: {e}") from None
        weights, hashes = need(entry, "weights", (str, list), where), need(entry, "sha256", (str, list), where)
        weights = [weights] if isinstance(weights, str) else weights  # version 2: one file, one hash
        hashes = [hashes] if isinstance(hashes, str) else hashes
        for file in weights:
            if not isinstance(file, str) or PurePosixPath(file).is_absolute() or ".." in PurePosixPath(file).parts \
                    or "\\" in file:
                raise SpecError(f"{path}: field {where}weights {file!r} must be a path inside the folder")
        if not weights or len(hashes) != len(weights) or not all(isinstance(h, str) for h in hashes):
            raise SpecError(f"{path}: field {where}weights/sha256 must be as many file names as hashes")
        crop = need(entry, "crop", int, where)
        input_size = entry.get("input_size")
        if crop < 1 or input_size is not None and (not isinstance(input_size, int) or input_size < 1):
            raise SpecError(f"{path}: field {where}crop/input_size ({crop!r}, {input_size!r}) must be positive "
                            "whole numbers")
        colour = entry.get("colour", Colour.imagenet.value)  # written before colour had a choice: imagenet
        if colour not in Colour.values():
            raise SpecError(f"{path}: field {where}colour {colour!r} is not one of {', '.join(Colour.values())}")
        members.append(MemberEntry(name, weights, hashes, crop, input_size,
                                   entry.get("mean") or [], entry.get("std") or [], colour, entry.get("best_epoch"),
                                   entry.get("provenance") or {}))
    if len({m.preprocess for m in members}) > 1:
        raise SpecError(f"{path}: members disagree on crop/input_size/colour")
    if "preprocess" in raw and _preprocess(raw["preprocess"], path) != members[0].preprocess:
        raise SpecError(f"{path}: field preprocess {raw['preprocess']!r} disagrees with the members' "
                        "crop/input_size/colour")
    if len({m.name for m in members}) < len(members):
        raise SpecError(f"{path}: a member appears twice")
    methods = {name: _validated_fit(name, fit, len(members), path)
               for name, fit in need(raw, "methods", dict, "").items()}
    default = need(raw, "default_method", str, "")
    if default not in methods:
        raise SpecError(f"{path}: field default_method {default!r} is not one of its methods "
                        f"({', '.join(methods)})")
    for flag in ("tta", "cross_fitted"):
        if not isinstance(raw.get(flag, False), bool):
            raise SpecError(f"{path}: field {flag} is {raw[flag]!r}, not true or false")
    points = {}
    for method, point in (raw.get("operating_points") or {}).items():
        if method not in methods:
            raise SpecError(f"{path}: field operating_points.{method}: not one of its methods")
        try:
            points[method] = OperatingPoint.from_json(point)
        except (TypeError, ValueError) as e:
            raise SpecError(f"{path}: field operating_points.{method}: {e}") from None
    graphs = raw.get("graphs") or {}
    if not isinstance(graphs, dict) or not all(isinstance(k, str) and isinstance(v, str) and "/" not in k
                                               and "\\" not in k for k, v in graphs.items()):
        raise SpecError(f"{path}: field graphs must map graph file names in the folder to their sha256")
    domain = raw.get("domain")
    if domain is not None and not isinstance(domain, str):
        raise SpecError(f"{path}: field domain is {domain!r}, not the sha256 of domain.json")
    site = raw.get("site") or []
    if not isinstance(site, list) or not all(isinstance(step, dict) for step in site):
        raise SpecError(f"{path}: field site must be a list of objects (the adaptations and calibrations)")
    return EnsembleSpec(members, methods, default, raw.get("data") or {}, raw.get("val_metrics") or {},
                        raw.get("tta", False), raw.get("bf16"), raw.get("versions") or {}, points,
                        raw.get("cross_fitted", False), graphs, domain,
                        hashes_graphs="graphs" in raw or domain is not None, site=site)


def _validated_fit(method: str, raw: object, k: int, path: Path) -> Combiner:
    try:
        return combiner_from_json(method, raw, k)
    except FieldError as e:
        raise SpecError(f"{path}: field methods.{method}.{e}") from None
    except ValueError as e:
        raise SpecError(f"{path}: field methods.{method}: {e}") from None


def _kind_name(kind: type | tuple) -> str:
    names = {list: "a list", dict: "an object", str: "a string", int: "a whole number"}
    return " or ".join(names.get(k, str(k)) for k in (kind if isinstance(kind, tuple) else (kind,)))


def _preprocess(raw: object, path: Path) -> Preprocess:
    try:
        return Preprocess.from_json(raw)
    except (TypeError, KeyError):
        raise SpecError(f"{path}: field preprocess {raw!r} is not a crop/input_size/colour object") from None
