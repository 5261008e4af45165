#!/usr/bin/env python3
"""Host discovery for the elastic tests, the way Horovod's own elastic integration tests do it
(test/integration/elastic_common.py): the hosts it prints change on a schedule of training
progress, which rank 0 of tests/elastic_worker.py writes after every committed step.

    elastic_discovery.py SCHEDULE_JSON PROGRESS_FILE

SCHEDULE_JSON is a file holding ``[[from_step, ["localhost:2", "127.0.0.1:1"]], ...]`` sorted by
``from_step`` (the first one 0); the hosts of the last entry whose ``from_step`` is at most the
progress are printed, one ``host:slots`` a line. PROGRESS_FILE holds the number of committed steps
(absent or unreadable: 0). 'localhost' and '127.0.0.1' are two host names for one machine, so one
machine plays two hosts (run horovodrun with --network-interface lo).

Only the standard library: horovodrun calls this about once a second.
"""
import json
import sys


def hosts_at(schedule, progress):
    chosen = schedule[0][1]
    for from_step, hosts in schedule:
        if progress >= from_step:
            chosen = hosts
    return chosen


def main(schedule_path, progress_path):
    with open(schedule_path) as f:
        schedule = json.load(f)
    try:
        with open(progress_path) as f:
            progress = int(f.read().strip() or 0)
    except (OSError, ValueError):
        progress = 0
    print("\n".join(hosts_at(schedule, progress)))


if __name__ == "__main__":
    main(*sys.argv[1:3])
