"""`ray job submit -- python jobs/iterate.py ...`: the same code as `bpo-ray iterate`."""

from _entry import run

if __name__ == "__main__":
    run("iterate")
