import os
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS)  # tests import the plain DiTs in tests/dits.py
sys.path.insert(0, os.path.dirname(TESTS))  # and the examples (examples.digits) from the repository root
