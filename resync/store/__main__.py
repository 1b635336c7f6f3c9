"""python -m resync.store merge DB — merge pending run spools (used in the background)."""
import sys

from . import History

if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "merge":
        raise SystemExit("usage: python -m resync.store merge DB")
    History(sys.argv[2]).merge(hash_files=True)
