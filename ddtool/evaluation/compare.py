"""Synthetic sets side by side, by the evaluations their files record (`ddtool compare`).

An accuracy means something only beside others of the same protocol, network and dataset:
the rows are grouped by those, and a comparison says when its sets fall into several groups
rather than mixing them in one column.

    comparison = compare_sets(["a.h5", "b.h5"], protocol="mtt")
    for group in comparison.groups: ...   # dataset, protocol, network, rows
    comparison.unevaluated                 # sets without a (matching) record, and the command that makes one
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ddtool.errors import ConfigError
from ddtool.evaluation.protocols import PROTOCOLS


def protocol_label(recorded: dict) -> str:
    """A recorded protocol (Protocol.to_dict()) by its name and what it changed from the named
    protocol, e.g. "mtt (epochs 5, runs 1)": an overridden protocol keeps the name, and its
    numbers must not pass for the named protocol's."""
    name = str(recorded.get("name", "?"))
    named = PROTOCOLS.get(name)
    if named is None:
        return name
    # to_dict leaves the float32 default out; a record's "precision" is a change from it
    named_fields = {**named.to_dict(), "precision": named.precision}
    changes = [f"{field} {_setting(value)}" for field, value in _changed(named_fields, recorded)]
    return f"{name} ({', '.join(changes)})" if changes else name


def _changed(named: dict, recorded: dict, prefix: str = "") -> list[tuple[str, object]]:
    """(field, recorded value) where `recorded` differs from `named`; fields a record made
    before they existed lacks are not changes."""
    changes = []
    for field_name, value in recorded.items():
        if field_name == "name" or field_name not in named or named[field_name] == value:
            continue
        if isinstance(value, dict) and isinstance(named[field_name], dict):
            changes += _changed(named[field_name], value, f"{prefix}{field_name}.")
        else:
            changes.append((prefix + field_name, value))
    return changes


def _setting(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass
class ComparedEvaluation:
    """One recorded evaluation of one set: a row of the comparison."""

    set: str  # the path as given
    record: int  # the record's index in the file's evaluations
    method: str
    dataset: str
    ipc: int
    seed: int
    protocol: str  # protocol_label of the record: its name and what it changed
    protocol_name: str
    protocol_settings: dict
    network: str
    runs: int
    mean: float
    std: float
    random_subset: dict | None  # {"mean", "std", "runs"} of the matched baseline recorded with it
    whole_dataset: dict | None
    bytes: int  # what the set stores: its images and labels
    timings: dict | None  # what making the set cost (SyntheticSet.timings), where recorded
    timestamp: str
    earlier_records: int = 0  # older records of the same evaluation in the file, not shown

    @property
    def cost_s(self) -> float | None:
        return None if not self.timings else self.timings.get("total_s")

    def to_dict(self) -> dict:
        return {"set": self.set, "record": self.record, "method": self.method, "dataset": self.dataset,
                "ipc": self.ipc, "seed": self.seed, "protocol": self.protocol, "protocol_name": self.protocol_name,
                "protocol_settings": self.protocol_settings, "network": self.network, "runs": self.runs,
                "mean": self.mean, "std": self.std, "random_subset": self.random_subset,
                "whole_dataset": self.whole_dataset, "bytes": self.bytes, "cost_s": self.cost_s,
                "timings": self.timings, "timestamp": self.timestamp, "earlier_records": self.earlier_records}


@dataclass
class ComparisonGroup:
    """Rows that may be compared: one dataset, protocol (with its changes) and network."""

    dataset: str
    protocol: str
    network: str
    rows: list[ComparedEvaluation] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "protocol": self.protocol, "network": self.network,
                "rows": [row.to_dict() for row in self.rows]}


@dataclass
class Unevaluated:
    """A set with no record to compare, and how to make one."""

    set: str
    reason: str
    command: str

    def to_dict(self) -> dict:
        return {"set": self.set, "reason": self.reason, "command": self.command}


@dataclass
class Comparison:
    groups: list[ComparisonGroup]
    unevaluated: list[Unevaluated]
    protocol: str | None = None  # the protocol asked for (None: every recorded one)
    sets: int = 0  # how many sets were compared (a file named twice counts once)

    @property
    def mixed(self) -> bool:
        """Whether the rows fall into more than one group (different protocols, networks or datasets)."""
        return len(self.groups) > 1

    def to_dict(self) -> dict:
        return {"sets": self.sets, "protocol": self.protocol, "mixed": self.mixed,
                "groups": [g.to_dict() for g in self.groups],
                "unevaluated": [u.to_dict() for u in self.unevaluated]}


def compare_sets(paths: list[str | Path], protocol: str | None = None) -> Comparison:
    """The recorded evaluations of the sets at `paths`, grouped by dataset, protocol and
    network; with `protocol`, only the records of that named protocol (its variants, e.g.
    other epochs, each in a group of their own). Of several records of one evaluation in a
    file (the same protocol and network) the latest is taken. A path that is missing or not a
    ddtool set is a DDToolError."""
    from ddtool.storage import load_synthetic_set

    if protocol is not None and protocol not in PROTOCOLS:
        raise ConfigError(f"Unknown evaluation protocol {protocol!r}; known protocols: {', '.join(sorted(PROTOCOLS))}.")
    groups: list[ComparisonGroup] = []
    unevaluated: list[Unevaluated] = []
    seen: set[Path] = set()
    order: dict[int, int] = {}  # id(row) -> the set's place on the command line
    for place, path in enumerate(paths):
        resolved = Path(path).resolve()
        if resolved in seen:  # the same file named twice (a glob and a name) is one set
            continue
        seen.add(resolved)
        sset = load_synthetic_set(path)
        records = [(index, record) for index, record in enumerate(sset.evaluations)
                   if protocol is None or record["protocol"].get("name") == protocol]
        if not records:
            unevaluated.append(_unevaluated(str(path), sset, protocol))
            continue
        latest: dict[int, ComparedEvaluation] = {}  # id(group) -> this set's row in it
        for index, record in records:
            row = _row(str(path), sset, index, record)
            group = _group_of(groups, row)
            if id(group) in latest:  # a later record of the same evaluation replaces the earlier
                earlier = latest[id(group)]
                group.rows.remove(earlier)
                row.earlier_records = earlier.earlier_records + 1
            latest[id(group)] = row
            group.rows.append(row)
            order[id(row)] = place
    for group in groups:
        group.rows.sort(key=lambda row: (row.ipc, order[id(row)]))
    return Comparison(groups, unevaluated, protocol, sets=len(seen))


def _row(path: str, sset, index: int, record: dict) -> ComparedEvaluation:
    baselines = record.get("baselines") or {}
    return ComparedEvaluation(
        set=path, record=index, method=sset.method, dataset=sset.dataset, ipc=sset.ipc, seed=sset.seed,
        protocol=protocol_label(record["protocol"]), protocol_name=str(record["protocol"].get("name", "?")),
        protocol_settings=record["protocol"], network=record["arch"], runs=len(record["runs"]),
        mean=float(record["mean"]), std=float(record["std"]),
        random_subset=_figures(baselines.get("random_subset")), whole_dataset=_figures(baselines.get("whole_dataset")),
        bytes=int(sset.images.nbytes + sset.labels.nbytes), timings=sset.timings,
        timestamp=str(record.get("timestamp", "")))


def _figures(baseline: dict | None) -> dict | None:
    if not baseline:
        return None
    return {"mean": float(baseline["mean"]), "std": float(baseline["std"]), "runs": len(baseline.get("runs", []))}


def _group_of(groups: list[ComparisonGroup], row: ComparedEvaluation) -> ComparisonGroup:
    for group in groups:
        if group.dataset == row.dataset and group.protocol == row.protocol and _same_network(group.network,
                                                                                              row.network):
            return group
    groups.append(ComparisonGroup(row.dataset, row.protocol, row.network))
    return groups[-1]


def _same_network(a: str, b: str) -> bool:
    """'convnetw32' and 'convnet:width=32' are one network; names this version does not know
    are compared as written."""
    from ddtool.networks import same_network

    try:
        return same_network(a, b)
    except ConfigError:
        return a == b


def _unevaluated(path: str, sset, protocol: str | None) -> Unevaluated:
    if protocol is None:
        return Unevaluated(path, "no recorded evaluation", f"ddtool evaluate {path}")
    held = sorted({str(record["protocol"].get("name", "?")) for record in sset.evaluations})
    reason = f"no evaluation under the {protocol} protocol" + (
        f" (its records: {', '.join(held)})" if held else "")
    return Unevaluated(path, reason, f"ddtool evaluate {path} --protocol {protocol}")


def format_size(num_bytes: int) -> str:
    """'800 B', '306 KiB', '1.2 MiB'."""
    size, unit = float(num_bytes), "B"
    for larger in ("KiB", "MiB", "GiB"):
        if size < 1024:
            break
        size, unit = size / 1024, larger
    return f"{num_bytes} B" if unit == "B" else f"{size:.1f} {unit}" if size < 10 else f"{size:.0f} {unit}"
