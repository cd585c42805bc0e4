"""Regenerate BENCHMARKS.md: run the benchmark sections, then collect their markdown + CSV.

    python benchmarks/run.py                       # the default (short) sections, then collect
    python benchmarks/run.py --sections core-step-time core-memory
    python benchmarks/run.py --collect-only        # rebuild BENCHMARKS.md from existing results

Long sections (full training runs) are listed by ``--list``; they resume where they stopped
and may be run on their own in the background. Every section writes its CSV and a markdown
snippet under benchmarks/results/ or benchmarks/out/<area>/; BENCHMARKS.md is assembled from
those snippets with the machine, torch version, date and command.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable

FF_RECIPE = ["--optimizer", "sgd", "--precision", "bfloat16", "--threads", "1", "--loop", "own"]

# name -> (command, default?)
SECTIONS: dict[str, tuple[list[str], bool]] = {
    "core-step-time": ([PY, str(HERE / "core.py"), "step-time"], True),
    "core-memory": ([PY, str(HERE / "core.py"), "memory"], True),
    "core-mnist": ([PY, str(HERE / "core.py"), "mnist"], False),
    "local-speed": ([PY, str(HERE / "local_speed.py"), "--rounds", "10", "--threads", "1"], True),
    "local-quality": ([PY, str(HERE / "local_quality.py")], True),
    "local-table3": ([PY, str(HERE / "local_table3.py"), "--epochs", "50"], False),
    "local-table3-long": ([PY, str(HERE / "local_table3.py"), "--epochs", "200", "--methods",
                           "lg-fg-a", "fg-a"], False),
    "local-cifar": ([PY, str(HERE / "local_cifar.py"), "--epochs", "6", "--threads", "1"],
                    False),
    "local-cifar-rademacher": ([PY, str(HERE / "local_cifar.py"), "--epochs", "6", "--threads",
                                "1", "--methods", "lg-fg-a", "--distribution", "rademacher",
                                "--tag", "cpu6-rademacher"], False),
    "ff-speed": ([PY, str(HERE / "ff_speed.py"), "--threads", "1"], True),
    # Hinton's optimiser (SGD, momentum, weight decay, head at 10x), bf16 products, 60 epochs
    "ff-mnist": ([PY, str(HERE / "ff_mnist.py"), "--mode", "supervised", *FF_RECIPE,
                  "--tag", "supervised-sgd", "--eval-every", "5"], False),
    "ff-mnist-unsupervised": ([PY, str(HERE / "ff_mnist.py"), "--mode", "unsupervised",
                               *FF_RECIPE], False),
    "ff-mnist-unsupervised-100": ([PY, str(HERE / "ff_mnist.py"), "--mode", "unsupervised",
                                   *FF_RECIPE, "--epochs", "100", "--tag", "unsupervised-100",
                                   "--eval-every", "5"], False),
    "ff-mnist-readout": ([PY, str(HERE / "ff_readout.py"), "--tag", "unsupervised"], False),
    "ff-mnist-bp": ([PY, str(HERE / "ff_mnist.py"), "--mode", "bp", "--precision", "bfloat16",
                     "--threads", "1", "--loop", "own"], False),
    "distributed": ([PY, str(HERE / "distributed_bench.py"), "all"], False),
}

# Snippets, in the order they appear in BENCHMARKS.md.
SNIPPETS = ["results/core_step_time.md", "results/core_memory.md", "results/core_mnist.md",
            "out/local/*.md", "out/ff/*.md", "out/distributed/*.md"]


# Headings for the snippets that do not bring their own (matched on the file stem).
TITLES = {
    "cifar_*-rademacher": "CIFAR-10, LocalMixer M/8/16: LG-FG-A with Rademacher tangents",
    "cifar_*": "CIFAR-10, LocalMixer M/8/16: LG-FG-A against BP and L-BP",
    "quality": "Estimator quality as the LocalMixer grows (against Table 1's formulas)",
    "speed_*": "LocalMixer M/8/16 step time and peak memory: LG-FG-A against BP and L-BP",
    "table3_mnist": "Table 3 of Ren et al. (2023), MNIST columns",
    "summary": "Forward-Forward on MNIST: 784-2000-2000-2000-2000, 60 epochs",
    "speed": "Forward-Forward speed: seconds per MNIST epoch, 784-1000-1000-1000, batch 100",
    "*-readout": "Forward-Forward: the linear readout refitted on frozen features",
}


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{cpu}, {os.cpu_count()} cores{mem}, {platform.system()} {platform.release()}"


def collect(command: str) -> None:
    import torch

    import forwardonly

    parts = [
        "# Benchmarks\n",
        f"- Machine: {machine()} (shared; compare ratios measured in one run, not absolute "
        "times)",
        f"- torch {torch.__version__}, forwardonly {forwardonly.__version__}, "
        f"Python {platform.python_version()}",
        f"- Generated: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"- Command: `{command}` (each section's own command is in its heading notes)\n",
    ]
    for pattern in SNIPPETS:
        for path in sorted(HERE.glob(pattern)):
            text = path.read_text().strip()
            title = next((t for pat, t in TITLES.items() if fnmatch.fnmatch(path.stem, pat)),
                         None)
            if title and not text.startswith("#"):
                parts.append(f"### {title}\n")
            parts.append(text + "\n")
            png = path.with_suffix(".png")
            if png.is_file() and png.name not in text:
                parts.append(f"![{title or path.stem}]({png.relative_to(ROOT)})\n")
            csvs = [c for c in sorted(path.parent.glob(path.stem + "*.csv"))  # not another's
                    if c.stem == path.stem or not c.with_suffix(".md").is_file()]
            if csvs:
                parts.append("Data: " + ", ".join(f"`{c.relative_to(ROOT)}`" for c in csvs)
                             + "\n")
    (ROOT / "BENCHMARKS.md").write_text("\n".join(parts))
    print(f"wrote {ROOT / 'BENCHMARKS.md'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+", choices=sorted(SECTIONS),
                   help="sections to run (default: the short ones)")
    p.add_argument("--collect-only", action="store_true", help="only rebuild BENCHMARKS.md")
    p.add_argument("--list", action="store_true", help="list the sections and exit")
    a = p.parse_args()
    if a.list:
        for name, (cmd, default) in SECTIONS.items():
            print(f"{name:<22} {'default' if default else 'long'}  {shlex.join(cmd[1:])}")
        return
    if not a.collect_only:
        names = a.sections or [n for n, (_, default) in SECTIONS.items() if default]
        for name in names:
            print(f"== {name} ==", flush=True)
            subprocess.run(SECTIONS[name][0], check=True, cwd=ROOT)
    collect(shlex.join(["python", "benchmarks/run.py", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
