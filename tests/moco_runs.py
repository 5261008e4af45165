"""Several runs of examples/moco_digits.py in one process (a launch costs every rank seconds of
start-up: torch, Horovod, scikit-learn), under a launcher or alone (--simulate-ranks):

    mpirun -np 2 python tests/moco_runs.py "--quick --bn plain" "--quick --bn sync"

Each argument is one run's command line. After each run every rank prints
"MOCO_RUN <index> exit <code>", the code the example would have exited with.
"""
import os
import shlex
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "examples"))
import moco_digits  # noqa: E402


def main(runs):
    for index, line in enumerate(runs):
        sys.argv = ["moco_digits.py", *shlex.split(line)]
        try:
            moco_digits.main()
            code = 0
        except SystemExit as stop:  # --quick's verdict, agreed by every rank
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        print(f"MOCO_RUN {index} exit {code}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
