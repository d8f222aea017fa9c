"""The suite's own layout: every module that uses the quick demo is scheduled on one xdist worker."""
import glob
import os

from quick_demo_run import MODULES

HERE = os.path.dirname(os.path.abspath(__file__))


def test_quick_demo_users_are_listed_for_one_worker():
    users = {os.path.basename(p) for p in glob.glob(os.path.join(HERE, "test_*.py"))
             if p != os.path.abspath(__file__) and "quick_demo_run import" in open(p).read()}
    assert users == set(MODULES)  # an unlisted user would run its own quick demo on another worker
