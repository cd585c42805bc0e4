"""``python -m benchmarks NAME [options]``: run one benchmark, or ``all``, or ``report``."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from benchmarks import BENCHMARKS


def usage() -> str:
    width = max(map(len, BENCHMARKS))
    lines = ["benchmarks (quick: run by `all`; long: by name, they resume where they stopped):",
             ""]
    for name, b in BENCHMARKS.items():
        lines.append(f"  {name:<{width}}  {'quick' if b.quick else 'long '}  {b.about}")
    lines += [
        "",
        f"  {'all':<{width}}         run the quick benchmarks, then regenerate BENCHMARKS.md",
        f"  {'report':<{width}}         regenerate BENCHMARKS.md from the results only",
        "",
        "Results go to benchmarks/results/NAME/ (--out ROOT elsewhere): CSV, markdown and a",
        "record of the machine (CPU, torch's CPU capability, threads, load, malloc, versions,",
        "date, command). Data: --data-dir, else $FORWARDONLY_DATA.",
        "",
        "examples:",
        "  python -m benchmarks core-step-time --rounds 5 --threads 1",
        "  FORWARDONLY_DATA=/data python -m benchmarks ff-mnist --mode unsupervised",
        "  python -m benchmarks report",
    ]
    return "\n".join(lines)


def parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command line; with ``only``, just that benchmark's options are built (and just
    its module imported)."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, epilog=usage(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="name", metavar="NAME", required=True)
    for name, b in BENCHMARKS.items():
        sp = sub.add_parser(name, help=b.about, description=b.about)
        sp.add_argument("--out", default=None,
                        help="results root (default: benchmarks/results)")
        if only in (None, name):
            importlib.import_module(b.module).arguments(name, sp)
    sp = sub.add_parser("all", help="run the quick benchmarks, then regenerate BENCHMARKS.md")
    sp.add_argument("--out", default=None, help="results root (default: benchmarks/results)")
    sp = sub.add_parser("report", help="regenerate BENCHMARKS.md from the results")
    sp.add_argument("--out", default=None, help="results root (default: benchmarks/results)")
    return p


def run(name: str, args: argparse.Namespace, argv: list[str]) -> None:
    from benchmarks.report import Results

    b = BENCHMARKS[name]
    results = Results(name, args.out, command=["python", "-m", "benchmarks", *argv])
    importlib.import_module(b.module).run(name, args, results)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") and len(argv) == 1:
        print(f"usage: python -m benchmarks NAME [options]\n\n{__doc__}\n{usage()}")
        return
    if argv[0] not in (*BENCHMARKS, "all", "report") and not argv[0].startswith("-"):
        raise SystemExit(f"python -m benchmarks: unknown benchmark {argv[0]!r}; choose one of "
                         f"{', '.join(BENCHMARKS)}, all, report")
    args = parser(argv[0]).parse_args(argv)
    from benchmarks.report import collect

    if args.name == "all":
        for name, b in BENCHMARKS.items():
            if b.quick:
                print(f"== {name} ==", flush=True)
                sub_argv = [name, *(["--out", args.out] if args.out else [])]
                run(name, parser(name).parse_args(sub_argv), sub_argv)
    elif args.name != "report":
        run(args.name, args, argv)
        return
    # with --out elsewhere, BENCHMARKS.md goes into that root, not over the repository's
    target = None if args.out is None else Path(args.out) / "BENCHMARKS.md"
    collect(args.out, order=list(BENCHMARKS), out=target,
            command="python -m benchmarks " + " ".join(argv))


if __name__ == "__main__":
    main()
