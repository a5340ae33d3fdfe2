"""Keep a deployment up: start a server from a config (HPS JSON, our YAML, or a Hydra-composed config file), serve
`/metrics` and the configured update stream, log a one-line summary every `--log-every` seconds, and shut down
cleanly on SIGTERM / SIGINT (queued inserts finished, tiers closed).

    python -m hps_core.serve --config deployment.yaml [--metrics-port 9464] [--log-every 60]

The process itself serves no lookups over the network (the engine is in-process); it is what runs beside them:
the update consumer applying a trainer's stream and the metrics endpoint - or, with the tiers shared (Redis), a
dedicated updater for a fleet.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import threading

from hps_core import config as hps_config
from hps_core.engine import HierarchicalParameterServer

log = logging.getLogger("hps_core.serve")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="deployment config: .json (HPS) or .yaml")
    parser.add_argument("--metrics-port", type=int, default=None, help="override the config's metrics_port")
    parser.add_argument("--log-every", type=float, default=60.0, help="seconds between summaries (0: none)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = hps_config.load_config(args.config)
    if args.metrics_port is not None:
        cfg = hps_config.validate(dataclasses.replace(cfg, metrics_port=args.metrics_port))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with HierarchicalParameterServer(cfg, progress=False) as hps:
        where = f"metrics on port {hps.metrics.port}" if hps.metrics is not None else "no metrics endpoint"
        print(f"serving models {sorted(hps.tables)}; {where}", flush=True)
        while not stop.wait(args.log_every if args.log_every > 0 else None):
            stats = hps.stats()
            keys = sum(d.get("keys", 0) for m in stats["models"].values() for t in m.values() for d in t.values())
            updates = stats.get("update_source", {})
            log.info("keys looked up %d; updates applied %d rows, lag %s", keys, updates.get("applied_rows", 0),
                     updates.get("lag", "-"))
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
