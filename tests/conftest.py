"""Suite-wide test settings.

`pytest --torch-threads N` runs the suite with N torch threads (default 1) and `pytest --deterministic` under
`torch.use_deterministic_algorithms(True)` (`make test-numerics` runs both). Tests that compare two different
computations must hold under either: they use the tolerances of `tests/tolerances.py`, never bit-for-bit equality.
"""

import importlib.metadata
import platform

import pytest
import torch


def pytest_addoption(parser):
    group = parser.getgroup("hf-fastbert numerics")
    group.addoption(
        "--torch-threads",
        type=int,
        default=1,
        help="torch intra-op threads for the suite (default 1: the tiny models are as fast, and a shared machine is "
        "not oversubscribed). Another count changes the floating-point sums of the kernels.",
    )
    group.addoption(
        "--deterministic",
        action="store_true",
        help="run under torch.use_deterministic_algorithms(True)",
    )


def pytest_configure(config):
    threads = config.getoption("--torch-threads")
    if threads < 1:
        raise pytest.UsageError(f"--torch-threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    if config.getoption("--deterministic"):
        torch.use_deterministic_algorithms(True)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            names = [line.split(":", 1)[1].strip() for line in file if line.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0]} ({len(names)} logical CPUs)" if names else platform.processor() or platform.machine()


def pytest_report_header(config):
    """What the suite ran on, at the top of every run (a CI log on another machine says so)."""
    versions = []
    for package in ("torch", "transformers", "datasets", "accelerate", "huggingface-hub", "onnx", "onnxruntime"):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{package} not installed")
    return [
        f"CPU: {_cpu_model()}",
        f"torch: {torch.get_num_threads()} thread(s), deterministic algorithms "
        f"{'on' if torch.are_deterministic_algorithms_enabled() else 'off'}",
        "packages: " + ", ".join(versions),
    ]
