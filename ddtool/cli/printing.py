"""How the commands lay out what they print: aligned tables, settings listings, comparisons,
figures with their spreads. Text only: the figures come from the library."""

from __future__ import annotations

import csv
import json
import shutil
import sys
import textwrap

import click

from ddtool.durations import format_duration
from ddtool.methods.base import get_method_class


def print_json(value) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


def describe_timings(timings: dict) -> str:
    """'12m 03s (experts 8m 10s, distillation 3m 53s) on AMD EPYC (AVX2)'."""
    def seconds(name: str) -> str:
        value = timings.get(name)
        return "unknown" if value is None else format_duration(value)
    return (f"{seconds('total_s')} (experts {seconds('experts_s')}, distillation {seconds('distill_s')})"
            f" on {timings.get('hardware') or 'unrecorded hardware'}")


def print_settings(described) -> None:
    method_cls = get_method_class(described.method)
    # the class's own docstring, else its module's (DATM's, FTD's: the method's description)
    doc = method_cls.__dict__.get("__doc__") or sys.modules[method_cls.__module__].__doc__ or ""
    summary = " ".join(doc.strip().split("\n\n")[0].split())  # its first paragraph
    click.echo(click.wrap_text(f"{described.method}: {summary}" if summary else described.method, width=100))
    presets = ", ".join(p + (" (default)" if p == method_cls.default_preset else "") for p in described.presets)
    click.echo(textwrap.fill(f"settings of {described.config_class}; default protocol {described.default_protocol}; "
                             f"presets: {presets or '-'}", width=100, initial_indent="  ", subsequent_indent="    ",
                             break_on_hyphens=False))
    if not described.settings:
        click.echo(f"{described.method} has no settings.")
        return
    if described.preset is None:
        column = "value"
        click.echo("  no preset: a run takes the defaults")
    else:
        column = described.preset
        where = f"preset {described.preset}"
        if described.preset != described.named_preset:
            where += f" ({described.named_preset}'s variant for --ipc {described.ipc})"
        elif described.ipc is not None:
            where += f" (it has no variant for --ipc {described.ipc}: a run takes it as it is)"
        click.echo(f"  values of {where}; * where they differ from the default")
    click.echo()
    rows = [[s.name, s.type, value_text(s.default), value_text(s.value) + (" *" if s.changed else ""), s.meaning]
            for s in described.settings]
    for line in text_table(["setting", "type", "default", column, "meaning"], rows, wrap_last=True):
        click.echo(line)
    click.echo()
    for note in described.notes:
        click.echo(click.wrap_text(note, width=100))
    click.echo(f"`ddtool distill --method {described.method} --set KEY=VALUE` changes a setting; "
               f"`ddtool methods {described.method} --preset P --ipc N` shows another preset's values.")


def value_text(value) -> str:
    """A setting's value as --set takes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return '""' if value == "" else str(value)


def text_table(headers: list[str], rows: list[list[str]], *, right: tuple[int, ...] = (), wrap_last: bool = False,
           indent: str = "") -> list[str]:
    """Aligned text columns (those in `right` right-aligned). With `wrap_last`, on a terminal
    the last column is wrapped under itself to the terminal's width; piped, every row stays one
    line (for grep)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    lead = len(indent) + sum(w + 2 for w in widths[:-1])
    room = shutil.get_terminal_size((100, 24)).columns - lead
    wrap = wrap_last and sys.stdout.isatty() and room >= 30
    lines = []
    for row in [headers, *rows]:
        cells = [str(cell).rjust(w) if i in right else str(cell).ljust(w)
                 for i, (cell, w) in enumerate(zip(row[:-1], widths))]
        last = textwrap.wrap(str(row[-1]), room) if wrap and len(str(row[-1])) > room else [str(row[-1])]
        lines.append((indent + "  ".join([*cells, last[0]])).rstrip())
        lines += [" " * lead + more for more in last[1:]]
    return lines


def print_comparison(comparison) -> None:
    from ddtool.evaluation.compare import format_size

    groups = comparison.groups
    under = f" under the {comparison.protocol} protocol" if comparison.protocol else ""
    if comparison.mixed:
        click.echo(click.wrap_text(
            f"The evaluations{under} fall into {len(groups)} groups of different protocol settings, networks or "
            "datasets, shown apart: an accuracy compares only with those of its own group.", width=100))
    elif groups and len(groups[0].rows) > 1:
        click.echo(f"{count_of(len(groups[0].rows), 'evaluation')}{under}, all of one "
                   f"{'' if under else 'protocol, '}network and dataset: they compare with each other.")
    whole = any(row.whole_dataset for group in groups for row in group.rows)
    costed = [row for group in groups for row in group.rows if cost_text(row.timings) != "-"]
    hardware = sorted({row.timings.get("hardware") or "unrecorded hardware" for row in costed})
    for group in groups:
        click.echo(f"\nprotocol {group.protocol}, network {group.network}, dataset {group.dataset}")
        headers = ["set", "method", "IPC", "size", "runs", "accuracy %", "random subset %",
                   *(["whole dataset %"] if whole else []), "cost"]
        rows = [[row.set, row.method, str(row.ipc), format_size(row.bytes), str(row.runs),
                 mean_std_text(row.mean, row.std, row.runs), baseline_text(row.random_subset),
                 *([baseline_text(row.whole_dataset)] if whole else []), cost_text(row.timings)] for row in group.rows]
        for line in text_table(headers, rows, right=(2, 3, 4), indent="  "):
            click.echo(line)
    if groups:
        click.echo("\n" + click.wrap_text(
            "accuracy: test accuracy at the final epoch, mean ± std over fresh networks; random subset: the matched "
            "baseline recorded with the evaluation (same protocol and network); size: the images and labels "
            "stored; cost: the experts' training and the distillation as the set records them"
            + (f" (on {', '.join(hardware)})" if hardware else "")
            + (", >= where it records the distillation's time alone" if any(
                cost_text(row.timings).startswith(">=") for row in costed) else "")
            + ", - where it records none.", width=100))
    earlier = sum(row.earlier_records for group in groups for row in group.rows)
    if earlier:
        click.echo(f"({count_of(earlier, 'older record')} of an evaluation shown here left out: the latest of each is "
                   "shown; `ddtool info SET.h5` lists every record.)")
    for missing in comparison.unevaluated:
        click.echo(f"{missing.set}: {missing.reason}; `{missing.command}` makes one.")


def print_comparison_csv(comparison) -> None:
    columns = ["set", "method", "dataset", "ipc", "protocol", "network", "runs", "mean", "std", "random_subset_mean",
               "random_subset_std", "whole_dataset_mean", "whole_dataset_std", "bytes", "cost_s", "group"]
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(columns)
    for index, group in enumerate(comparison.groups):
        for row in group.rows:
            base, whole = row.random_subset or {}, row.whole_dataset or {}
            writer.writerow([row.set, row.method, row.dataset, row.ipc, row.protocol, row.network, row.runs, row.mean,
                             row.std, base.get("mean", ""), base.get("std", ""), whole.get("mean", ""),
                             whole.get("std", ""), row.bytes, "" if row.cost_s is None else row.cost_s, index])


def count_of(number: int, thing: str) -> str:
    return f"{number} {thing}{'s' if number != 1 else ''}"


def mean_std_text(mean: float, std: float, runs: int) -> str:
    return f"{100 * mean:.2f} (1 run)" if runs == 1 else f"{100 * mean:.2f} ± {100 * std:.2f}"


def baseline_text(figures: dict | None) -> str:
    return "-" if not figures else mean_std_text(figures["mean"], figures["std"], figures["runs"])


def cost_text(timings: dict | None) -> str:
    if not timings:
        return "-"
    if timings.get("total_s") is not None:
        return format_duration(timings["total_s"])
    if timings.get("distill_s") is not None:  # the experts' time unknown: at least the distillation's
        return f">= {format_duration(timings['distill_s'])}"
    return "-"
