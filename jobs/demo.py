"""`ray job submit -- python jobs/demo.py ...`: the same code as `bpo-ray demo`."""

from _entry import run

if __name__ == "__main__":
    run("demo")
