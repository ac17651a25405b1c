"""The user-space link emulator against the kernel's rate limiter, at the same rates (root).

    namespace se13-dev ─ veth ══ tbf (RATE) each way ══ veth ─ namespace se13-srv: responder
    127.0.0.1 ─ LinkEmulator(RATE:0ms) ─► responder                         (the emulator)

    sudo .venv/bin/python benchmarks/kernel_link.py [--rates 1,5,20] [--sizes 650:250,...]

Both move exactly a request's and a response's bytes over TCP, one exchange at a time after
an idle gap, and report the mean time less the same exchange unshaped (veth without tbf;
loopback without the emulator): the time the rate limit costs. `tbf` is shaped two ways: with
a bucket of one MTU, and with `peakrate` 1% above the rate (its peak bucket is one MTU too,
so a packet still leaves at once after idle time). The emulator keeps no credit (burst 0):
it serializes every byte. The kernel counts TCP/IP headers (~66 B a packet), the emulator
only payload. `netem` is absent
on these kernels, so the kernel link has no added RTT; the emulator runs at 0 ms too.
Only namespaces this script creates carry traffic; they are deleted at the end. Writes
`results/kernel_link.md` and `.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

NS_DEV, NS_SRV = "se13-dev", "se13-srv"
DEV_IP, SRV_IP, PORT = "10.213.13.2", "10.213.13.1", 47013
GAP_S = 0.010


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def setup() -> None:
    teardown()
    sh("ip", "netns", "add", NS_DEV)
    sh("ip", "netns", "add", NS_SRV)
    sh("ip", "link", "add", "se13a", "type", "veth", "peer", "name", "se13b")
    sh("ip", "link", "set", "se13a", "netns", NS_DEV)
    sh("ip", "link", "set", "se13b", "netns", NS_SRV)
    for ns, dev, ip in ((NS_DEV, "se13a", DEV_IP), (NS_SRV, "se13b", SRV_IP)):
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")


def shape(rate_bps: float | None, paced: bool) -> None:
    """tbf at `rate_bps` on both ends (None: unshaped)."""
    for ns, dev in ((NS_DEV, "se13a"), (NS_SRV, "se13b")):
        sh("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root", check=False)
        if rate_bps is None:
            continue
        spec = ["rate", f"{int(rate_bps)}bit", "burst", "1600", "latency", "500ms"]
        if paced:
            spec += ["peakrate", f"{int(rate_bps * 1.01)}bit", "mtu", "1600"]
        sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", *spec)


def teardown() -> None:
    for ns in (NS_DEV, NS_SRV):
        sh("ip", "netns", "del", ns, check=False)


def in_dev(up: int, down: int, n: int) -> float:
    """Mean ms of n exchanges with the responder (`suite.link_check.exchanges_ms`), run
    inside the device namespace."""
    code = (
        "import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; import kernel_link as k; "
        "from suite.link_check import exchanges_ms; "
        "print(exchanges_ms(k.SRV_IP, k.PORT, *map(int, sys.argv[3:]), k.GAP_S))"
    )
    out = sh(
        "ip", "netns", "exec", NS_DEV, sys.executable, "-c", code,
        str(HERE), str(HERE.parent), str(up), str(down), str(n),
    )  # fmt: skip
    return float(out.stdout.strip())


def serve(down: int) -> None:
    """The responder, bound in the server namespace (runs until killed)."""
    from suite.link_check import answer_messages

    listener = socket.create_server((SRV_IP, PORT))
    answer = b"a" * down
    while True:
        conn, _ = listener.accept()
        answer_messages(conn, answer)


def measure(rates: list[float], sizes: list[tuple[int, int]], n: int) -> list[dict[str, Any]]:
    from suite.link_check import link_cost

    from splitexit.cost import Link
    from splitexit.link import LinkSpec
    from splitexit.processes import server_process

    rows = []
    for up, down in sizes:
        env = {**os.environ, "PYTHONPATH": f"{HERE}:{HERE.parent}"}
        serve = ["ip", "netns", "exec", NS_SRV, sys.executable, str(Path(__file__)), "--serve",
                 str(down)]  # fmt: skip
        with server_process(serve, env=env, stop_timeout_s=5.0):
            time.sleep(1.0)
            shape(None, False)
            direct = in_dev(up, down, n)
            for rate in rates:
                bps = rate * 1e6
                shape(bps, paced=False)
                burst = in_dev(up, down, n) - direct
                shape(bps, paced=True)
                paced = in_dev(up, down, n) - direct
                emu = link_cost(LinkSpec(bps, 0.0), up, down, n=n)
                rows.append(
                    {
                        "rate_mbit": rate,
                        "up_bytes": up,
                        "down_bytes": down,
                        "payload_ms": round(1e3 * Link(bps, 0.0).transfer_s(up + down), 3),
                        "kernel_tbf_burst_ms": round(burst, 3),
                        "kernel_tbf_paced_ms": round(paced, 3),
                        "emulator_ms": round(emu.through_ms - emu.direct_ms, 3),
                        "veth_direct_ms": round(direct, 3),
                        "loopback_direct_ms": round(emu.direct_ms, 3),
                    }
                )
                print(rows[-1], flush=True)
    return rows


def write(rows: list[dict[str, Any]], out: Path, command: str) -> None:
    load = os.getloadavg()
    doc = {"command": command, "load_average": [round(x, 2) for x in load], "rows": rows}
    (out / "kernel_link.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [
        "# Kernel rate limiter (tbf over veth, two namespaces) against the user-space emulator",
        "",
        f"`{command}`; load average (1, 5, 15 min) at the end {doc['load_average']}.",
        "",
        "Mean ms an exchange of `up` + `down` bytes takes beyond the same exchange unshaped "
        "(one at a time, 10 ms apart, 20 each). payload: (up + down) x 8 / rate. tbf burst: "
        "bucket of one MTU; tbf paced: `peakrate` 1% above the rate (a one-MTU peak bucket); "
        "emulator: `splitexit.link.LinkEmulator` at the rate, 0 ms RTT, no burst credit.",
        "",
        "| Mbit/s | up B | down B | payload ms | tbf burst ms | tbf paced ms | emulator ms |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['rate_mbit']:g} | {r['up_bytes']} | {r['down_bytes']} | {r['payload_ms']} | "
            f"{r['kernel_tbf_burst_ms']} | {r['kernel_tbf_paced_ms']} | {r['emulator_ms']} |"
        )
    (out / "kernel_link.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/kernel_link.py", description=__doc__)
    p.add_argument("--rates", default="1,5,20", help="Mbit/s (1,5,20)")
    p.add_argument(
        "--sizes", default="650:250,5000:250,50000:250", help="UP:DOWN bytes, comma-separated"
    )
    p.add_argument("--n", type=int, default=20, help="exchanges per measurement (20)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve is not None:
        serve(args.serve)
        return 0
    if os.geteuid() != 0:
        print("kernel_link: needs root (network namespaces, tc)", file=sys.stderr)
        return 2
    try:
        rates = [float(r) for r in args.rates.split(",")]
        sizes = [tuple(int(v) for v in s.split(":")) for s in args.sizes.split(",")]
    except ValueError:
        print("kernel_link: --rates are numbers, --sizes UP:DOWN pairs", file=sys.stderr)
        return 2
    setup()
    try:
        rows = measure(rates, sizes, args.n)  # type: ignore[arg-type]
    finally:
        teardown()
    args.out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python benchmarks/kernel_link.py", *(argv or sys.argv[1:])])
    write(rows, args.out, command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
