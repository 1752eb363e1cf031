"""Python-level benchmark: shardwire against the Mooncake wheel, same run.

For each engine, a target process of the same kind (tests/interop/peer.py)
serves a buffer over loopback with P2P metadata; this process initiates:

- `transfer_sync_write` of 4 KiB, one at a time: latency p50 and p99;
- throughput of `transfer_sync_write` at 64 KiB, 1 MiB and 16 MiB, and of a
  `batch_transfer_sync_write` of 16 such blocks.

Run it through tools/bench-python, which prepares .venv first.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER = os.path.join(ROOT, "tests", "interop", "peer.py")
KIB, MIB = 1024, 1024 * 1024


LOCAL_IMPLS = ("local-shm", "local-cma", "tcp")


def memcpy_rates(sizes, buffer_size, seconds=0.5):
    """The anchor: memcpy in this process, between page-aligned buffers, of
    each size (cache-hot: the same bytes again and again) and of what a
    batch of 16 moves (blocks laid end to end, as the batch lays them)."""
    import ctypes
    import mmap
    out = {}
    wanted = [(f"memcpy_{s}_gbps", s) for s in sizes]
    wanted += [(f"memcpy_batch_{s}_gbps", min(16, buffer_size // s) * s) for s in sizes]
    for key, size in wanted:
        src, dst = mmap.mmap(-1, size), mmap.mmap(-1, size)
        src_addr = ctypes.addressof(ctypes.c_char.from_buffer(src))
        dst_addr = ctypes.addressof(ctypes.c_char.from_buffer(dst))
        for _ in range(4):  # fault the pages in, warm the caches
            ctypes.memmove(dst_addr, src_addr, size)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            ctypes.memmove(dst_addr, src_addr, size)
            n += 1
        out[key] = n * size / (time.perf_counter() - start) / 1e9
    return out


def measure(impl, samples, duration, sizes):
    """Runs in a child process per engine, so the two never share a process."""
    if impl == "mooncake":
        from mooncake.engine import TransferEngine
    else:
        from shardwire import TransferEngine
    buffer_size = 64 * MIB
    env = dict(os.environ, PEER_IMPL="mooncake" if impl == "mooncake" else "shardwire", MC_FORCE_TCP="1",
               GLOG_minloglevel="2")
    if impl in LOCAL_IMPLS:
        # Same-host transfers: the local transport (both tiers), against
        # shardwire's own TCP path with it off on both sides (the parent
        # set SHARDWIRE_LOCAL=0 for this child too).
        del env["MC_FORCE_TCP"]
        env["PEER_MEMORY"] = "registered" if impl == "local-cma" else "managed"
    peer = subprocess.Popen([sys.executable, PEER, "target", str(buffer_size)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    ready = peer.stdout.readline().split()
    name, remote = ready[1], int(ready[2])
    engine = TransferEngine()
    assert engine.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
    local = engine.allocate_managed_buffer(buffer_size)
    result = {"impl": impl}
    if impl in LOCAL_IMPLS:
        result.update(memcpy_rates(sizes, buffer_size))
    try:
        # Warm up the connection and the code paths.
        for _ in range(200):
            assert engine.transfer_sync_write(name, local, remote, 4 * KIB) == 0
        lat = []
        for _ in range(samples):
            t0 = time.perf_counter_ns()
            engine.transfer_sync_write(name, local, remote, 4 * KIB)
            lat.append(time.perf_counter_ns() - t0)
        lat.sort()
        result["lat4k_p50_us"] = lat[len(lat) // 2] / 1000
        result["lat4k_p99_us"] = lat[int(len(lat) * 0.99)] / 1000
        for size in sizes:
            moved = 0
            deadline = time.perf_counter() + duration
            start = time.perf_counter()
            while time.perf_counter() < deadline:
                assert engine.transfer_sync_write(name, local, remote, size) == 0
                moved += size
            result[f"sync_{size}_gbps"] = moved / (time.perf_counter() - start) / 1e9
            blocks = min(16, buffer_size // size)
            bufs = [local + i * size for i in range(blocks)]
            peers = [remote + i * size for i in range(blocks)]
            moved = 0
            deadline = time.perf_counter() + duration
            start = time.perf_counter()
            while time.perf_counter() < deadline:
                assert engine.batch_transfer_sync_write(name, bufs, peers, [size] * blocks) == 0
                moved += size * blocks
            result[f"batch_{size}_gbps"] = moved / (time.perf_counter() - start) / 1e9
    finally:
        peer.stdin.write("quit\n")
        peer.stdin.flush()
        peer.wait(timeout=10)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=2.0, help="seconds per throughput figure")
    ap.add_argument("--samples", type=int, default=20000, help="4 KiB writes timed")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=3, help="runs per engine; the median of each figure is kept")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--local", action="store_true",
                    help="same-host transfers instead: shardwire's local transport (managed memory, registered "
                         "memory) against its own TCP path (SHARDWIRE_LOCAL=0) and memcpy")
    ap.add_argument("--baseline", help="a directory holding another shardwire package (an earlier commit's build), "
                                       "measured alongside: an A/B in one run")
    args = ap.parse_args()
    sizes = [64 * KIB, 1 * MIB, 16 * MIB]
    if args.child:
        print(json.dumps(measure(args.child, args.samples, args.duration, sizes)))
        return
    if args.local:
        impls = list(LOCAL_IMPLS)
    else:
        impls = ["mooncake", "shardwire"] + (["baseline"] if args.baseline else [])
    runs = {impl: [] for impl in impls}
    for rep in range(args.repeats):
        # Alternate the engines so drift hits all alike.
        for impl in impls:
            print(f"bench: {impl} (run {rep + 1})", file=sys.stderr, flush=True)
            env = dict(os.environ)
            if impl == "baseline":
                env["PYTHONPATH"] = os.path.abspath(args.baseline) + os.pathsep + env.get("PYTHONPATH", "")
            if impl == "tcp":
                env["SHARDWIRE_LOCAL"] = "0"
            out = subprocess.run([sys.executable, __file__, "--child", impl, "--duration", str(args.duration),
                                  "--samples", str(args.samples)], capture_output=True, text=True, check=True, env=env)
            runs[impl].append(json.loads(out.stdout.strip().splitlines()[-1]))
    results = {}
    for impl, rs in runs.items():
        results[impl] = {k: sorted(r[k] for r in rs)[len(rs) // 2] for k in rs[0] if k != "impl"}
    if args.local:
        print_local(results, args, sizes)
        return
    m, s = results["mooncake"], results["shardwire"]
    print(f"Python, loopback, a target process each; {args.samples} timed 4 KiB writes; {args.duration:g} s per "
          f"throughput figure; median of {args.repeats} runs each; GB/s = 1e9 bytes/s.\n")
    base = results.get("baseline")
    extra = " baseline | vs baseline |" if base else ""
    print("| measure | Mooncake wheel | shardwire | ratio |" + extra)
    print("|---|---:|---:|---:|" + ("---:|---:|" if base else ""))
    for q in ("p50", "p99"):
        k = f"lat4k_{q}_us"
        line = f"| 4 KiB transfer_sync_write {q} | {m[k]:.1f} µs | {s[k]:.1f} µs | {m[k] / s[k]:.1f}x faster |"
        if base:
            line += f" {base[k]:.1f} µs | {base[k] / s[k]:.2f}x faster |"
        print(line)
    for size in sizes:
        label = f"{size // MIB} MiB" if size >= MIB else f"{size // KIB} KiB"
        for kind, what in (("sync", "transfer_sync_write"), ("batch", "batch of 16")):
            k = f"{kind}_{size}_gbps"
            a, b = m[k], s[k]
            line = f"| {label} {what} | {a:.2f} GB/s | {b:.2f} GB/s | {b / a:.1f}x |"
            if base:
                line += f" {base[k]:.2f} GB/s | {b / base[k]:.2f}x |"
            print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def print_local(results, args, sizes):
    shm, cma, tcp = results["local-shm"], results["local-cma"], results["tcp"]
    print(f"Python, one target process on this host; {args.samples} timed 4 KiB writes; {args.duration:g} s per "
          f"throughput figure; median of {args.repeats} runs each; GB/s = 1e9 bytes/s; memcpy: in the initiator "
          f"process, page-aligned, of the same bytes (a batch row: of what the batch moves).\n")
    print("| measure | local, managed (shm) | local, registered (CMA) | TCP (SHARDWIRE_LOCAL=0) | memcpy | "
          "shm / memcpy | CMA / TCP |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for q in ("p50", "p99"):
        k = f"lat4k_{q}_us"
        print(f"| 4 KiB transfer_sync_write {q} | {shm[k]:.1f} µs | {cma[k]:.1f} µs | {tcp[k]:.1f} µs | | | "
              f"{tcp[k] / cma[k]:.1f}x faster |")
    for size in sizes:
        label = f"{size // MIB} MiB" if size >= MIB else f"{size // KIB} KiB"
        for kind, what in (("sync", "transfer_sync_write"), ("batch", "batch of 16")):
            k = f"{kind}_{size}_gbps"
            mc = shm[f"memcpy_{size}_gbps" if kind == "sync" else f"memcpy_batch_{size}_gbps"]
            print(f"| {label} {what} | {shm[k]:.2f} GB/s | {cma[k]:.2f} GB/s | {tcp[k]:.2f} GB/s | {mc:.2f} GB/s | "
                  f"{shm[k] / mc:.0%} | {cma[k] / tcp[k]:.1f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
