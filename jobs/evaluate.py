"""`ray job submit -- python jobs/evaluate.py ...`: the same code as `bpo-ray evaluate`."""

from _entry import run

if __name__ == "__main__":
    run("evaluate")
