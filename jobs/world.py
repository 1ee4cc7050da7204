"""`ray job submit -- python jobs/world.py ...`: the same code as `bpo-ray world`."""

from _entry import run

if __name__ == "__main__":
    run("world")
