"""The suite's own layout: every module that uses the quick demo is scheduled on one xdist worker;
the GPU check's rehearsal runs outside the timed suite, in CI."""
import glob
import os

from quick_demo_run import MODULES

HERE = os.path.dirname(os.path.abspath(__file__))


def test_quick_demo_users_are_listed_for_one_worker():
    users = {os.path.basename(p) for p in glob.glob(os.path.join(HERE, "test_*.py"))
             if p != os.path.abspath(__file__) and "quick_demo_run import" in open(p).read()}
    assert users == set(MODULES)  # an unlisted user would run its own quick demo on another worker


def test_the_rehearsal_is_left_out_of_make_test_and_run_by_ci():
    # the GPU check's whole CPU run is marked, make test deselects exactly that mark, and CI runs
    # make rehearse after make test: a rehearsal left out of both would go untested
    root = os.path.dirname(HERE)
    marked = [p for p in glob.glob(os.path.join(HERE, "test_*.py"))
              if p != os.path.abspath(__file__) and "@pytest.mark.rehearsal" in open(p).read()]
    assert [os.path.basename(p) for p in marked] == ["test_device_check.py"]
    makefile = open(os.path.join(root, "Makefile")).read()
    assert '-m "not rehearsal" tests' in makefile and "-m rehearsal tests" in makefile
    ci = [line.strip() for line in open(os.path.join(root, ".ci", "run")) if line.strip().startswith("make")]
    assert ci == ["make test", "make rehearse"]
