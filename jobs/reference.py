"""`ray job submit -- python jobs/reference.py ...`: the same code as `bpo-ray reference`."""

from _entry import run

if __name__ == "__main__":
    run("reference")
