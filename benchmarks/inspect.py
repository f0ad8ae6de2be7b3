"""Time `twotower inspect` on the 30B-shaped sparse checkpoint (benchmarks/sparse_nano.py).

Prints the library call (`inspect_checkpoint`, what the 1-second goal is about), the whole CLI
process (interpreter start and every command module's imports included), and `inspect_remote` of the same
checkpoint served over HTTP on this machine (requests and bytes it reads: what inspecting an uncached hub
model costs, less the network's latency), median of --repeats runs.

    python benchmarks/inspect.py [--dir /tmp/twotower-nano-sparse] [--repeats 5]
"""

import importlib
import os
import sys

if __name__ != "__main__":
    # Running any script in benchmarks/ puts this folder first on sys.path, so `import inspect` (done by
    # dataclasses, torch, ...) finds this file instead of the standard library's module. Hand the
    # import over to the real one; the import system returns whatever sys.modules holds at the end.
    _here = os.path.dirname(os.path.abspath(__file__))
    _saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    del sys.modules[__name__]
    try:
        sys.modules[__name__] = importlib.import_module(__name__)
    finally:
        sys.path[:] = _saved


def main() -> None:
    import argparse
    import importlib.util
    import shutil
    import statistics
    import subprocess
    import time
    from pathlib import Path

    from twotower_cli.inspect import inspect_checkpoint

    spec = importlib.util.spec_from_file_location("sparse_nano", Path(__file__).with_name("sparse_nano.py"))
    sparse_nano = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sparse_nano)

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/twotower-nano-sparse")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    t0 = time.perf_counter()
    folder = sparse_nano.build_sparse_nano(args.dir)
    print(f"sparse Nano checkpoint at {folder} ({time.perf_counter() - t0:.2f} s to build or reuse)")

    lib = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        report = inspect_checkpoint(folder)
        lib.append(time.perf_counter() - t0)
    assert report.problems == [], report.problems
    assert report.parameters["total"] == sparse_nano.NANO_PARAMETERS, report.parameters

    exe = shutil.which("twotower") or str(Path(sys.executable).parent / "twotower")
    cli = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        subprocess.run([exe, "inspect", str(folder), "--json"], check=True, stdout=subprocess.DEVNULL)
        cli.append(time.perf_counter() - t0)

    print(f"tensors {report.tensors:,}, shards {len(report.shards)}, parameters {report.parameters['total']:,}, "
          f"active/token {report.active_parameters_per_token:,}, {report.bytes / 1e9:.2f} GB")
    print(f"inspect_checkpoint  median {statistics.median(lib) * 1000:7.1f} ms  (min {min(lib) * 1000:.1f} ms)  "
          "goal < 1000 ms")
    print(f"twotower inspect    median {statistics.median(cli) * 1000:7.1f} ms  (min {min(cli) * 1000:.1f} ms)  "
          "whole process")

    # The same checkpoint as a hub repository behind a local HTTP server (the tests' stand-in for the hub, which
    # speaks the two routes huggingface_hub calls): what `inspect` of an uncached hub model reads and costs.
    from twotower_cli.inspect import inspect_remote

    spec = importlib.util.spec_from_file_location("fake_hub", Path(__file__).parents[1] / "tests" / "fake_hub.py")
    fake_hub = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fake_hub)
    hub = fake_hub.FakeHub()
    hub.repos["org/nano"] = folder
    remote_times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        remote = inspect_remote("org/nano", endpoint=hub.endpoint)
        remote_times.append(time.perf_counter() - t0)
    hub.server.shutdown()
    assert remote.problems == [] and remote.parameters == report.parameters
    print(f"inspect_remote      median {statistics.median(remote_times) * 1000:7.1f} ms  (min "
          f"{min(remote_times) * 1000:.1f} ms)  {remote.remote['requests']} requests, "
          f"{remote.remote['bytes_read'] / 1e6:.2f} MB read of {report.bytes / 1e9:.2f} GB (local server)")


if __name__ == "__main__":
    main()
