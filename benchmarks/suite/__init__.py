"""The benchmark suite behind `python benchmarks/run_all.py` (`make bench`).

One run, the same inputs for every strategy, per track and link rate:

    Fashion-MNIST test images (uint8, as a camera would hand them over)
      ├─ local-only      preprocess ─ head ─ tail, all on the device          (no link)
      ├─ full offload    JPEG-95 / PNG ─[link]─► server: decode ─ whole model
      ├─ split-only      device agent, exits off ─ frame ─[link: HTTP | stream]─► server tail
      ├─ split + exit    device agent, calibrated thresholds, fixed point
      └─ split + exit + adaptive policy (deadline)
    [link] = splitexit.link.LinkEmulator: a user-space shaping proxy on 127.0.0.1

Modules, one idea each: `inputs` (what is sent), `device_side` (timing and slowing the
device's compute), `strategies` (the strategies; local-only and full offload runs),
`split_runs` (the device agent's runs, and bare requests), `services` (the tail server
process), `wire` (bytes and accuracy per wire format, offline), `analysis` (floors, device
cost, projections, goals), `split_pays` (where the cost model says splitting pays),
`report` and `plots` (what lands in benchmarks/results/). Each split strategy runs once per
transport (HTTP, the stream): a cell is (strategy, transport, rate).
"""
