"""`ray job submit -- python jobs/models.py ...`: the same code as `bpo-ray models`."""

from _entry import run

if __name__ == "__main__":
    run("models")
