"""The one results writer: every benchmark's tables, their machine record, and BENCHMARKS.md.

A benchmark ``NAME`` writes under ``<root>/NAME/`` (``root`` is ``benchmarks/results`` unless
``--out`` says otherwise), for each table ``STEM``:

- ``STEM.csv``: the rows;
- ``STEM.md``: a ``###`` heading, the table in markdown, and one line saying when, on what
  machine and by which command it was measured;
- ``STEM.json``: that record in full (:func:`machine`), plus the benchmark's own notes;
- optionally ``STEM.png`` (:meth:`Results.png`).

Training runs a benchmark starts live in ``<root>/NAME/runs/<tag>/`` (the library's run
directories; not committed). :func:`collect` assembles BENCHMARKS.md from the ``.md`` files.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(command: Sequence[str] | None = None) -> dict[str, Any]:
    """What a result depends on besides the code: CPU, torch's CPU capability and thread
    count, load average (now: call this at the start), malloc settings, versions, date and
    the command (``sys.argv`` as ``python -m benchmarks ...`` unless given)."""
    import torch

    import forwardonly

    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = []
    argv = list(command) if command is not None else ["python", "-m", "benchmarks",
                                                      *sys.argv[1:]]
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(argv),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "load_average": load,
        "malloc": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")},
        "torch": str(torch.__version__),
        "forwardonly": forwardonly.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def machine_line(m: dict[str, Any]) -> str:
    """One markdown line from a :func:`machine` record (or a kept result's record)."""
    if m.get("kept"):
        return f"*Kept from an earlier run ({m['date']}): {m['kept']}*"
    malloc = ", ".join(f"{k}={v}" for k, v in m["malloc"].items()) or "glibc default"
    load = " / ".join(str(v) for v in m["load_average"]) or "unknown"
    return (f"*Measured {m['date'][:16].replace('T', ' ')} on {m['cpu']} ({m['cpu_count']} "
            f"CPUs, torch CPU capability {m['cpu_capability']}, {m['torch_threads']} torch "
            f"thread(s) at the start, load average {load}, malloc: {malloc}; torch "
            f"{m['torch']}, forwardonly {m['forwardonly']}, Python {m['python']}). "
            f"Command: `{m['command']}`.*" + _busy(m))


def _busy(m: dict[str, Any]) -> str:
    """A warning when other work was running: times are then noisy."""
    load, cpus = m.get("load_average") or [0.0], m.get("cpu_count") or 1
    if load[0] <= cpus / 2:
        return ""
    return (f" *The load average ({load[0]}) was above half the CPU count at the start: other "
            "work shared the cores, so times are noisy; trust ratios whose range is narrow.*")


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open() as fh:
        return list(csv.DictReader(fh))


class Results:
    """The output folder of one benchmark and the machine record taken when it started.

    Arguments:
        name: the benchmark's name (the folder under ``root``).
        root: the results root; default ``benchmarks/results``.
        command: the command line to record; default ``sys.argv``.
    """

    def __init__(self, name: str, root: Path | str | None = None,
                 command: Sequence[str] | None = None) -> None:
        self.name = name
        self.dir = Path(root or RESULTS) / name
        self.machine = machine(command)

    def path(self, filename: str) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        return self.dir / filename

    def run_dir(self, tag: str) -> Path:
        """Where the library's training run ``tag`` lives (resumable; not committed)."""
        return self.dir / "runs" / tag

    def png(self, stem: str) -> Path:
        return self.path(f"{stem}.png")

    def write(self, stem: str, rows: Sequence[dict[str, Any]], *, title: str, text: str,
              notes: dict[str, Any] | None = None, csv_rows: bool = True) -> str:
        """Write ``stem``'s CSV (unless ``csv_rows`` is False: the benchmark keeps its own
        CSV, appended per epoch), markdown and record; returns the markdown and prints it.

        ``text``: the body under the heading (a description and the table)."""
        if csv_rows and rows:
            write_csv(self.path(f"{stem}.csv"), rows)
        record = {**self.machine, "benchmark": self.name, "title": title, **(notes or {})}
        self.path(f"{stem}.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
        md = f"### {title}\n\n{text.strip()}\n\n{machine_line(record)}\n"
        self.path(f"{stem}.md").write_text(md)
        print(md, flush=True)
        return md


def collect(root: Path | str | None = None, order: Sequence[str] = (),
            out: Path | None = None, command: str = "python -m benchmarks report") -> Path:
    """Assemble BENCHMARKS.md from every ``<root>/<name>/*.md``, benchmarks in ``order``
    (then any other folder), with each table's CSV and PNG linked."""
    import torch

    import forwardonly

    root = Path(root or RESULTS)
    out = out or REPO / "BENCHMARKS.md"
    names = [n for n in order if (root / n).is_dir()]
    names += sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in names)
    parts = [
        "# Benchmarks\n",
        f"Generated {datetime.date.today().isoformat()} by `{command}` from "
        f"`{_rel(root)}/` (torch {torch.__version__}, forwardonly {forwardonly.__version__}, "
        f"Python {platform.python_version()}). Each table says where, when and by which "
        "command it was measured; tables kept from earlier runs say so. Compare ratios "
        "measured in one run, not absolute times across tables: the machines are shared.\n",
    ]
    for name in names:
        for md in sorted((root / name).glob("*.md")):
            parts.append(md.read_text().strip() + "\n")
            links = [f"`{_rel(p)}`" for p in (md.with_suffix(".csv"),) if p.is_file()]
            png = md.with_suffix(".png")
            if png.is_file() and png.name not in md.read_text():
                parts.append(f"![{md.stem}]({_rel(png)})\n")
            if links:
                parts.append("Data: " + ", ".join(links) + "\n")
    out.write_text("\n".join(parts))
    print(f"wrote {out}")
    return out


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)
