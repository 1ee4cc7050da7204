"""`ray job submit -- python jobs/train.py ...`: the same code as `bpo-ray train`."""

from _entry import run

if __name__ == "__main__":
    run("train")
