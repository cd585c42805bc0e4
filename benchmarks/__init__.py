"""forwardonly's benchmarks, run on the library: ``python -m benchmarks NAME [options]``.

``python -m benchmarks --help`` lists them; ``python -m benchmarks NAME --help`` gives a
benchmark's options; ``python -m benchmarks all`` runs the quick ones and regenerates
BENCHMARKS.md; ``python -m benchmarks report`` only regenerates it from the results.

Every benchmark writes through :mod:`benchmarks.report` into ``benchmarks/results/NAME/``
(CSV, markdown, the machine record, sometimes a PNG); training goes through the library's
own loop (:data:`benchmarks.common.fit`); data is found by the library's rule
(``--data-dir``, else ``$FORWARDONLY_DATA``).
"""

from __future__ import annotations

from typing import NamedTuple


class Benchmark(NamedTuple):
    module: str  # the module with ``arguments(name, parser)`` and ``run(name, args, results)``
    about: str  # one line for --help
    quick: bool  # run by ``python -m benchmarks all`` (minutes); else hours: run it by name


# In the order of BENCHMARKS.md.
BENCHMARKS: dict[str, Benchmark] = {
    "core-step-time": Benchmark(
        "benchmarks.core", "MLP step time of bp, fg-w, zo, interleaved, with a plain "
        "torch.func vmap(jvp) forward gradient as the baseline", True),
    "core-memory": Benchmark(
        "benchmarks.core", "peak memory of one training step per method and depth, fresh "
        "process each, glibc's default malloc and mmap-tuned", True),
    "core-table-quality": Benchmark(
        "benchmarks.table_quality", "fg-w with noise-table directions against fresh Gaussian "
        "draws: the same recipe and seeds, test error and training loss", True),
    "core-mnist": Benchmark(
        "benchmarks.core", "MNIST test error of bp, fg-w, zo after a fixed budget "
        "(library loop; hours)", False),
    "local-speed": Benchmark(
        "benchmarks.local_speed", "LocalMixer M/8/16 step time and memory: LG-FG-A against "
        "BP and L-BP, interleaved", True),
    "local-quality": Benchmark(
        "benchmarks.local_quality", "cosine and variance of FG-W, FG-A, LG-FG-W, LG-FG-A "
        "against Table 1 of Ren et al. as the LocalMixer grows", True),
    "local-table3": Benchmark(
        "benchmarks.local_table3", "Table 3 of Ren et al., MNIST columns (library loop; "
        "hours)", False),
    "local-cifar": Benchmark(
        "benchmarks.local_cifar", "CIFAR-10 LocalMixer M/8/16: LG-FG-A against BP and L-BP "
        "(library loop; hours)", False),
    "local-lr-sweep": Benchmark(
        "benchmarks.local_lr_sweep", "short learning-rate sweep of the Table 3 methods on "
        "MNIST (library loop; hours)", False),
    "ff-speed": Benchmark(
        "benchmarks.ff_speed", "Forward-Forward step time against a plain-PyTorch FF step, "
        "interleaved in one process", True),
    "ff-mnist": Benchmark(
        "benchmarks.ff_mnist", "Forward-Forward (supervised, unsupervised) and backprop on "
        "MNIST, Hinton's network (library loop; hours)", False),
    "ff-readout": Benchmark(
        "benchmarks.ff_readout", "refit the linear readout of a finished FF run on its frozen "
        "features", False),
    "finetune-sst2": Benchmark(
        "benchmarks.finetune_sst2", "MiniLM fine-tuned on SST-2: memory, step time and "
        "accuracy of bp, linear probe, zo (MeZO), fg-w and subspace variants (--section; "
        "accuracy: library loop, hours)", False),
    "distributed": Benchmark(
        "benchmarks.distributed", "bytes per step and step time of data-parallel and "
        "stage-sharded training (real torchrun groups)", False),
    "dimension-curse": Benchmark(
        "benchmarks.dimension_curse", "`forwardonly experiment dimension-curse` against the "
        "essay's own script, whole commands in fresh processes, interleaved", True),
}

__all__ = ["BENCHMARKS", "Benchmark"]
