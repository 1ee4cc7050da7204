"""`ray job submit -- python jobs/serve.py ...`: the same code as `bpo-ray serve`."""

from _entry import run

if __name__ == "__main__":
    run("serve")
