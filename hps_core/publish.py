"""Push a table (or a delta: a table directory holding only the changed rows) to a Redis update stream, for every
server whose `update_source` reads that stream (hps_core.update_stream).

    python -m hps_core.publish --redis 127.0.0.1:6379 --model ranker --table user --path /data/ranker/user_delta
        [--stream hps_updates] [--chunk-rows 8192]

The directory is in HPS's table format (`key`, `emb_vector`; `hps_core.tables`); rows go out in messages of
`--chunk-rows`, one round trip per 64 messages. Prints the rows and messages published.
"""

from __future__ import annotations

import argparse
import sys

from hps_core.tables import open_table
from hps_core.update_stream import publish


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", required=True, help="host:port of the Redis server holding the stream")
    parser.add_argument("--model", required=True)
    parser.add_argument("--table", required=True, help="table name or id")
    parser.add_argument("--path", required=True, help="table directory (HPS format) with the rows to publish")
    parser.add_argument("--stream", default="hps_updates")
    parser.add_argument("--chunk-rows", type=int, default=8192)
    args = parser.parse_args(argv)
    host, _, port = args.redis.partition(":")
    if not host or not port.isdigit():
        parser.error(f"--redis must be host:port, found {args.redis!r}")
    if args.chunk_rows < 1:
        parser.error(f"--chunk-rows must be >= 1, found {args.chunk_rows}")
    import redis

    client = redis.Redis(host=host, port=int(port))
    files = open_table(args.path)
    rows = messages = 0
    per_round = 64 * args.chunk_rows  # 64 messages per round trip
    for keys, vectors in files.iter_chunks(per_round):
        messages += len(publish(client, args.stream, args.model, args.table, keys, vectors, args.chunk_rows))
        rows += len(keys)
    print(f"published {rows} rows of {args.model}/{args.table} in {messages} messages to {args.stream} at "
          f"{args.redis}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
