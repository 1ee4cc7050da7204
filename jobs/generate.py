"""`ray job submit -- python jobs/generate.py ...`: the same code as `bpo-ray generate`."""

from _entry import run

if __name__ == "__main__":
    run("generate")
